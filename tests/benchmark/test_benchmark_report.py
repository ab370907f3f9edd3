"""The benchmark's output: a Markdown table, JSON that reads back into results, and CSV."""

from __future__ import annotations

import csv
import dataclasses
import io
import json

from benchmark_samples import CONFIG, LIMITS, result

from xception.benchmark import Result, measure, results_from_json, results_to_csv, results_to_json, results_to_markdown

RESULTS = [
    result(ratio_vs_timm=1.25, ratio_vs_ours=1.0, fraction_of_peak=0.125),
    result(candidate="timm legacy_xception", layout="channels_last", compiled=True, compile_s=31.5,
           ratio_vs_timm=1.0, ratio_vs_ours=0.8, note="contiguous: 7.5 img/s"),
    Result(candidate="keras", layout="-", mode="inference", precision="fp32", device="cpu", batch_size=1,
           img_size=(299, 299), skipped="keras cannot be imported (No module named 'keras')"),
]


def test_json_round_trip() -> None:
    text = results_to_json(RESULTS)
    assert json.loads(text)[0]["img_size"] == [299, 299]
    assert results_from_json(text) == RESULTS


def test_json_round_trips_a_real_result() -> None:
    measured = measure(None, dataclasses.replace(CONFIG, warmup=0, repeats=1, iterations=1), limits=LIMITS)
    assert results_from_json(results_to_json([measured])) == [measured]


def test_csv_has_every_field_with_empty_cells_for_none() -> None:
    rows = list(csv.DictReader(io.StringIO(results_to_csv(RESULTS))))
    assert list(rows[0]) == [field.name for field in dataclasses.fields(Result)]
    assert len(rows) == 3
    assert (rows[0]["candidate"], rows[0]["img_size"], rows[0]["images_per_s"]) == ("xception", "299x299", "10.0")
    assert (rows[1]["compiled"], rows[1]["compile_s"], rows[1]["note"]) == ("True", "31.5", "contiguous: 7.5 img/s")
    assert (rows[2]["images_per_s"], rows[2]["skipped"]) == ("", "keras cannot be imported (No module named 'keras')")


def test_markdown_table() -> None:
    limits = {**LIMITS, "size": 4096}
    lines = results_to_markdown(RESULTS, limits).splitlines()
    assert lines[0] == ("Machine limit (cpu, GFLOP/s of a square matmul (its side)): fp32 1,000 (4096), "
                        "bf16 2,000 (4096)")
    header, rule, *rows = lines[2:]
    assert header.startswith("| candidate | layout |") and "| img/s | p50 ms | p90 ms | vs timm |" in header
    assert rule.count("---") == header.count("|") - 1
    assert len(rows) == 3
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert cells[:9] == ["xception", "contiguous", "inference", "fp32", "1", "299x299", "10.00", "100.00", "120.00"]
    assert cells[9:] == ["1.25", "1.00", "-", "12.5", "22.86M", "8.37", "120", "-", ""]  # no agreement measured
    assert "| 16.7 |" in rows[1]  # % of peak computed from the limits: 2 * 8.367 GMACs * 10 img/s / 1000 GFLOP/s
    assert "| 31.5 | contiguous: 7.5 img/s |" in rows[1]
    assert rows[2].endswith("| skipped: keras cannot be imported (No module named 'keras') |")
    assert "Machine limit" not in results_to_markdown(RESULTS)
    assert "| 1.00 | 99.50% |" in results_to_markdown([dataclasses.replace(RESULTS[0], agreement=0.995)])
