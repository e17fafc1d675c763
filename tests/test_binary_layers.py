"""BinaryConv2d: forward values by hand, alpha per filter, input masks, grouped convs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import builtin_scheme
from torch import nn

from bnnslim.binary.layers import BinaryConv2d

# One input channel, two 2x2 filters, one 2x2 input: every number below is done by hand.
W = torch.tensor([
    [[[0.5, -0.25], [1.0, -0.25]]],   # alpha = (0.5 + 0.25 + 1 + 0.25) / 4 = 0.5, sign [[1,-1],[1,-1]]
    [[[-0.1, -0.1], [0.3, 0.1]]],     # alpha = 0.6 / 4 = 0.15, sign [[-1,-1],[1,1]]
])
B = torch.tensor([0.1, -0.2])
X = torch.tensor([[[[0.3, -2.0], [0.0, 5.0]]]])  # sign [[1,-1],[0,1]]; STE passes where |x| <= 1


def hand_layer(scheme_name: str = "xnor") -> BinaryConv2d:
    conv = nn.Conv2d(1, 2, 2)
    with torch.no_grad():
        conv.weight.copy_(W)
        conv.bias.copy_(B)
    return BinaryConv2d.from_conv(conv, builtin_scheme(scheme_name))


def test_xnor_forward_equals_hand_computation() -> None:
    y = hand_layer("xnor")(X)
    # filter 0: 0.5 * (1*1 + -1*-1 + 1*0 + -1*1) + 0.1 = 0.6
    # filter 1: 0.15 * (-1*1 + -1*-1 + 1*0 + 1*1) - 0.2 = -0.05
    assert torch.allclose(y.flatten(), torch.tensor([0.6, -0.05]))


def test_sign_scheme_has_no_scale() -> None:
    y = hand_layer("sign")(X)
    assert torch.allclose(y.flatten(), torch.tensor([1.1, 0.8]))


def test_binary_weight_is_alpha_per_filter_times_sign() -> None:
    wb = hand_layer("xnor").binary_weight()
    expected = torch.stack([0.5 * torch.tensor([[1.0, -1.0], [1.0, -1.0]]),
                            0.15 * torch.tensor([[-1.0, -1.0], [1.0, 1.0]])]).unsqueeze(1)
    assert torch.allclose(wb, expected)


def test_straight_through_gradients_by_hand() -> None:
    layer = hand_layer("xnor")
    x = X.clone().requires_grad_(True)
    layer(x)[0, 0].sum().backward()  # d y0 / d x and d y0 / d W
    # input: alpha0 * sign(W0) * 1{|x| <= 1}; x = -2 and 5 are clipped
    assert torch.allclose(x.grad[0, 0], torch.tensor([[0.5, 0.0], [0.5, 0.0]]))
    # latent weights of filter 0: sign(W0)/4 * <sign W0, sign x> + alpha0 * sign(x) * 1{|W| <= 1}
    assert torch.allclose(layer.weight.grad[0, 0], torch.tensor([[0.75, -0.75], [0.25, 0.25]]))
    assert torch.count_nonzero(layer.weight.grad[1]) == 0  # filter 1 did not contribute to y0


def test_bireal_uses_approx_sign_gradient_for_inputs() -> None:
    layer = hand_layer("bireal")
    x = torch.tensor([[[[0.25, -0.5], [0.0, 0.9]]]], requires_grad=True)
    layer(x)[0, 0].sum().backward()
    approx = 2 - 2 * x.detach().abs()  # ApproxSign: 1.5, 1, 2, 0.2
    assert torch.allclose(x.grad, 0.5 * torch.tensor([[1.0, -1.0], [1.0, -1.0]]) * approx)


def test_from_conv_copies_hyperparameters_and_keeps_latent_weights_real() -> None:
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, bias=True)
    layer = BinaryConv2d.from_conv(conv, builtin_scheme("xnor"))
    assert isinstance(layer, nn.Conv2d)  # torch-pruning and every other tool sees a conv
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(layer, attr) == getattr(conv, attr)
    assert torch.equal(layer.weight, conv.weight) and torch.equal(layer.bias, conv.bias)
    layer(torch.randn(1, 4, 8, 8))
    assert torch.equal(layer.weight, conv.weight)  # forward does not overwrite the latent weights
    assert len(layer.weight.unique()) > 2
    assert "scheme=xnor" in repr(layer)


def reference(x: torch.Tensor, w: torch.Tensor, kept: torch.Tensor | None, groups: int, padding: int) -> torch.Tensor:
    """sign(x) conv (alpha * sign(W)), alpha = mean |W| of each filter over its kept inputs."""
    out, per_group = w.shape[0], w.shape[1]
    sx = torch.sign(x)
    if kept is not None:
        sx = sx * kept.view(1, -1, 1, 1)
    alphas = []
    for o in range(out):
        g = o // (out // groups)
        inputs = range(g * per_group, (g + 1) * per_group)
        rows = [i - g * per_group for i in inputs if kept is None or kept[i] == 1]
        alphas.append(w[o, rows].abs().mean() if rows else torch.tensor(0.0))
    wb = torch.where(w >= 0, 1.0, -1.0) * torch.stack(alphas).view(-1, 1, 1, 1)
    return F.conv2d(sx, wb, padding=padding, groups=groups)


@pytest.mark.parametrize("groups,cin,cout", [(1, 4, 6), (2, 4, 6), (4, 4, 4), (4, 4, 8)],
                         ids=["plain", "grouped", "depthwise", "depthwise-x2"])
@pytest.mark.parametrize("masked", [False, True])
def test_forward_matches_reference_for_grouped_and_depthwise(groups: int, cin: int, cout: int, masked: bool) -> None:
    layer = BinaryConv2d(cin, cout, 3, padding=1, groups=groups, bias=False, scheme=builtin_scheme("xnor"))
    kept = torch.tensor([1.0, 0.0, 1.0, 1.0]) if masked else None
    layer.input_mask = kept
    x = torch.randn(2, cin, 5, 5)
    assert torch.allclose(layer(x), reference(x, layer.weight.detach(), kept, groups, 1), atol=1e-6)


def test_alpha_uses_kept_inputs_only() -> None:
    layer = BinaryConv2d(3, 2, 1, bias=False, scheme=builtin_scheme("xnor"))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, 0.9, 0.3], [-0.2, 0.6, -0.4]]).view(2, 3, 1, 1))
    layer.input_mask = torch.tensor([1.0, 0.0, 1.0])
    alpha = layer.binary_weight().abs()[:, 0, 0, 0]
    assert torch.allclose(alpha, torch.tensor([0.2, 0.3]))  # (0.1 + 0.3) / 2, (0.2 + 0.4) / 2


@pytest.mark.parametrize("scheme_name", ["xnor", "sign", "bireal"])
def test_masked_conv_equals_conv_with_inputs_removed(scheme_name: str) -> None:
    """Pruning is exact: masking input channels == physically removing them."""
    scheme = builtin_scheme(scheme_name)
    full = BinaryConv2d(5, 4, 3, padding=1, bias=True, scheme=scheme)
    keep = [0, 2, 3]
    full.input_mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    slim = BinaryConv2d(3, 4, 3, padding=1, bias=True, scheme=scheme)
    with torch.no_grad():
        slim.weight.copy_(full.weight[:, keep])
        slim.bias.copy_(full.bias)
    x = torch.randn(2, 5, 6, 6)
    assert torch.allclose(full(x), slim(x[:, keep]), atol=1e-6)
    if scheme_name != "sign":  # with a scale, ignoring the mask in alpha would change the result
        full.input_mask = None
        unmasked_alpha = full.binary_weight()[:, keep]
        assert not torch.allclose(unmasked_alpha, slim.binary_weight())


def test_masked_conv_gradient_equals_removed_conv_gradient() -> None:
    scheme = builtin_scheme("xnor")
    full = BinaryConv2d(4, 3, 3, padding=1, bias=False, scheme=scheme)
    keep = [1, 3]
    full.input_mask = torch.tensor([0.0, 1.0, 0.0, 1.0])
    slim = BinaryConv2d(2, 3, 3, padding=1, bias=False, scheme=scheme)
    with torch.no_grad():
        slim.weight.copy_(full.weight[:, keep])
    x = torch.randn(2, 4, 5, 5)
    full(x).square().sum().backward()
    slim(x[:, keep]).square().sum().backward()
    assert torch.allclose(full.weight.grad[:, keep], slim.weight.grad, atol=1e-5)
    assert torch.count_nonzero(full.weight.grad[:, [0, 2]]) == 0  # masked inputs learn nothing


@pytest.mark.parametrize("scheme_name", ["xnor", "bireal"])
def test_real_weights_step_uses_real_weights_and_binary_inputs_then_restores(scheme_name: str) -> None:
    from bnnslim.binary.two_step import real_weights

    layer = hand_layer(scheme_name)
    model = nn.Sequential(layer)
    binary_out = model(X)
    with real_weights(model) as switched:
        assert switched == 1
        # filter 0: 0.5*1 + -0.25*-1 + 1*0 + -0.25*1 + 0.1 = 0.6; filter 1: -0.1 + 0.1 + 0 + 0.1 - 0.2 = -0.1
        assert torch.allclose(model(X).flatten(), torch.tensor([0.6, -0.1]))
        x = X.clone().requires_grad_(True)
        model(x).sum().backward()  # the activations' straight-through gradient is the scheme's own
        assert x.grad is not None and x.grad[0, 0, 0, 1] == 0  # |x| = 2: outside the STE window
    assert layer.scheme.name == scheme_name and torch.equal(model(X), binary_out)
    with pytest.raises(RuntimeError), real_weights(model):
        raise RuntimeError("training failed")
    assert layer.scheme.name == scheme_name  # restored on an error too
