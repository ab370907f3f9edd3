"""Speed and memory of Xception, alone or side by side with other implementations: ``xception benchmark``.

- :mod:`.timing`: the configuration, the candidates and how they are timed (interleaved), peak memory, and the
  machine's matmul limits that results are rated against.
- :mod:`.peers`: timm's, Keras's and torchvision's networks, ours deployed, and :func:`compare`.
- :mod:`.report`: Markdown, JSON and CSV output.
"""

from .peers import PEERS, PeerUnavailable, RealImages, compare
from .report import results_from_json, results_to_csv, results_to_json, results_to_markdown
from .timing import (
    BenchmarkConfig,
    Candidate,
    PeakMemory,
    Result,
    machine_limits,
    measure,
    peak_fraction,
    run_interleaved,
)

__all__ = [
    "PEERS",
    "BenchmarkConfig",
    "Candidate",
    "PeakMemory",
    "PeerUnavailable",
    "RealImages",
    "Result",
    "compare",
    "machine_limits",
    "measure",
    "peak_fraction",
    "results_from_json",
    "results_to_csv",
    "results_to_json",
    "results_to_markdown",
    "run_interleaved",
]
