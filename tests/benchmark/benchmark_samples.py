"""Configurations, models and results shared by the benchmark's tests."""

from __future__ import annotations

from typing import Any

import xception
from xception.benchmark import BenchmarkConfig, Result

TINY = {"middle_repeats": 0}  # 71x71 is the smallest input; without the middle flow a forward takes milliseconds
CONFIG = BenchmarkConfig(model_options=TINY, img_size=71, batch_size=2, warmup=1, repeats=2, iterations=2)
LIMITS = {"device": "cpu", "size": 128, "fp32_gflops": 1000.0, "bf16_gflops": 2000.0}


def tiny_model() -> xception.Xception:
    return xception.create_model("xception", **TINY)


def check_measured(result: Result) -> None:
    """A result that ran: positive, well-formed numbers (never their size: the tests share a busy machine)."""
    assert result.skipped is None
    for name in ("images_per_s", "p50_ms", "p90_ms", "params"):
        assert getattr(result, name) > 0, name
    assert result.p90_ms >= result.p50_ms
    assert result.peak_memory_mb is None or result.peak_memory_mb >= 0


def result(**fields: Any) -> Result:
    """A full-size Xception result at 10 img/s, with ``fields`` changed."""
    base = dict(candidate="xception", layout="contiguous", mode="inference", precision="fp32", device="cpu",
                batch_size=1, img_size=(299, 299), images_per_s=10.0, p50_ms=100.0, p90_ms=120.0,
                params=22_855_952, macs=8_367_000_000, peak_memory_mb=120.5)
    return Result(**{**base, **fields})
