"""Built-in binarization schemes."""

from __future__ import annotations

from collections.abc import Iterator

from bnnslim.hookspecs import hookimpl
from bnnslim.plugin_types import SchemeSpec


@hookimpl
def bnnslim_schemes() -> Iterator[SchemeSpec]:
    from bnnslim.binary.ste import approx_sign, mean_abs_scale, no_scale, ste_sign, ste_sign_weight

    yield SchemeSpec(
        name="xnor",
        description="XNOR-Net (Rastegari 2016): sign weights x per-filter mean|W|, sign activations, "
                    "clipped-identity STE",
        binarize_input=ste_sign,
        binarize_weight=ste_sign_weight,
        scale=mean_abs_scale,
    )
    yield SchemeSpec(
        name="sign",
        description="BinaryNet (Courbariaux 2016): sign weights without scale, sign activations, clipped-identity STE",
        binarize_input=ste_sign,
        binarize_weight=ste_sign_weight,
        scale=no_scale,
    )
    yield SchemeSpec(
        name="bireal",
        description="Bi-Real Net (Liu 2018): ApproxSign activation gradient, sign weights x per-filter mean|W|",
        binarize_input=approx_sign,
        binarize_weight=ste_sign_weight,
        scale=mean_abs_scale,
    )
