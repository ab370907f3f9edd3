"""The paper's claims, tested at small scale: ``xception experiment NAME``.

Chollet (2017) supports its design with experiments few readers can rerun (ImageNet and JFT, 60 K80 GPUs). Each
experiment here asks one of its questions of the compact recipe's network (a narrow Xception for 28-32 px images)
on Fashion-MNIST or any ImageNet-layout folder, in minutes to hours on a CPU:

- ``activation``: no activation, ReLU or ELU between depthwise and pointwise (Figure 10: none is best);
- ``residual``: with and without residual connections (Figure 9: residuals help);
- ``spectrum``: 1, 4, 16 segments or one per channel in every separable convolution, widths adjusted so that
  the parameter count stays within a few percent (the paper's open question: the intermediate points);
- ``order``: depthwise-first against pointwise-first separable convolutions (section 3: little difference);
- ``inception``: Xception against an Inception-V3-style network at the same parameter count (Table 1), and
  torchvision's Inception V3 against Xception at full size for parameters and training speed (Table 3).

``all`` runs those five. One more asks a claim of the DeepLabV3+ paper (Chen et al. 2018) on CamVid or any
segmentation folder, scored by the validation mIoU at full resolution (settings: :class:`SegmentationSettings`):

- ``decoder``: the camvid recipe's DeepLabV3+ against DeepLabV3 (no decoder; Tables 3 and 5: the decoder improves
  mIoU), and what the compact backbone, output stride 8 and a smaller training crop each change.

Every variant is trained with several seeds by :func:`xception.training.train`, the code behind ``xception train``,
with the compact recipe unchanged except for the variant's architecture options. An experiment writes, in
``OUTPUT/NAME/``: ``curves.png`` (validation top-1 and training loss against the step, mean over seeds and their
min-max band), ``results.md`` (parameters, final top-1 mean ± std, steps/s) and ``results.json`` (every number).
Its verdict is computed from the numbers: a gap between two variants counts only when it exceeds the noise (the
larger of their seed standard deviations and the validation set's sampling error).

Runs live in ``OUTPUT/runs/<variant>-<digest>/seed<k>``, the digest covering everything that changes the run, so
variants shared between experiments (the compact Xception is the baseline of all five) train once, a finished run
is reused and an interrupted one resumes. :func:`write_report` turns the results into ``docs/paper-reproduction.md``.

The package's modules, each importing only those before it: :mod:`.segmentation` (the segmentation experiment's
settings), :mod:`.definitions` (settings, data, variants, the experiment table), :mod:`.verdicts` (result records
and the statistics that judge them), :mod:`.report` (figures, tables and the report) and :mod:`.runner` (training,
the run cache, and :func:`run_experiments`).
"""

from .definitions import (
    EXPERIMENT_NAMES,
    EXPERIMENTS,
    FULL,
    PAPER_TABLE3,
    QUICK,
    SEGMENTATION_EXPERIMENTS,
    DataInfo,
    ExperimentSettings,
    SegmentationDataInfo,
    command_line,
    describe_data,
    make_settings,
    model_options,
    parameter_count,
)
from .report import write_outputs, write_report
from .runner import run_experiments
from .segmentation import SEGMENTATION_FULL, SEGMENTATION_QUICK, SegmentationSettings
from .verdicts import ExperimentResult, RunResult, VariantResult, Verdict, judge_experiment

__all__ = [
    "EXPERIMENTS",
    "EXPERIMENT_NAMES",
    "FULL",
    "PAPER_TABLE3",
    "QUICK",
    "SEGMENTATION_EXPERIMENTS",
    "SEGMENTATION_FULL",
    "SEGMENTATION_QUICK",
    "DataInfo",
    "ExperimentResult",
    "ExperimentSettings",
    "RunResult",
    "SegmentationDataInfo",
    "SegmentationSettings",
    "VariantResult",
    "Verdict",
    "command_line",
    "describe_data",
    "judge_experiment",
    "make_settings",
    "model_options",
    "parameter_count",
    "run_experiments",
    "write_outputs",
    "write_report",
]
