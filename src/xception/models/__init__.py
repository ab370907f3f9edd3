"""The networks: the paper's Xception, the DeepLab aligned family, the Inception baseline, and the registry.

- :mod:`.registry`: :func:`create_model` and :func:`list_models`.
- :mod:`.backbone`: what every network of the family shares (blocks and their plans, feature maps, output
  stride, the classifier head, :class:`FeatureExtractor`).
- :mod:`.xception`: the paper's network (Figure 5) and :class:`XceptionConfig`, its knobs.
- :mod:`.aligned`: Xception-41/65/71 and the pre-activation 41p/65p.
- :mod:`.inception`: an Inception-V3-style network for the paper's comparisons.

Only the registry is imported here: ``xception.models.list_models()`` (the command line's model choices) needs no
torch; the networks' modules are imported when a model is built.
"""

from .registry import BASELINES, MODELS, create_model, list_models

__all__ = ["BASELINES", "MODELS", "create_model", "list_models"]
