"""The layer-wise schedule end to end on the bundled data (tiny budgets)."""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
from _models import ConcatNet
from safetensors.torch import load_file
from typer.testing import CliRunner

from bnnslim.cli.app import app
from bnnslim.errors import BnnslimError
from bnnslim.plugins import reset_plugin_manager
from bnnslim.rundir import RunDir
from bnnslim.stages.binarize import BinarizeOptions, binarize
from bnnslim.stages.prune import PruneOptions, prune
from bnnslim.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
CONCAT_FILE = "import torch\nfrom torch import nn\n\n\n" + inspect.getsource(ConcatNet)
QUICK = {"select_steps": 3, "retrain_steps": 3, "batch_size": 32, "heldout": 64}


def make_run(tmp_path_factory: pytest.TempPathFactory, spec: str, name: str) -> Path:
    run = tmp_path_factory.mktemp(name) / "run"
    binarize(BinarizeOptions(model=spec, run=run, data="fashion-mnist-mini",
                             train=TrainConfig(epochs=1, steps_per_epoch=5, batch_size=32)))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    concat = tmp_path_factory.mktemp("src") / "concat.py"
    concat.write_text(CONCAT_FILE)
    return {
        "plain": make_run(tmp_path_factory, str(REPO / "examples/small_cnn.py:tiny"), "plain"),
        "residual": make_run(tmp_path_factory, str(REPO / "examples/resnet18.py:tiny"), "residual"),
        "concat": make_run(tmp_path_factory, str(concat), "concat"),
    }


def fresh(runs: dict[str, Path], arch: str, tmp_path: Path) -> Path:
    target = tmp_path / arch
    shutil.copytree(runs[arch], target)
    return target


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("arch", ["plain", "residual", "concat"])
@pytest.mark.parametrize("keep", [0.3, 0.5, 0.8])
def test_kept_filter_count_is_exact(runs, tmp_path, arch: str, keep: float) -> None:
    run = fresh(runs, arch, tmp_path)
    result = prune(run, PruneOptions(keep=keep, strategy="random", **QUICK))
    assert result.kept_filters == round(keep * result.total_filters)
    counted = sum(int(result.masks[g.id].sum()) * len(g.producers) for g in result.groups)
    assert counted == result.kept_filters
    assert all(int(m.sum()) >= 1 for m in result.masks.values()), "a layer was emptied"
    manifest = RunDir(run).read_manifest()
    assert manifest["prune"]["filters_kept"] == result.kept_filters
    saved = load_file(str(run / "pruned.safetensors"))
    for g in result.groups:
        assert torch.equal(saved[f"mask.{g.id}"], result.masks[g.id])


def test_subsidiary_learns_a_split_and_saves_selectors(runs, tmp_path) -> None:
    run = fresh(runs, "plain", tmp_path)
    result = prune(run, PruneOptions(keep=0.5, **QUICK))
    assert result.kept_filters == round(0.5 * result.total_filters)
    saved = load_file(str(run / "pruned.safetensors"))
    for g in result.groups:
        selector = saved[f"state.selector.{g.id}"]
        kept = saved[f"mask.{g.id}"].bool()
        assert selector.shape == (g.size,)
        if 0 < int(kept.sum()) < g.size:  # the kept filters are the top selectors
            assert selector[kept].min() >= selector[~kept].max()


def test_groups_are_processed_bottom_up_on_a_residual_model(runs, tmp_path) -> None:
    run = fresh(runs, "residual", tmp_path)
    seen: list[str] = []
    prune(run, PruneOptions(keep=0.7, strategy="l1", **QUICK),
          on_event=lambda ev: seen.append(ev.group) if ev.phase == "done" else None)
    assert seen == ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.conv2", "layer2.1.conv1",
                    "layer3.0.conv1", "layer3.0.conv2", "layer3.1.conv1", "layer4.0.conv1", "layer4.0.conv2",
                    "layer4.1.conv1"]


def interrupt_after_first_group(run: Path, opts: PruneOptions) -> None:
    """Prune until the first group is done, then stop as Ctrl-C would (its checkpoint written)."""

    def stop(ev) -> None:  # type: ignore[no-untyped-def]
        if ev.phase == "done" and ev.index == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prune(run, opts, on_event=stop)


def test_resume_after_interruption_equals_uninterrupted_run(runs, tmp_path) -> None:
    opts = PruneOptions(keep=0.5, **QUICK)
    full_run = fresh(runs, "plain", tmp_path / "a")
    full = prune(full_run, opts)

    cut_run = fresh(runs, "plain", tmp_path / "b")

    interrupt_after_first_group(cut_run, opts)
    resumed = prune(cut_run, opts, resume=True)
    assert resumed.resumed_after == 1
    for g in full.groups:
        assert torch.equal(full.masks[g.id], resumed.masks[g.id])
    a = load_file(str(full_run / "pruned.safetensors"))
    b = load_file(str(cut_run / "pruned.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.accuracy_after == full.accuracy_after


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("args, message", [
    (["--keep", "0"], "outside (0, 1]"),
    (["--keep", "1.5"], "outside (0, 1]"),
    (["--keep", "0.02"], "every layer must keep at least"),
    (["--keep", "0.5", "--strategy", "nope"], "choose one of: alpha, bn, greedy, l1, random, subsidiary"),
    (["--keep", "0.5", "--exclude", "*"], "no prunable group"),
    (["--keep", "0.5", "--resume"], "nothing to resume"),
])
def test_bad_prune_input_is_one_clear_line_and_leaves_the_run_intact(runs, tmp_path, args, message) -> None:
    reset_plugin_manager()  # the module's fixture may have built it before external plugins were switched off
    run = fresh(runs, "plain", tmp_path)
    before = tree_digest(run)
    result = cli("prune", "--run", str(run), *args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert tree_digest(run) == before


def test_prune_without_a_binarized_model_says_what_to_run(tmp_path) -> None:
    result = cli("prune", "--keep", "0.5", "--run", str(tmp_path / "empty"))
    assert result.exit_code == 1
    assert "bnnslim binarize" in result.output


def test_resume_with_changed_options_is_refused(runs, tmp_path) -> None:
    run = fresh(runs, "plain", tmp_path)

    def stop(ev) -> None:
        if ev.phase == "done":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prune(run, PruneOptions(keep=0.5, **QUICK), on_event=stop)
    before = tree_digest(run)
    result = cli("prune", "--run", str(run), "--keep", "0.6", "--resume", "--select-steps", "3",
                 "--retrain-steps", "3", "--batch-size", "32")
    assert result.exit_code == 1
    assert "different options than the interrupted run" in result.output
    assert "keep was 0.5, now 0.6" in result.output
    assert "--keep 0.5" in result.output  # the fix names the flag to repeat
    assert "Traceback" not in result.output
    assert tree_digest(run) == before


def test_a_run_interrupted_before_retrain_scope_existed_resumes_with_the_scope_it_used(runs, tmp_path) -> None:
    """Checkpoints written before --retrain-scope retrained upward: --resume says so and continues with it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    opts = PruneOptions(keep=0.5, retrain_scope="upward", **QUICK)
    full = prune(fresh(runs, "plain", tmp_path / "a"), opts)
    run = fresh(runs, "plain", tmp_path / "b")

    interrupt_after_first_group(run, opts)
    checkpoint = run / "checkpoints" / "prune.safetensors"
    with safe_open(str(checkpoint), "pt") as f:  # as the version before the option wrote it
        meta = dict(f.metadata())
    tensors = load_file(str(checkpoint))
    old_options = json.loads(meta["options"])
    del old_options["retrain_scope"]
    meta["options"] = json.dumps(old_options, sort_keys=True)
    save_file(tensors, str(checkpoint), metadata=meta)

    result = cli("prune", "--run", str(run), "--keep", "0.5", "--resume", "--select-steps", "3",
                 "--retrain-steps", "3", "--batch-size", "32")
    assert result.exit_code == 1
    assert 'retrain_scope was "upward", now "all"' in result.output
    assert "--retrain-scope upward" in result.output
    resumed = prune(run, opts, resume=True)
    assert resumed.resumed_after == 1
    assert resumed.accuracy_after == full.accuracy_after


def test_prune_command_prints_the_per_layer_report(runs, tmp_path) -> None:
    run = fresh(runs, "plain", tmp_path)
    result = cli("prune", "--run", str(run), "--keep", "0.5", "--select-steps", "2", "--retrain-steps", "2",
                 "--batch-size", "32")
    assert result.exit_code == 0, result.output
    assert "filters before" in result.output and "total" in result.output
    assert "test accuracy" in result.output


def test_finetune_trains_every_layer_and_keeps_the_masks(runs, tmp_path) -> None:
    from bnnslim.prune.schedule import PruneSchedule, ScheduleConfig
    from bnnslim.run_model import load_run_model

    loaded = load_run_model(RunDir(runs["plain"]))
    model = loaded.model
    from bnnslim.plugins import get_dataset

    train = get_dataset("fashion-mnist-mini").build(None).train
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)
    schedule = PruneSchedule(model, loaded.example(), ScheduleConfig(keep=0.5, strategy="l1", select_steps=1,
                                                                     retrain_steps=1, finetune_steps=4))
    for _ in schedule:
        schedule.select(loader)
        schedule.retrain()
    masks = {k: v.clone() for k, v in schedule.masks.items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    schedule.finetune(loader)
    changed = {k.rsplit(".", 1)[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert {"0.0", "0.1", "8"} <= changed, "finetuning trains the whole network, the first layers too"
    assert schedule.controller.fixed_masks().keys() == masks.keys()
    for gid, m in schedule.controller.fixed_masks().items():
        assert torch.equal(m, masks[gid]), "a mask changed during finetuning"
    assert schedule.done
    closed = schedule.close()
    assert all(torch.equal(closed[k], masks[k]) for k in masks)


@pytest.mark.parametrize("scope", ["upward", "all"])
def test_retrain_scope_decides_whether_the_layers_below_the_group_train(runs, scope: str) -> None:
    from bnnslim.plugins import get_dataset
    from bnnslim.prune.schedule import PruneSchedule, ScheduleConfig
    from bnnslim.run_model import load_run_model

    loaded = load_run_model(RunDir(runs["plain"]))
    model = loaded.model
    train = get_dataset("fashion-mnist-mini").build(None).train
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)
    schedule = PruneSchedule(model, loaded.example(), ScheduleConfig(
        keep=0.5, strategy="l1", select_steps=1, retrain_steps=3, finetune_steps=0, retrain_scope=scope))
    second = schedule.groups[1]
    schedule.select(loader)
    schedule.retrain()  # the first group
    before = {k: v.clone() for k, v in model.state_dict().items()}
    schedule.select(loader)
    schedule.retrain()  # the second: its root and what follows always train
    changed = {k.rsplit(".", 1)[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    below = {"0.0", "0.1"}  # the real first conv and its BatchNorm, below every group
    assert set(second.producers) <= changed and "8" in changed
    if scope == "all":
        assert below <= changed, "--retrain-scope all trains the layers below the group too"
    else:
        assert not below & changed, "the paper's rule keeps the layers below the group (and their BN) fixed"
    schedule.close()


def test_unknown_retrain_scope_is_refused_before_any_work() -> None:
    from _models import MODELS

    from bnnslim.prune.schedule import PruneSchedule, ScheduleConfig

    b = MODELS["plain"]()
    with pytest.raises(BnnslimError, match="retrain-scope 'below'.*all, upward"):
        PruneSchedule(b.model, b.example, ScheduleConfig(keep=0.5, retrain_scope="below"))


def test_resume_equals_uninterrupted_run_with_distillation_and_finetuning(runs, tmp_path) -> None:
    opts = PruneOptions(keep=0.5, finetune_steps=3, distill=1.0, temperature=2.0, retrain_scope="upward", **QUICK)
    full_run = fresh(runs, "plain", tmp_path / "a")
    full = prune(full_run, opts)
    for stop_at in ("group", "finetune"):
        cut_run = fresh(runs, "plain", tmp_path / stop_at)

        def stop(ev, stop_at=stop_at) -> None:
            if stop_at == "group" and ev.phase == "done" and ev.index == 1:
                raise KeyboardInterrupt
            if stop_at == "finetune" and ev.phase == "finetune" and ev.step == 2:
                raise KeyboardInterrupt  # inside finetuning: it restarts from the last group's checkpoint

        with pytest.raises(KeyboardInterrupt):
            prune(cut_run, opts, on_event=stop)
        resumed = prune(cut_run, opts, resume=True)
        assert resumed.resumed_after == (2 if stop_at == "group" else 3)
        a = load_file(str(full_run / "pruned.safetensors"))
        b = load_file(str(cut_run / "pruned.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (stop_at, k)
        assert resumed.accuracy_after == full.accuracy_after
    manifest = RunDir(full_run).read_manifest()["prune"]
    assert manifest["teacher"]["temperature"] == 2.0 and "KL" in manifest["loss"]
    assert manifest["options"]["finetune_steps"] == 3 and manifest["retrain_scope"] == "upward"


def test_distillation_changes_the_result_and_is_recorded(runs, tmp_path, monkeypatch) -> None:
    plain = prune(fresh(runs, "plain", tmp_path / "p"), PruneOptions(keep=0.5, distill=0.0, finetune_steps=2, **QUICK))
    run = fresh(runs, "plain", tmp_path / "d")
    taught = prune(run, PruneOptions(keep=0.5, distill=1.0, finetune_steps=2, **QUICK))
    assert RunDir(run).read_manifest()["prune"]["teacher"]["network"].startswith("the unpruned binary network")
    assert plain.kept_filters == taught.kept_filters
    assert any(a.retrain_loss != b.retrain_loss for a, b in zip(plain.records, taught.records, strict=True))

    # the user sees which teacher and which loss trained the weights: in `bnnslim info` and the export report
    from bnnslim.cli import _common
    from bnnslim.stages.export import export

    monkeypatch.setattr(_common.console, "width", 250)
    shown = [" ".join(line.replace("│", " ").split()) for line in
             CliRunner().invoke(app, ["info", str(run)]).output.splitlines()]
    assert "prune loss cross-entropy + 1 * T^2 * KL(teacher || student) at T = 4; teacher: the unpruned binary " \
           "network of this run (binary.safetensors), frozen" in shown
    assert "prune retraining 3 steps per group, every layer" in shown
    assert "prune fine-tuning 2 steps, masks fixed" in shown
    training = json.loads(export(run, ("plain",), evaluate_data=False).report_path.read_text())["training"]
    assert training["prune"]["loss"].startswith("cross-entropy + 1 * T^2 * KL")
    assert training["prune"]["teacher"]["network"].startswith("the unpruned binary network")
    assert training["prune"]["finetune_steps"] == 2 and training["binarize"]["teacher"] is None
    assert training["prune"]["retrain_scope"] == "all" and training["prune"]["retrain_steps"] == 3


def float_twin_weights(path: Path, spec: str = "examples/small_cnn.py:tiny", seed: int = 0) -> Path:
    """Float weights of the model a run was binarized from (as `binarize --teacher-epochs` saves them)."""
    from safetensors.torch import save_file

    from bnnslim.model_source import load_model_source

    torch.manual_seed(seed)
    twin = load_model_source(str(REPO / spec)).build(num_classes=10, in_channels=1)
    save_file({k: v.contiguous() for k, v in twin.state_dict().items()}, str(path))
    return path


def test_prune_distils_from_the_float_twin_named_by_teacher(runs, tmp_path, monkeypatch) -> None:
    weights = float_twin_weights(tmp_path / "teacher.safetensors")
    quick = ["--select-steps", "3", "--retrain-steps", "3", "--finetune-steps", "2", "--batch-size", "32"]
    by_binary, by_float = fresh(runs, "plain", tmp_path / "b"), fresh(runs, "plain", tmp_path / "f")
    runner = CliRunner()
    ok = runner.invoke(app, ["prune", "--keep", "0.5", "--run", str(by_binary), "--distill", "1", *quick])
    assert ok.exit_code == 0, ok.output
    ok = runner.invoke(app, ["prune", "--keep", "0.5", "--run", str(by_float), "--teacher", str(weights), *quick])
    assert ok.exit_code == 0, ok.output
    recorded = RunDir(by_float).read_manifest()["prune"]
    # --teacher turns distillation on (weight 1) and the manifest names the file and its digest
    assert recorded["teacher"]["network"] == "the float model with the given weights"
    assert recorded["teacher"]["weight"] == 1.0 and recorded["options"]["teacher"] == str(weights)
    assert recorded["teacher"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    binary_taught = RunDir(by_binary).read_manifest()["prune"]
    assert [g["retrain_loss"] for g in recorded["groups"]] != [g["retrain_loss"] for g in binary_taught["groups"]]
    from bnnslim.cli import _common

    monkeypatch.setattr(_common.console, "width", 400)
    shown = " ".join(runner.invoke(app, ["info", str(by_float)]).output.replace("│", " ").split())
    assert f"teacher: the float model with the given weights ({weights})" in shown

    # --resume with the float teacher ends where the uninterrupted run ended
    cut = fresh(runs, "plain", tmp_path / "cut")
    opts = PruneOptions(keep=0.5, finetune_steps=2, distill=1.0, teacher=str(weights), **QUICK)

    def stop(ev) -> None:  # type: ignore[no-untyped-def]
        if ev.phase == "done" and ev.index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prune(cut, opts, on_event=stop)
    uninterrupted = fresh(runs, "plain", tmp_path / "full")
    full = prune(uninterrupted, opts)
    resumed = prune(cut, opts, resume=True)
    assert resumed.resumed_after == 2 and resumed.accuracy_after == full.accuracy_after
    a, b = load_file(str(uninterrupted / "pruned.safetensors")), load_file(str(cut / "pruned.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # other weights at the same path: --resume refuses instead of mixing two teachers
    changed = fresh(runs, "plain", tmp_path / "changed")
    with pytest.raises(KeyboardInterrupt):
        prune(changed, opts, on_event=stop)
    float_twin_weights(weights, seed=1)
    with pytest.raises(BnnslimError, match="another teacher"):
        prune(changed, opts, resume=True)

    # a teacher with distillation off, a missing file, or another model's weights: one line, no traceback
    for args, words in ((["--teacher", str(weights), "--distill", "0"], "distillation is off"),
                        (["--teacher", str(tmp_path / "nope.safetensors")], "not found"),
                        (["--teacher", str(float_twin_weights(tmp_path / "other.safetensors",
                                                              "examples/nin.py"))], "teacher")):
        bad = runner.invoke(app, ["prune", "--keep", "0.5", "--run", str(fresh(runs, "plain", tmp_path / "x")),
                                  *args, *quick])
        assert bad.exit_code != 0 and "Traceback" not in bad.output, bad.output
        assert words in bad.output, bad.output
        shutil.rmtree(tmp_path / "x")


def test_learn_masks_on_an_in_memory_model_with_the_users_loader(tmp_path, monkeypatch) -> None:
    from _models import MODELS
    from torch.utils.data import DataLoader

    from bnnslim.plugins import get_dataset
    from bnnslim.prune.masking import MaskController
    from bnnslim.prune.schedule import learn_masks
    from bnnslim.prune.slim import slim

    monkeypatch.chdir(tmp_path)
    b = MODELS["plain"]()
    train = get_dataset("fashion-mnist-mini").build(None).train
    loader = DataLoader(torch.utils.data.Subset(train, range(256)), batch_size=32, shuffle=True)
    events = []
    masks = learn_masks(b.model, b.example, loader, keep=0.5, select_steps=2, retrain_steps=2, finetune_steps=2,
                        on_event=events.append)
    assert list(tmp_path.iterdir()) == [], "no run directory, no files"
    assert set(masks) == {g.id for g in b.groups}
    kept = sum(int(masks[g.id].sum()) * len(g.producers) for g in b.groups)
    assert kept == round(0.5 * sum(g.filters for g in b.groups))
    assert {e.phase for e in events} >= {"select", "retrain", "finetune", "done"}
    assert all(not m._forward_pre_hooks for m in b.model.modules()), "hooks left on the model"
    controller = MaskController(b.model, b.groups)
    for gid, m in masks.items():
        controller.set_fixed(gid, m)
    b.model.eval()
    with torch.no_grad():
        masked = b.model(b.example)
    controller.remove()
    slim(b.model, b.groups, masks, b.example)
    with torch.no_grad():
        assert torch.allclose(b.model(b.example), masked, atol=1e-4)


def test_reported_accuracy_is_the_masked_networks(runs, tmp_path) -> None:
    from bnnslim.plugins import get_dataset
    from bnnslim.prune.masking import MaskController
    from bnnslim.run_model import load_run_model
    from bnnslim.train import evaluate

    run = fresh(runs, "plain", tmp_path)
    result = prune(run, PruneOptions(keep=0.3, strategy="l1", finetune_steps=2, **QUICK))
    loaded = load_run_model(RunDir(run), weights=run / "pruned.safetensors")
    controller = MaskController(loaded.model, result.groups)
    for gid, m in result.masks.items():
        controller.set_fixed(gid, m)
    test = get_dataset("fashion-mnist-mini").build(None).test
    assert evaluate(loaded.model, test, torch.device("cpu")).accuracy == result.accuracy_after
    controller.remove()
    assert evaluate(loaded.model, test, torch.device("cpu")).accuracy != result.accuracy_after


def test_a_teacher_given_to_learn_masks_is_used_and_never_trained() -> None:
    from _models import MODELS
    from torch.utils.data import DataLoader, TensorDataset

    from bnnslim.prune.schedule import learn_masks

    b = MODELS["plain"]()
    teacher = MODELS["plain"]().model
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g))
    learn_masks(b.model, b.example, DataLoader(data, batch_size=16), keep=0.5, strategy="l1", teacher=teacher,
                select_steps=1, retrain_steps=2, finetune_steps=2)
    assert len(calls) == 3 * 2 + 2  # every retraining and fine-tuning step asked the teacher
    assert all(torch.equal(v, frozen[k]) for k, v in teacher.state_dict().items())
