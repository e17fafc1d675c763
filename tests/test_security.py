"""Loading never runs code because a file names it (bnnslim.trust).

Every payload writes a marker file when its code runs; no test may see a marker.
The crafted files are real exports whose header (or a run's manifest) was
rewritten the way an attacker would.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import py_compile
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _helpers import TOY_MODEL
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import bnnslim
from bnnslim.cli.app import app
from bnnslim.errors import BnnslimError
from bnnslim.model_source import load_model_source
from bnnslim.run_model import load_run_model
from bnnslim.rundir import RunDir
from bnnslim.stages.binarize import BinarizeOptions, binarize
from bnnslim.stages.export import export

EVIL = """
from pathlib import Path
Path({marker!r}).write_text("ran")
from torch import nn
def build_model(num_classes=4, in_channels=1):
    return nn.Identity()
"""


@pytest.fixture(scope="module")
def key_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """This module's account key lives in its own config folder."""
    home = tmp_path_factory.mktemp("config")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, key_home: Path) -> tuple[Path, Path, Path]:
    """(model file, run, plain export) of the toy model, made by this account."""
    root = tmp_path_factory.mktemp("made")
    source = root / "net.py"
    source.write_text(textwrap.dedent(TOY_MODEL).lstrip())
    run = root / "run"
    binarize(BinarizeOptions(model=str(source), run=run))
    plain = export(run, ("plain",), evaluate_data=False).files["plain"]
    return source, run, plain


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "a payload ran"


def rewrite_header(src: Path, dst: Path, drop_signature: bool = True, **model: object) -> Path:
    """A copy of export ``src`` with its header's model entry changed (and its signature dropped)."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
    entry = json.loads(meta["model"])
    entry.update(model)
    meta["model"] = json.dumps(entry)
    if drop_signature:
        meta.pop("model_signature", None)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def evil_py(folder: Path, marker: Path, name: str = "evil.py") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(EVIL.format(marker=str(marker))))
    return path


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def refused(result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, result.output


# ------------------------------------------------------------------ payloads in a model file's header


def test_absolute_py_named_by_the_header_is_not_imported(exported, tmp_path: Path, marker: Path) -> None:
    evil = evil_py(tmp_path, marker)
    crafted = rewrite_header(exported[2], tmp_path / "m.safetensors", source=str(evil), name="build_model",
                             sha256=sha(evil))
    with pytest.raises(BnnslimError, match=r"does not run code because a file names it.*--model"):
        bnnslim.load(crafted)
    with pytest.raises(BnnslimError, match="does not run code"):
        bnnslim.load(crafted, runtime="packed")
    refused(cli("bench", crafted, "--repeats", "1", "--warmup", "0", "--no-layers"), "--trust-source")
    assert cli("info", crafted).exit_code == 0  # info reads the header only


def test_relative_py_never_resolves_against_the_current_directory(exported, tmp_path: Path, marker: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    evil = evil_py(tmp_path, marker)
    monkeypatch.chdir(tmp_path)
    for source in ("evil.py", "./evil.py"):
        crafted = rewrite_header(exported[2], tmp_path / "m.safetensors", source=source, name="build_model",
                                 sha256=sha(evil))
        with pytest.raises(BnnslimError):
            bnnslim.load(crafted)
        with pytest.raises(BnnslimError, match=r"relative path|no installed plugin"):
            bnnslim.load(crafted, trust_source=True)


def test_pyc_is_never_imported_even_when_trusted(exported, tmp_path: Path, marker: Path) -> None:
    evil = evil_py(tmp_path, marker)
    pyc = Path(py_compile.compile(str(evil), cfile=str(tmp_path / "evil.pyc")))
    evil.unlink()
    crafted = rewrite_header(exported[2], tmp_path / "m.safetensors", source=str(pyc), name="build_model",
                             sha256=sha(pyc))
    with pytest.raises(BnnslimError, match="does not run code"):
        bnnslim.load(crafted)
    with pytest.raises(BnnslimError, match=r"not a Python source file \(\.py\)"):
        bnnslim.load(crafted, trust_source=True)
    with pytest.raises(BnnslimError, match=r"not a Python source file \(\.py\)"):
        bnnslim.load(crafted, model=str(pyc))


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler to build the shared library payload")
def test_shared_library_is_never_loaded(exported, tmp_path: Path, marker: Path) -> None:
    c = tmp_path / "evil.c"
    c.write_text(textwrap.dedent(f"""
        #include <stdio.h>
        __attribute__((constructor)) static void payload(void) {{
            FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("ran", f); fclose(f); }}
        }}
    """))
    so = tmp_path / "evil.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(so), str(c)], check=True, capture_output=True)
    crafted = rewrite_header(exported[2], tmp_path / "m.safetensors", source=str(so), name="build_model",
                             sha256=sha(so))
    for kwargs in ({}, {"trust_source": True}, {"model": str(so)}, {"model": f"{so}:build_model"}):
        with pytest.raises(BnnslimError):
            bnnslim.load(crafted, **kwargs)
    refused(cli("bench", crafted, "--trust-source", "--repeats", "1", "--warmup", "0"), ".py")


@pytest.mark.parametrize("digest", [None, "", "0" * 63, "not hex" * 9, 42])
def test_missing_or_bad_sha256_is_refused_even_when_trusted(exported, tmp_path: Path, marker: Path,
                                                            digest: object) -> None:
    evil = evil_py(tmp_path, marker)
    crafted = rewrite_header(exported[2], tmp_path / "m.safetensors", source=str(evil), name="build_model",
                             sha256=digest)
    for kwargs in ({}, {"trust_source": True}, {"model": str(evil)}):
        with pytest.raises(BnnslimError, match="no valid sha256"):
            bnnslim.load(crafted, **kwargs)
    refused(cli("bench", crafted, "--trust-source"), "sha256")


def test_sha256_must_match_the_file_used(exported, tmp_path: Path, marker: Path) -> None:
    evil = evil_py(tmp_path, marker)
    source, _run, plain = exported
    crafted = rewrite_header(plain, tmp_path / "m.safetensors", source=str(evil), name="build_model",
                             sha256=sha(source))  # the hash of the good file, the path of the evil one
    with pytest.raises(BnnslimError, match="changed since"):
        bnnslim.load(crafted, trust_source=True)
    with pytest.raises(BnnslimError, match="changed since"):
        bnnslim.load(plain, model=str(evil))  # the user's file must be the one exported


def test_recorded_name_cannot_pick_a_function(exported, tmp_path: Path, marker: Path) -> None:
    """A trusted model file with other callables: the header's name may not choose one of them."""
    source, _run, plain = exported
    trusted = tmp_path / "net.py"
    trusted.write_text(source.read_text() + textwrap.dedent(f"""
        from os import getcwd as imported_callable
        def wipe(num_classes=4, in_channels=1):
            from pathlib import Path
            Path({str(marker)!r}).write_text("ran")
            return build_model(num_classes, in_channels)
    """))
    for name in ("wipe", "imported_callable", "__loader__", "getattr"):
        crafted = rewrite_header(plain, tmp_path / f"{name}.safetensors", source=str(trusted), name=name,
                                 sha256=sha(trusted))
        with pytest.raises(BnnslimError):
            bnnslim.load(crafted, model=str(trusted))
        with pytest.raises(BnnslimError):
            bnnslim.load(crafted, trust_source=True)


def test_forged_or_foreign_signature_is_not_trusted(exported, tmp_path: Path, marker: Path) -> None:
    evil = evil_py(tmp_path, marker)
    with safe_open(str(exported[2]), framework="pt") as f:
        real_signature = f.metadata()["model_signature"]
    for signature in ("0" * 64, real_signature, "x"):
        crafted = rewrite_header(exported[2], tmp_path / "m.safetensors", source=str(evil), name="build_model",
                                 sha256=sha(evil))
        with safe_open(str(crafted), framework="pt") as f:
            meta = dict(f.metadata())
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
        save_file(tensors, str(crafted), metadata={**meta, "model_signature": signature})
        with pytest.raises(BnnslimError, match="no valid signature"):
            bnnslim.load(crafted)


def test_stale_bytecode_beside_a_trusted_file_is_not_run(tmp_path: Path, marker: Path) -> None:
    """The bytes hashed are the bytes run: a __pycache__ entry matching the file's size and mtime is ignored."""
    net = tmp_path / "net.py"
    net.write_text(textwrap.dedent(TOY_MODEL).lstrip())
    evil = evil_py(tmp_path, marker, "payload.py")
    code = compile(evil.read_text(), str(net), "exec")
    st = net.stat()
    cached = Path(importlib.util.cache_from_source(str(net)))
    cached.parent.mkdir()
    from importlib._bootstrap_external import _code_to_timestamp_pyc  # the format the import system reads

    cached.write_bytes(_code_to_timestamp_pyc(code, int(st.st_mtime), st.st_size))
    assert load_model_source(str(net)).build().__class__.__name__ == "Sequential"


# ------------------------------------------------------------------ payloads in a run directory's manifest


def crafted_run(exported, tmp_path: Path, **model: object) -> Path:
    run = tmp_path / "run"
    shutil.copytree(exported[1], run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["model"].update(model)
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


@pytest.mark.parametrize("digest", ["good", None])
def test_run_directory_naming_foreign_code_is_refused(exported, tmp_path: Path, marker: Path, digest) -> None:
    evil = evil_py(tmp_path, marker)
    run = crafted_run(exported, tmp_path, source=str(evil), sha256=sha(evil) if digest else None)
    with pytest.raises(BnnslimError):
        load_run_model(RunDir(run))
    for args in (("info", "--run", run), ("export", "--run", run, "--no-evaluate"),
                 ("prune", "--run", run, "--keep", "0.5")):
        refused(cli(*args))


def test_unsigned_run_needs_bnnslim_trust(exported, tmp_path: Path) -> None:
    """A run made elsewhere (no signature): refused until `bnnslim trust`, which checks the file's sha256."""
    run = tmp_path / "run"
    shutil.copytree(exported[1], run)
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["model_signature"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    refused(cli("info", "--run", run), "bnnslim trust --run")
    assert cli("info", "--run", run, "--model", str(exported[0])).exit_code == 0
    result = cli("trust", "--run", run)
    assert result.exit_code == 0 and "trusted" in result.output, result.output
    assert cli("info", "--run", run).exit_code == 0


def test_bnnslim_trust_refuses_a_changed_file(exported, tmp_path: Path, marker: Path) -> None:
    evil = evil_py(tmp_path, marker)
    run = crafted_run(exported, tmp_path, source=str(evil), sha256=sha(exported[0]))
    refused(cli("trust", "--run", run), "changed since")
    refused(cli("info", "--run", run))


def test_another_accounts_runs_and_exports_are_not_trusted(exported, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "other-account"))
    with pytest.raises(BnnslimError, match="no valid signature"):
        bnnslim.load(exported[2])
    with pytest.raises(BnnslimError, match="bnnslim trust"):
        load_run_model(RunDir(exported[1]))
    assert bnnslim.load(exported[2], model=str(exported[0])) is not None


def test_key_readable_by_others_is_refused(exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "cfg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    source = tmp_path / "net.py"
    source.write_text(exported[0].read_text())
    binarize(BinarizeOptions(model=str(source), run=tmp_path / "run"))
    key = home / "bnnslim" / "trust.key"
    assert key.stat().st_mode & 0o777 == 0o600
    key.chmod(0o644)
    with pytest.raises(BnnslimError, match="readable by other users"):
        load_run_model(RunDir(tmp_path / "run"))


# ------------------------------------------------------------------ the normal round trip


def test_round_trip_with_the_model_named(exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, run, plain = exported
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    reference = load_run_model(RunDir(run)).model.eval()
    with torch.no_grad():
        expected = reference(x)
    moved = tmp_path / "elsewhere" / "model.safetensors"
    moved.parent.mkdir()
    shutil.copy(plain, moved)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "fresh-account"))  # as a stranger receiving the file
    with pytest.raises(BnnslimError, match="--model"):
        bnnslim.load(moved)
    spec = {"spec": str(source), "named": f"{source}:build_model"}
    ns: dict[str, object] = {}
    exec(compile(source.read_text(), str(source), "exec"), ns)
    for model in (spec["spec"], spec["named"], ns["build_model"], ns["build_model"]()):
        for runtime in ("torch", "packed"):
            loaded = bnnslim.load(moved, model=model, runtime=runtime)
            with torch.no_grad():
                torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
    assert bnnslim.load(moved, trust_source=True) is not None  # the recorded absolute path, sha256 checked
    result = cli("bench", moved, "--model", source, "--repeats", "1", "--warmup", "0", "--no-layers", "--json")
    assert result.exit_code == 0, result.output


def test_own_exports_load_without_naming_the_model(exported) -> None:
    """This account made the run: its files reload as the README shows, `bnnslim.load(path)`."""
    assert bnnslim.load(exported[2]) is not None
    assert cli("bench", exported[1], "--repeats", "1", "--warmup", "0", "--no-layers", "--json").exit_code == 0
