"""Training: one readable loop, its one step, every option in :class:`TrainConfig`, the recipes, checkpoints.

- :mod:`.config`: :class:`TrainConfig`, the single source of the training options (and of the CLI's flags).
- :mod:`.recipes`: the paper's and this project's recipes.
- :mod:`.loop`: :func:`train`, with :class:`~.loop.RunState` saved and resumed whole.
- :mod:`.step`: the training step the loop, the benchmark and the profile share.
- :mod:`.data`: a run's datasets, samplers and loaders.
- :mod:`.checkpoint`: atomic, pickle-free checkpoints that resume bit for bit.
- :mod:`.metrics`: :func:`evaluate`, the metrics log and the curves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

# Imported on first use, so that the command line can build its ``train`` flags from :mod:`.config` without torch.
_EXPORTS = {
    "CheckpointError": "state_codec", "TrainingState": "checkpoint", "load_checkpoint": "checkpoint",
    "read_architecture": "checkpoint", "save_checkpoint": "checkpoint", "TrainConfig": "config",
    "TrainingError": "loop", "train": "loop", "evaluate": "metrics", "RECIPES": "recipes", "Recipe": "recipes",
    "get_recipe": "recipes", "train_step": "step",
}
__all__ = [
    "RECIPES",
    "CheckpointError",
    "Recipe",
    "TrainConfig",
    "TrainingError",
    "TrainingState",
    "evaluate",
    "get_recipe",
    "load_checkpoint",
    "read_architecture",
    "save_checkpoint",
    "train",
    "train_step",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:
    from .checkpoint import TrainingState, load_checkpoint, read_architecture, save_checkpoint
    from .config import TrainConfig
    from .loop import TrainingError, train
    from .metrics import evaluate
    from .recipes import RECIPES, Recipe, get_recipe
    from .state_codec import CheckpointError
    from .step import train_step
