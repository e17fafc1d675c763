"""The README's accuracy table is what benchmarks/prune_accuracy.py computes from its recorded runs."""

from __future__ import annotations

import importlib.util
import sys

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
