"""What is masked is what gets removed: masked model == slimmed model, on every architecture."""

from __future__ import annotations

import copy

import pytest
import torch
from _models import MODELS, TORCHVISION, binarized, torchvision_model

from bnnslim.prune.masking import MaskController
from bnnslim.prune.slim import slim


def random_masks(groups, seed: int = 0, keep: float = 0.5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for grp in groups:
        mask = (torch.rand(grp.size, generator=g) < keep).float()
        mask[torch.randint(grp.size, (1,), generator=g)] = 1.0  # never empty
        masks[grp.id] = mask
    return masks


def masked_and_slim(b, masks: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """Outputs of the masked model and of a slimmed copy, and the copy."""
    controller = MaskController(b.model, b.groups)
    for gid, m in masks.items():
        controller.set_fixed(gid, m)
    with torch.no_grad():
        masked_out = b.model(b.example)
    controller.remove()
    slim_model = copy.deepcopy(b.model)
    slim(slim_model, b.groups, masks, b.example)
    with torch.no_grad():
        slim_out = slim_model(b.example)
    return masked_out, slim_out, slim_model


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_masked_model_equals_model_with_channels_removed(arch: str) -> None:
    b = MODELS[arch]()
    masks = random_masks(b.groups)
    masked_out, slim_out, slim_model = masked_and_slim(b, masks)
    assert slim_out.shape == masked_out.shape
    torch.testing.assert_close(slim_out, masked_out, rtol=1e-4, atol=1e-4)
    # and the channels are really gone
    modules = dict(slim_model.named_modules())
    for grp in b.groups:
        for producer in grp.producers:
            assert modules[producer].out_channels == int(masks[grp.id].sum())


def test_masking_only_the_producer_would_leak_through_batchnorm_and_sign() -> None:
    """The reason for masking consumers: a zeroed filter becomes BN's constant, then +-1 after sign."""
    b = MODELS["plain"]()
    grp = b.groups[0]
    mask = torch.ones(grp.size)
    mask[: grp.size // 2] = 0
    producer = dict(b.model.named_modules())[grp.producers[0]]
    slim_model = copy.deepcopy(b.model)
    slim(slim_model, [grp], {grp.id: mask}, b.example)
    with torch.no_grad():
        expected = slim_model(b.example)
        hook = producer.register_forward_hook(lambda _m, _i, out: out * mask.view(1, -1, 1, 1))
        producer_only = b.model(b.example)
        hook.remove()
    assert not torch.allclose(producer_only, expected, atol=1e-3)


def test_masks_of_several_groups_meeting_in_one_consumer_combine() -> None:
    """In the concat model two groups feed one conv; each writes only its own input positions."""
    b = MODELS["concat"]()
    controller = MaskController(b.model, b.groups)
    a, bb = b.groups[0], b.groups[1]
    controller.set_fixed(a.id, torch.zeros(a.size))
    controller.set_fixed(bb.id, torch.ones(bb.size))
    mask = controller.input_mask("mix.0", 16, torch.zeros(1))
    controller.remove()
    assert mask is not None
    assert mask.tolist() == [0.0] * 6 + [1.0] * 10


@pytest.mark.parametrize("name", [n if n == "resnet18" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in TORCHVISION])  # ResNet-18 in the quick suite, all six in CI
def test_torchvision_masked_model_equals_slimmed_model(name: str) -> None:
    b = binarized(torchvision_model(name), (3, 32, 32))
    assert b.groups, f"{name} has no prunable group"
    masked_out, slim_out, _ = masked_and_slim(b, random_masks(b.groups))
    torch.testing.assert_close(slim_out, masked_out, rtol=1e-4, atol=1e-4)
