"""The in-memory API: nn.Module in, nn.Module out, no run directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import bnnslim.api as api
from bnnslim.binary.layers import BinaryConv2d
from bnnslim.errors import BnnslimError
from bnnslim.graph import build_graph
from bnnslim.prune.groups import find_groups
from bnnslim.zoo import resnet18, small_cnn


def _half_masks(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    groups = find_groups(model, build_graph(model, x), x).groups
    assert groups
    masks = {}
    for g in groups:
        mask = torch.ones(g.size)
        mask[::2] = 0
        masks[g.id] = mask
    return masks


def test_binarize_keeps_first_and_last_real_and_leaves_the_original_alone() -> None:
    model = small_cnn.tiny()
    x = torch.randn(2, 1, 28, 28)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    binary, plan = api.binarize(model, x)
    assert plan.real == {"0.0": "first layer"}
    assert sorted(n for n, m in binary.named_modules() if isinstance(m, BinaryConv2d)) == plan.binary
    assert not any(isinstance(m, BinaryConv2d) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the latent weights start from the model's weights
    assert torch.equal(binary.get_submodule("3.0").weight, model.get_submodule("3.0").weight)


def test_binarize_unknown_scheme_is_a_clear_error() -> None:
    with pytest.raises(BnnslimError, match="scheme"):
        api.binarize(small_cnn.tiny(), torch.randn(1, 1, 28, 28), scheme="nosuch")


@pytest.mark.parametrize("module", [small_cnn, resnet18], ids=["small_cnn", "resnet18"])
def test_slim_removes_filters_and_computes_what_the_masked_model_computes(module: object) -> None:
    model = module.tiny()  # type: ignore[attr-defined]
    shape = module.INPUT_SHAPE  # type: ignore[attr-defined]
    x = torch.randn(4, *shape)
    binary, _ = api.binarize(model, x)
    masks = _half_masks(binary, x)
    slim = api.slim(binary, masks, x)
    before = sum(m.out_channels for m in binary.modules() if isinstance(m, BinaryConv2d))
    after = sum(m.out_channels for m in slim.modules() if isinstance(m, BinaryConv2d))
    assert after < before
    # the original is untouched and still has its masks' worth of channels
    assert sum(m.out_channels for m in binary.modules() if isinstance(m, BinaryConv2d)) == before
    assert all(m.input_mask is None for m in binary.modules() if isinstance(m, BinaryConv2d))


def test_slim_refuses_masks_of_another_model() -> None:
    x = torch.randn(2, 1, 28, 28)
    binary, _ = api.binarize(small_cnn.tiny(), x)
    with pytest.raises(BnnslimError, match="not a prunable group"):
        api.slim(binary, {"features.3": torch.ones(8)}, x)


def test_save_and_load_an_in_memory_model_round_trip(tmp_path: Path) -> None:
    import bnnslim

    x = torch.randn(2, 1, 28, 28)
    binary, _ = api.binarize(small_cnn.tiny(), x)
    slim = api.slim(binary, _half_masks(binary, x), x).eval()
    for packed in (False, True):
        path = api.save(slim, tmp_path / f"m{packed}.safetensors", input_shape=(1, 28, 28), packed=packed)
        reloaded = bnnslim.load(path, model=small_cnn.tiny)
        torch.testing.assert_close(reloaded(x), slim(x), atol=1e-5, rtol=0)


def test_a_file_saved_from_memory_needs_the_callers_model_code(tmp_path: Path) -> None:
    import bnnslim

    x = torch.randn(2, 1, 28, 28)
    binary, _ = api.binarize(small_cnn.tiny(), x)
    path = api.save(binary, tmp_path / "m.safetensors", input_shape=(1, 28, 28))
    with pytest.raises(BnnslimError, match="built in memory"):
        bnnslim.load(path)


def test_save_refuses_a_model_without_binary_convs(tmp_path: Path) -> None:
    with pytest.raises(BnnslimError, match="no binary conv"):
        api.save(small_cnn.tiny(), tmp_path / "m.safetensors", input_shape=(1, 28, 28))
    assert not (tmp_path / "m.safetensors").exists()


def test_package_exports_the_api() -> None:
    import bnnslim

    for name in ("binarize", "fit", "learn_masks", "PruneSchedule", "slim", "save", "load", "dataset"):
        assert callable(getattr(bnnslim, name)), name
