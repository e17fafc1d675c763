"""Sign functions: forward values and straight-through gradients on known tensors."""

from __future__ import annotations

import pytest
import torch

from bnnslim.binary.ste import approx_sign, mean_abs_scale, no_scale, ste_sign, ste_sign_weight

X = [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]
UPSTREAM = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]  # not all ones: the STE must scale the incoming gradient


def forward_and_grad(fn, values=X, upstream=UPSTREAM) -> tuple[list[float], list[float]]:
    x = torch.tensor(values, requires_grad=True)
    y = fn(x)
    y.backward(torch.tensor(upstream))
    return y.detach().tolist(), x.grad.tolist()


def test_ste_sign_forward_keeps_zero_and_gradient_is_clipped_identity() -> None:
    y, g = forward_and_grad(ste_sign)
    assert y == [-1.0, -1.0, -1.0, 0.0, 1.0, 1.0, 1.0]
    # 1{|x| <= 1} times the upstream gradient: |x| == 1 still passes
    assert g == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0]


def test_approx_sign_gradient_is_bireal_piecewise_linear() -> None:
    y, g = forward_and_grad(approx_sign)
    assert y == [-1.0, -1.0, -1.0, 0.0, 1.0, 1.0, 1.0]
    # max(0, 2 - 2|x|) * upstream: 0 at |x| >= 1, 1 at |x| = 0.5, 2 at 0
    assert g == [0.0, 0.0, 3.0, 8.0, 5.0, 0.0, 0.0]


def test_ste_sign_weight_never_gives_zero() -> None:
    y, g = forward_and_grad(ste_sign_weight)
    assert y == [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]  # w = 0 -> +1, so weights pack into one bit
    assert g == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0]


@pytest.mark.parametrize("fn", [ste_sign, approx_sign, ste_sign_weight])
def test_sign_functions_keep_shape_and_dtype(fn) -> None:
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    y = fn(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    assert set(y.unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_mean_abs_scale_is_mean_abs_per_output_filter() -> None:
    w = torch.tensor([
        [[[1.0, -3.0]], [[0.5, 0.5]]],     # filter 0: |w| sums to 5 over 4 entries
        [[[-0.2, 0.2]], [[-0.2, -0.2]]],   # filter 1: 0.8 / 4
    ])  # [out=2, in=2, 1, 2]
    alpha = mean_abs_scale(w, None)
    assert alpha.shape == (2, 1, 1, 1)
    assert torch.allclose(alpha.flatten(), torch.tensor([1.25, 0.2]))


def test_mean_abs_scale_averages_over_kept_inputs_only() -> None:
    w = torch.tensor([
        [[[1.0, -3.0]], [[0.5, 0.5]], [[2.0, 2.0]]],
        [[[-0.2, 0.2]], [[-0.2, -0.2]], [[9.0, 9.0]]],
    ])  # [out=2, in=3, 1, 2]
    kept = torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    alpha = mean_abs_scale(w, kept)
    # filter 0: (1 + 3 + 2 + 2) / 4; filter 1: (0.2 + 0.2 + 9 + 9) / 4
    assert torch.allclose(alpha.flatten(), torch.tensor([2.0, 4.6]))
    # the same as the plain mean with input channel 1 physically removed
    assert torch.allclose(alpha, mean_abs_scale(w[:, [0, 2]], None))


def test_mean_abs_scale_passes_gradient_to_latent_weights() -> None:
    w = torch.tensor([[[[0.5, -0.25]], [[1.0, 0.0]]]], requires_grad=True)  # [1, 2, 1, 2]
    mean_abs_scale(w, None).sum().backward()
    assert w.grad.flatten().tolist() == [0.25, -0.25, 0.25, 0.0]  # sign(w) / 4


def test_no_scale_means_no_alpha() -> None:
    assert no_scale(torch.randn(4, 3, 3, 3), None) is None
