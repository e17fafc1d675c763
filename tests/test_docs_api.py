"""docs/api.md works: its ```python blocks run, in order, as one program (a user's notebook)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_api_doc_has_an_example_for_every_stage() -> None:
    code = "\n".join(re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S))
    for call in ("bnnslim.binarize(", "bnnslim.fit(", "bnnslim.learn_masks(", "PruneSchedule(",
                 "bnnslim.slim(", "bnnslim.save(", "bnnslim.load("):
        assert call in code, f"docs/api.md shows no example of {call}"


@pytest.mark.slow
def test_api_doc_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)):
        exec(compile(block, f"docs/api.md block {i + 1}", "exec"), namespace)  # our own documentation
    assert (tmp_path / "small-cnn.bnn.safetensors").is_file()
