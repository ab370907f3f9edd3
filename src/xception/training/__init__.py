"""Training: one readable loop, its one step, every option in :class:`TrainConfig`, the recipes, checkpoints.

- :mod:`.config`: :class:`TrainConfig`, the single source of the training options (and of the CLI's flags).
- :mod:`.recipes`: the paper's and this project's recipes.
- :mod:`.loop`: :func:`train`, with :class:`~.loop.RunState` saved and resumed whole.
- :mod:`.step`: the training step the loop, the benchmark and the profile share.
- :mod:`.data`: a run's datasets, samplers and loaders.
- :mod:`.checkpoint`: atomic, pickle-free checkpoints that resume bit for bit.
- :mod:`.metrics`: :func:`evaluate`, the metrics log and the curves.
"""

from .checkpoint import CheckpointError, TrainingState, load_checkpoint, read_architecture, save_checkpoint
from .config import TrainConfig
from .loop import TrainingError, train
from .metrics import evaluate
from .recipes import RECIPES, Recipe, get_recipe
from .step import train_step

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
