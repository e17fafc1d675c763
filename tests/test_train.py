"""Training the binary main network: it learns, it resumes exactly, its state round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _helpers import SMALL_CNN, builtin_scheme, toy_splits
from torch import nn
from torch.utils.data import TensorDataset

from bnnslim._state import load_optimizer_state, optimizer_state
from bnnslim.binary.convert import apply_binarization, binary_convs, plan_binarization
from bnnslim.errors import BnnslimError
from bnnslim.model_source import load_model_source
from bnnslim.train import Checkpoint, EpochRecord, StepEvent, TrainConfig, evaluate, make_loader, train_epochs

CPU = torch.device("cpu")


def binary_tiny_cnn() -> nn.Module:
    """examples/small_cnn.py:tiny for 1x28x28, 10 classes, binarized with xnor."""
    source = load_model_source(f"{SMALL_CNN}:tiny")
    model = source.build(num_classes=10, in_channels=1)
    plan = plan_binarization(model, torch.zeros(2, 1, 28, 28))
    return apply_binarization(model, plan.binary, builtin_scheme("xnor"))


def binary_toy_net(seed: int = 0) -> nn.Module:
    """For 1x8x8 toy data, 4 classes; with dropout so that resuming must restore the RNG."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardtanh(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardtanh(),
        nn.Dropout(0.2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    return apply_binarization(model, ["3"], builtin_scheme("xnor"))


def test_training_on_bundled_data_lowers_loss_and_beats_chance(bundled_splits) -> None:
    """40 steps of 32 images of the bundled Fashion-MNIST subset (10 classes: chance is 10%)."""
    torch.manual_seed(0)
    model = binary_tiny_cnn()
    before = evaluate(model, bundled_splits.test, CPU)
    steps: list[StepEvent] = []
    cfg = TrainConfig(epochs=1, lr=5e-3, batch_size=32, steps_per_epoch=40, seed=0)
    result = train_epochs(model, bundled_splits.train, bundled_splits.test, cfg, CPU, on_step=steps.append)
    assert len(steps) == 40 and steps[-1].steps == 40
    first, last = [s.loss for s in steps[:5]], [s.loss for s in steps[-5:]]
    assert sum(last) / 5 < sum(first) / 5 - 0.2
    record = result.history[-1]
    assert record.test_loss < before.loss - 0.3
    assert record.test_accuracy > 0.25 > before.accuracy + 0.05
    for conv in binary_convs(model).values():  # latent weights stay clipped to [-1, 1]
        assert conv.weight.abs().max() <= 1.0


def test_evaluate_counts_top1_accuracy_and_keeps_mode() -> None:
    x = torch.zeros(10, 3)
    y = torch.tensor([0, 0, 0, 1, 2, 0, 1, 2, 2, 0])
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))  # always predicts class 0
    model.train()
    metrics = evaluate(model, TensorDataset(x, y), CPU, batch_size=4)
    assert metrics.accuracy == pytest.approx(0.5) and metrics.count == 10
    expected_loss = torch.nn.functional.cross_entropy(model(x), y).item()
    assert metrics.loss == pytest.approx(expected_loss)
    assert model.training
    with pytest.raises(BnnslimError, match="evaluation set is empty"):
        evaluate(model, TensorDataset(x[:0], y[:0]), CPU)


def test_data_order_depends_only_on_seed_and_epoch() -> None:
    data = TensorDataset(torch.arange(50))

    def order(seed: int, epoch: int, global_seed: int = 123) -> list[int]:
        torch.manual_seed(global_seed)  # whatever the process drew before
        return [int(v) for (b,) in make_loader(data, 10, seed, epoch, shuffle=True) for v in b]

    assert order(0, 1, global_seed=1) == order(0, 1, global_seed=2)  # the global RNG does not matter
    assert sorted(order(0, 1)) == list(range(50))
    assert order(0, 1) != order(0, 2) and order(0, 1) != order(1, 1)


def run(tmp_path: Path, name: str, cfg: TrainConfig, model: nn.Module, resume: bool = False,
        stop_after: int | None = None) -> list[EpochRecord]:
    splits = toy_splits()
    checkpoint = Checkpoint(tmp_path / name / "train.safetensors", cfg)

    def on_epoch(rec: EpochRecord) -> None:
        if stop_after is not None and rec.epoch == stop_after:
            raise KeyboardInterrupt  # the user pressed Ctrl-C after this epoch's checkpoint

    return train_epochs(model, splits.train, splits.test, cfg, CPU, checkpoint, resume, on_epoch=on_epoch).history


def test_resume_equals_uninterrupted_training(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=32, seed=3)
    straight = binary_toy_net(seed=0)
    history = run(tmp_path, "straight", cfg, straight)

    interrupted = binary_toy_net(seed=0)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "resumed", cfg, interrupted, stop_after=1)
    torch.rand(100)  # a new process: the global RNG is elsewhere
    resumed = binary_toy_net(seed=1)  # and the model starts from other weights
    resumed_history = run(tmp_path, "resumed", cfg, resumed, resume=True)

    assert resumed_history == history  # epoch 1 from the checkpoint, epoch 2 trained again
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert not torch.equal(straight.state_dict()["3.weight"], binary_toy_net(seed=0).state_dict()["3.weight"])


def test_resume_with_changed_options_is_an_error(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1, lr=1e-2, batch_size=32)
    run(tmp_path, "r", cfg, binary_toy_net())
    with pytest.raises(BnnslimError, match="--resume with different training options") as err:
        run(tmp_path, "r", TrainConfig(epochs=1, lr=2e-2, batch_size=32), binary_toy_net(), resume=True)
    assert '"lr": 0.01' in str(err.value)  # the fix names the options of the first run


def test_resume_without_checkpoint_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(BnnslimError, match="nothing to resume"):
        run(tmp_path, "none", TrainConfig(epochs=1), binary_toy_net(), resume=True)


def test_checkpoint_is_safetensors_with_json_metadata(tmp_path: Path) -> None:
    from safetensors import safe_open

    cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=64, steps_per_epoch=2)
    history = run(tmp_path, "c", cfg, binary_toy_net())
    with safe_open(str(tmp_path / "c" / "train.safetensors"), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["epoch"] == "2"
    assert json.loads(meta["config"])["lr"] == 0.01
    assert [EpochRecord(**h) for h in json.loads(meta["history"])] == history
    assert "model.3.weight" in keys and "rng.torch" in keys and any(k.startswith("optim.") for k in keys)


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.95)),
    lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True),
], ids=["adam", "sgd-momentum"])
def test_optimizer_state_round_trip(make, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from bnnslim._atomic import save_tensors

    torch.manual_seed(0)
    a = nn.Linear(4, 3)
    b = nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = make(a.parameters()), make(b.parameters())
    x = torch.randn(8, 4)
    for _ in range(3):
        opt_a.zero_grad()
        a(x).square().sum().backward()
        opt_a.step()
    tensors, meta = optimizer_state(opt_a)
    assert isinstance(meta, str) and json.loads(meta)  # plain JSON, no pickle
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    save_tensors(tmp_path / "opt.safetensors", tensors, {"optimizer": meta})  # through a file, as a checkpoint does
    b.load_state_dict(a.state_dict())
    load_optimizer_state(opt_b, load_file(str(tmp_path / "opt.safetensors")), meta)
    assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"]
    for _ in range(2):  # the restored optimizer continues exactly like the original
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


# -- distillation ------------------------------------------------------------------------------

def test_distillation_loss_is_t_squared_kl_of_softened_outputs() -> None:
    from bnnslim.train import distillation_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for temperature in (1.0, 4.0):
        p = torch.softmax(t / temperature, 1)
        q = torch.softmax(s / temperature, 1)
        expected = temperature ** 2 * (p * (p.log() - q.log())).sum(1).mean()
        assert distillation_loss(s, t, temperature).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_loss(s, s.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(s, t, 2.0) > 0
    student = s.clone().requires_grad_(True)
    distillation_loss(student, student.detach(), 3.0).backward()
    assert student.grad.abs().max() < 1e-6  # at the teacher, nothing to learn
    student.grad = None
    distillation_loss(student, t, 3.0).backward()
    assert t.grad is None and student.grad.abs().max() > 0  # the teacher gets no gradient


def test_training_loss_adds_the_weighted_term_only_when_active() -> None:
    from bnnslim.train import Distillation, distillation_loss, training_loss

    g = torch.Generator().manual_seed(1)
    s, t, y = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.randint(0, 4, (6,), generator=g)
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.equal(training_loss(s, y), ce)
    assert torch.equal(training_loss(s, y, t, Distillation(weight=0.0)), ce)
    assert torch.equal(training_loss(s, y, None, Distillation()), ce)
    both = training_loss(s, y, t, Distillation(weight=0.5, temperature=2.0))
    assert both.item() == pytest.approx((ce + 0.5 * distillation_loss(s, t, 2.0)).item(), rel=1e-6)
    with pytest.raises(BnnslimError, match="temperature"):
        Distillation(temperature=0.0)


def test_fit_trains_an_in_memory_model_on_a_users_loader_with_a_teacher() -> None:
    from torch.utils.data import DataLoader

    from bnnslim.train import Teacher, fit

    splits = toy_splits()
    teacher_net = binary_toy_net(seed=0)
    fit(teacher_net, DataLoader(splits.train, batch_size=32, shuffle=True), epochs=3, lr=1e-2)
    teacher = Teacher.copy_of(teacher_net)
    frozen = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    student = binary_toy_net(seed=1)
    before = evaluate(student, splits.test, CPU)
    events: list[StepEvent] = []
    losses = fit(student, DataLoader(splits.train, batch_size=32, shuffle=True), steps=20, lr=1e-2,
                 teacher=teacher, on_step=events.append)
    assert len(losses) == 20 and [e.step for e in events] == list(range(1, 21))  # exactly `steps`, cycling
    assert evaluate(student, splits.test, CPU).loss < before.loss
    for k, v in teacher.module.state_dict().items():
        assert torch.equal(v, frozen[k]), f"the teacher changed: {k}"
    assert len(fit(student, DataLoader(splits.train, batch_size=64), epochs=1)) == 4  # 256 / 64


def test_evaluation_restores_the_training_mode_even_when_the_forward_fails() -> None:
    """A failing forward pass inside bnnslim's checks must not leave the user's model in eval mode."""
    from bnnslim.modes import eval_outputs

    class Fails(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert not self.training  # evaluated in eval mode ...
            raise RuntimeError("boom")

    model = Fails().train()
    with pytest.raises(RuntimeError, match="boom"):
        eval_outputs(model, torch.zeros(1))
    assert model.training  # ... and its mode given back
    assert not eval_outputs(nn.BatchNorm1d(2).eval(), torch.ones(3, 2)).requires_grad
