"""fantasytalking_core.runtime.fp8: real fp8 matmuls for fp8-stored weights: e4m3 accuracy (an error model, not a
measured figure), row-wise vs per-tensor activation scales, only where the GPU has them, scoped to a run."""

import pytest
import torch

from fantasytalking_core.loaders.wan_dit import FP8Linear, enable_fp8_storage, load_wan_dit
from fantasytalking_core.runtime import fp8
from fantasytalking_core.runtime.fp8 import FP8, SCALED, UPCAST, fp8_matmuls, scaled_fp8_linear
from model_files import OFFICIAL, save_wan_file, to_fp8_scaled

# e4m3 keeps 3 mantissa bits: round-to-nearest is off by at most 2^-4 of a value (normal range), so a product of
# quantized activations with exact fp8 weights is off by at most that much relatively, plus bf16's 2^-8 on the output
E4M3_UNIT = 2.0**-4
BF16_UNIT = 2.0**-8


def relative_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def layer():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=gen) * 0.02
    scale = weight.abs().amax() / fp8.FP8_MAX  # as ComfyUI's fp8-scaled files: one scale per tensor
    x = torch.randn(32, 64, generator=gen).to(torch.bfloat16)
    bias = torch.randn(48, generator=gen).to(torch.bfloat16)
    w_fp8 = (weight / scale).to(FP8)
    exact = x.double() @ (w_fp8.double() * scale.double()).t() + bias.double()  # the weight as stored, exactly
    return x, w_fp8, scale, bias, exact


@pytest.mark.parametrize("rowwise", [True, False])
def test_scaled_matmul_is_within_e4m3_rounding_and_really_quantizes(layer, rowwise):
    x, w_fp8, scale, bias, exact = layer
    out = scaled_fp8_linear(x, w_fp8, scale, bias, rowwise=rowwise)
    assert out.dtype == torch.bfloat16 and out.shape == (32, 48)
    error = relative_l2(out, exact)
    assert error <= E4M3_UNIT + BF16_UNIT
    upcast = torch.nn.functional.linear(x, w_fp8.to(torch.bfloat16) * scale.to(torch.bfloat16), bias)
    assert error > 2 * relative_l2(upcast, exact)  # the activations were quantized: not a bf16 matmul in disguise


def test_row_scales_keep_a_quiet_token_that_one_tensor_scale_loses(layer):
    x, w_fp8, scale, bias, _ = layer
    x = x.clone()
    x[0] *= 1e-6  # a near-silent token next to loud ones: below e4m3's range under the loud rows' scale
    exact = x.double() @ (w_fp8.double() * scale.double()).t()
    row = {rowwise: relative_l2(scaled_fp8_linear(x, w_fp8, scale, None, rowwise)[0], exact[0])
           for rowwise in (True, False)}
    assert row[True] <= E4M3_UNIT + BF16_UNIT
    assert row[False] > 4 * row[True]


@pytest.mark.parametrize("capability, scaling", [((8, 6), None), ((8, 9), "tensorwise"), ((9, 0), "rowwise"),
                                                 ((12, 0), "rowwise")])
def test_fp8_matmuls_only_where_the_gpu_has_them(monkeypatch, capability, scaling):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert fp8.fp8_matmul_scaling(torch.device("cuda")) == scaling
    assert fp8.fp8_matmul_scaling(torch.device("cpu")) is None


@pytest.fixture(scope="module")
def fp8_dit(tmp_path_factory):
    from fantasytalking_core.loaders.state_dict import open_checkpoint

    state = dict(open_checkpoint(OFFICIAL / "dit" / "dit.safetensors").items())
    path = save_wan_file(to_fp8_scaled(state), tmp_path_factory.mktemp("fp8") / "fp8_scaled.safetensors")
    return load_wan_dit(path, config=OFFICIAL / "dit" / "config.json", fp8_storage=True,
                        compute_dtype=torch.bfloat16)


def test_a_run_uses_scaled_matmuls_then_upcasts_again(monkeypatch, fp8_dit):
    layers = [m for m in fp8_dit.modules() if isinstance(m, FP8Linear)]
    assert layers
    monkeypatch.setattr(fp8, "fp8_matmul_scaling", lambda device: "rowwise")  # a Hopper GPU, as far as it knows
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    x = torch.randn(2, 32, 64, dtype=torch.bfloat16)
    first = layers[0]
    upcast = first(x)
    with pytest.raises(RuntimeError, match="interrupted"):
        with fp8_matmuls(fp8_dit, torch.device("cuda")) as scaling:
            assert scaling == "rowwise" and all(m.matmul == SCALED for m in layers)
            scaled = first(x)
            raise RuntimeError("interrupted")
    assert calls == [(64, 64)]  # the tokens of both rows in one fp8 matmul
    assert not torch.equal(scaled, upcast)
    assert relative_l2(scaled, upcast.double()) <= E4M3_UNIT + 2 * BF16_UNIT
    assert all(m.matmul == UPCAST for m in layers)  # back to upcasting, also after a failure
    assert torch.equal(first(x), upcast)


def test_where_there_are_no_fp8_matmuls_nothing_changes(fp8_dit):
    layers = [m for m in fp8_dit.modules() if isinstance(m, FP8Linear)]
    with fp8_matmuls(fp8_dit, torch.device("cpu")) as scaling:
        assert scaling is None and all(m.matmul == UPCAST for m in layers)


@pytest.mark.parametrize("rowwise", [True, False])
def test_any_token_count_is_padded_for_the_kernel(layer, rowwise):
    x, w_fp8, scale, bias, _ = layer
    odd = x[:27]  # e.g. the 257 CLIP tokens, or a frame grid that is no multiple of 16
    padded = torch.cat([odd, torch.zeros(5, odd.shape[1], dtype=odd.dtype)])  # 32 rows: no padding needed
    out = scaled_fp8_linear(odd, w_fp8, scale, bias, rowwise)
    assert out.shape == (27, 48)
    assert torch.equal(out, scaled_fp8_linear(padded, w_fp8, scale, bias, rowwise)[:27])  # zero rows change nothing


def test_weights_scaled_mm_cannot_take_upcast(monkeypatch):
    layer = FP8Linear(24, 48, device="meta")  # 24 inputs: no multiple of 16
    layer.weight = torch.nn.Parameter(torch.randn(48, 24).to(FP8), requires_grad=False)
    layer.bias = None
    layer.register_buffer("scale_weight", torch.tensor(0.5), persistent=False)
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: pytest.fail("_scaled_mm called"))
    layer.matmul = SCALED
    x = torch.randn(32, 24, dtype=torch.bfloat16)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight.to(torch.bfloat16) * 0.5))


def test_fp8_matmuls_need_fp8_weights():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    with pytest.raises(ValueError, match="fp8 storage"):
        with fp8_matmuls(model, torch.device("cpu")):
            pass
    with fp8_matmuls(model, torch.device("cpu"), enabled=False) as scaling:  # off: no requirement
        assert scaling is None
    enable_fp8_storage(model)  # a float Linear is not turned into fp8 by this: still none
    assert not any(isinstance(m, FP8Linear) for m in model.modules())
