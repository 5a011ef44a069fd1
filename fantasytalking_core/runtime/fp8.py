"""Real fp8 matrix multiplies for DiT weights stored in fp8 (``torch._scaled_mm``), where the GPU has them.

Weights loaded with fp8 storage (``loaders/wan_dit.FP8Linear``: e4m3 values times the file's per-tensor scale)
compute by default as bf16: each call upcasts the weight and runs a bf16 matmul, which halves the memory but
not the time. With fp8 matmuls the activations are quantized to e4m3 as well (one scale per token row, or one per
tensor where the GPU has no row-wise scaling) and the product runs on the fp8 tensor cores: on an H100 a
5120 x 13824 layer at 21,504 tokens ran 1.8x faster than bf16 (``docs/benchmarks.md``), at the cost of a second
rounding (e4m3 keeps 3 mantissa bits: about 2-4% relative error per product, against 0.2% for bf16).

Where: NVIDIA GPUs of compute capability 8.9 or newer (Ada, Hopper, Blackwell); row-wise activation scales from
9.0 on, a per-tensor scale on 8.9. Elsewhere (older GPUs, the CPU, Apple) the layers keep upcasting: same
result as without the option. It is scoped to a run (:func:`fp8_matmuls`) and off by default: no comparison on
real weights exists yet.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import SettingsError

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
UPCAST, SCALED = "upcast", "scaled"  # how an FP8Linear computes
_ALIGN = 16  # _scaled_mm's operands need every dimension a multiple of 16


def fp8_matmul_scaling(device: torch.device) -> str | None:
    """How activations are scaled for fp8 matmuls on ``device``: ``"rowwise"``, ``"tensorwise"``, or None when
    the device has no fp8 matrix multiply (the layers then upcast to bf16)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    capability = torch.cuda.get_device_capability(device)
    if capability >= (9, 0):
        return "rowwise"
    return "tensorwise" if capability >= (8, 9) else None


def scaled_fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None = None, rowwise: bool = True) -> torch.Tensor:
    """``x @ (weight * weight_scale).T + bias`` with ``x`` quantized to e4m3 and one fp8 ``torch._scaled_mm``.

    Args:
        x: [..., K] activations in bf16/fp16 (the result's dtype); K and N must be multiples of 16 (any number of
            rows: they are padded with zero rows to a multiple of 16 for the kernel, and the padding dropped).
        weight: [N, K] e4m3 values; weight_scale: their float32 per-tensor scale (a scalar).
        bias: [N] or None. rowwise: one activation scale per row (accurate; Hopper and newer), else one per tensor.
    Returns:
        [..., N] in ``x.dtype``.
    """
    rows = x.reshape(-1, x.shape[-1])
    count = rows.shape[0]
    if count % _ALIGN:  # zero rows change no scale (row-wise: their own; per tensor: not the maximum)
        rows = torch.nn.functional.pad(rows, (0, 0, 0, -count % _ALIGN))
    amax = rows.abs().amax(dim=1, keepdim=True) if rowwise else rows.abs().amax()
    x_scale = (amax.float() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)  # an all-zero row stays zero
    x_fp8 = (rows.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    w_scale = weight_scale.float().reshape(())
    if rowwise:  # row-wise scaling takes [M, 1] and [1, N] scales
        w_scale = w_scale.expand(1, weight.shape[0]).contiguous()
    out = torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale, scale_b=w_scale,
                           bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype)
    return out[:count].reshape(*x.shape[:-1], weight.shape[0])


def fits_scaled_mm(weight: torch.Tensor) -> bool:
    """Whether ``_scaled_mm`` takes this weight (both dimensions multiples of 16, as in every Wan model); a layer
    whose weight it cannot take upcasts."""
    return weight.shape[0] % _ALIGN == 0 and weight.shape[1] % _ALIGN == 0


def check_fp8_matmul_model(model: nn.Module, enabled: bool = True) -> list[nn.Module]:
    """The fp8-stored Linears of ``model`` when fp8 matmuls are ``enabled`` (there must be some, else a
    SettingsError naming the fix; checked before any model moves), else none."""
    from ..loaders.wan_dit import FP8Linear

    if not enabled:
        return []
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    if not layers:
        raise SettingsError("fp8 matmuls need the DiT's weights in fp8: load it with fp8 storage (--fp8, or the "
                            "fp8_e4m3fn weight dtype in the model loader), or turn fp8 matmuls off.")
    return layers


@contextmanager
def fp8_matmuls(model: nn.Module, device: torch.device, enabled: bool = True) -> Iterator[str | None]:
    """Inside the ``with``, every fp8-stored Linear of ``model`` computes with real fp8 matmuls when ``device``
    has them (yields the scaling used, or None when it upcasts as before); afterwards all upcast again.

    Raises:
        SettingsError: enabled on a model with no fp8-stored weights (:func:`check_fp8_matmul_model`).
    """
    layers = check_fp8_matmul_model(model, enabled)
    scaling = fp8_matmul_scaling(torch.device(device)) if enabled else None
    try:
        for layer in layers:
            layer.matmul = SCALED if scaling else UPCAST
            layer.rowwise = scaling == "rowwise"
        yield scaling
    finally:
        for layer in layers:
            layer.matmul = UPCAST
