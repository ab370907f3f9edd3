"""Results as a Markdown table, JSON (which reads back into :class:`~.timing.Result`) or CSV."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Sequence
from typing import Any

from .timing import Result, peak_fraction

MARKDOWN_COLUMNS = ("candidate", "layout", "mode", "precision", "batch", "size", "img/s", "p50 ms", "p90 ms",
                    "vs timm", "vs ours", "agreement", "% of peak", "params", "GMACs", "peak MB", "compile s", "note")


def results_to_markdown(results: Sequence[Result], limits: dict[str, Any] | None = None) -> str:
    """A Markdown table, one row per result; with ``limits``, a line with the machine's limits above it and
    the % of peak filled in for results that lack it."""
    lines = []
    if limits is not None:
        rates = ", ".join(f"{name} {value:,.0f} ({limits.get(f'{name}_size', limits['size'])})"
                          for name, value in ((key.removesuffix("_gflops"), value) for key, value in limits.items()
                                              if key.endswith("_gflops")))
        lines += [f"Machine limit ({limits['device']}, GFLOP/s of a square matmul (its side)): {rates}", ""]
    lines += ["| " + " | ".join(MARKDOWN_COLUMNS) + " |", "|" + "---|" * len(MARKDOWN_COLUMNS)]
    for result in results:
        fraction = result.fraction_of_peak
        if fraction is None and limits is not None:
            fraction = peak_fraction(result, limits)
        note = f"skipped: {result.skipped}" if result.skipped else result.note
        cells = (
            result.candidate, result.layout, result.mode, result.precision, str(result.batch_size),
            "x".join(map(str, result.img_size)), _fmt(result.images_per_s, ".2f"), _fmt(result.p50_ms, ".2f"),
            _fmt(result.p90_ms, ".2f"), _fmt(result.ratio_vs_timm, ".2f"), _fmt(result.ratio_vs_ours, ".2f"),
            _fmt(None if result.agreement is None else 100 * result.agreement, ".2f", "%"),
            _fmt(None if fraction is None else 100 * fraction, ".1f"),
            _fmt(None if result.params is None else result.params / 1e6, ".2f", "M"),
            _fmt(None if result.macs is None else result.macs / 1e9, ".2f"), _fmt(result.peak_memory_mb, ".0f"),
            _fmt(result.compile_s, ".1f"), note.replace("|", "/"))  # a "|" would split the cell
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def results_to_json(results: Sequence[Result]) -> str:
    """A JSON list with every field of each result; :func:`results_from_json` reads it back."""
    return json.dumps([dataclasses.asdict(result) for result in results], indent=2)


def results_from_json(text: str) -> list[Result]:
    """The results :func:`results_to_json` wrote."""
    return [Result(**{**row, "img_size": tuple(row["img_size"])}) for row in json.loads(text)]


def results_to_csv(results: Sequence[Result]) -> str:
    """One row per result with every field, for spreadsheets; empty cells are None and ``img_size`` is ``HxW``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[f.name for f in dataclasses.fields(Result)], lineterminator="\n")
    writer.writeheader()
    for result in results:
        row = dataclasses.asdict(result)
        row["img_size"] = "x".join(map(str, result.img_size))
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return buffer.getvalue()
