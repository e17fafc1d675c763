"""Checks that commands run before they write anything (the commands call them at their start)."""

from __future__ import annotations

from pathlib import Path

from bnnslim.errors import BnnslimError


def refuse_replacing_work(run_path: Path, overwrite: bool, resume: bool) -> None:
    """``bnnslim binarize`` must not silently replace a trained or pruned run, even of the same model.

    A run directory whose manifest records training, pruning or an export holds
    work that a new ``binarize`` would discard; it is replaced only with
    ``--overwrite`` (``--resume`` continues it instead).
    """
    from bnnslim.rundir import RunDir

    run = RunDir(Path(run_path))
    if overwrite or resume or not run.exists():
        return
    manifest = run.read_manifest()
    held = []
    if isinstance(manifest.get("binarize"), dict) and manifest["binarize"].get("trained"):
        held.append("a trained binary network")
    if manifest.get("prune"):
        held.append("a pruned network")
    if any((run.path / name).is_file() for name in ("model.safetensors", "model.bnn.safetensors")):
        held.append("exported models")
    if held:
        raise BnnslimError(f"run directory '{run.path}' already holds {', '.join(held)}; binarize would replace them",
                           "use --run DIR for a new run, --resume to continue this one, or --overwrite to replace it")
