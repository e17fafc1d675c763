"""Benchmark records: the README's accuracy table is what benchmarks/prune_accuracy.py computes from its recorded
runs, and rerunning a benchmark keeps the notes written by hand below its tables."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

from _helpers import REPO


def test_readme_accuracy_table_comes_from_the_recorded_benchmark() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("prune_accuracy", REPO / "benchmarks" / "prune_accuracy.py")
        bench = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(bench)  # type: ignore[union-attr]
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    results = bench.load_results(REPO / "benchmarks" / "prune_accuracy.jsonl")
    readme = (REPO / "README.md").read_text()
    for schedule, (start, end) in bench.README_TABLES.items():
        assert readme.count(start) == 1 and readme.count(end) == 1, f"the README has one {start} ... {end}"
        table = readme.split(start, 1)[1].split(end, 1)[0].strip().splitlines()
        assert table == bench.readme_table(results, schedule), f"the README's table of {schedule} is stale"
        assert len(table) > 3, "the table has rows for at least one model"
        assert all("[" not in line for line in table), "every cell has 3 seeds"


def test_rewriting_a_record_keeps_its_hand_written_notes(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from _common import NOTES, write_record
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    record = tmp_path / "bench.md"
    write_record(record, "# first run\n\n| a | 1 |\n")
    record.write_text(record.read_text() + "\n- measured by hand: 1.2x\n")
    write_record(record, "# second run\n\n| a | 2 |\n")
    text = record.read_text()
    assert "second run" in text and "first run" not in text
    assert text.index(NOTES) > text.index("| a | 2 |") and text.endswith("- measured by hand: 1.2x\n")
    assert [f.name for f in tmp_path.iterdir()] == ["bench.md"]  # written to a temporary file, then renamed


def test_every_benchmark_writes_its_record_through_write_record() -> None:
    """A script writing its --out file directly would drop the notes below NOTES on every rerun."""
    direct = [f"{path.name}: {m.group(0)}" for path in sorted((REPO / "benchmarks").glob("*.py"))
              if path.name != "_common.py"
              for m in re.finditer(r"\b(?:args\.)?out\.write_text\(", path.read_text(encoding="utf-8"))]
    assert direct == []
