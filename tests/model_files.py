"""Tiny random-weight models written in the real file formats users have, for the loader tests.

The key layout of original Wan files is taken from the official fixture's ``dit.safetensors`` (its block-0 keys
are replicated for every block), so the files written here use exactly the names real checkpoints use.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import torch
from safetensors.torch import save_file

from fantasytalking_core.loaders.keys import wan_key_to_diffusers
from fantasytalking_core.loaders.state_dict import open_checkpoint
from fantasytalking_core.model.transformer import build_transformer, resolve_config

OFFICIAL = Path(__file__).parent / "fixtures" / "official"


def parity_tol(ref: torch.Tensor) -> float:
    """The fixtures' tolerance (their README, "Tolerances"): 1e-4 x max|reference|."""
    return 1e-4 * ref.abs().max().item()


FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def rounding_tol(ref: torch.Tensor, terms: int) -> float:
    """Tolerance for two float32 computations of the same maths, from an error model rather than one CPU's output.

    A float32 reduction over ``terms`` products, summed in whatever order a CPU kernel picks (AVX2, AVX-512, AMX
    and oneDNN all differ), carries a relative error with standard deviation about ``sqrt(terms) * u``
    (u = 2^-24). The reference and our run each carry one, so their difference has about ``sqrt(2 * terms) * u``;
    six of those, scaled by the output's magnitude, is the bar. For the 768-wide audio projection that is
    1.4e-5 relative, while a wrong weight, norm or window is off by order 1.
    """
    return 6.0 * (2.0 * terms) ** 0.5 * FLOAT32_UNIT_ROUNDOFF * ref.abs().max().item()


def ulp_tol(ref: torch.Tensor, ulps: float) -> float:
    """``ulps`` float32 units in the last place of max|ref|: for elementwise maths (no reductions) whose
    vectorised and scalar kernels (ATEN_CPU_CAPABILITY default / avx2 / avx512) round differently."""
    return ulps * 2.0**-23 * ref.abs().max().item()


TINY_WAN = json.loads((OFFICIAL / "dit" / "config.json").read_text())


def wan_config(**overrides) -> dict:
    """The fixture's tiny Wan config (Wan terms) with ``overrides``."""
    cfg = {k: v for k, v in TINY_WAN.items() if not k.startswith("_")}
    cfg.update(overrides)
    return cfg


def wan_keys(num_layers: int) -> list[str]:
    """Original Wan I2V key names for a model with ``num_layers`` blocks."""
    keys = open_checkpoint(OFFICIAL / "dit" / "dit.safetensors").keys
    top = [k for k in keys if not k.startswith("blocks.")]
    block0 = [k[len("blocks.0."):] for k in keys if k.startswith("blocks.0.")]
    return top + [f"blocks.{i}.{k}" for i in range(num_layers) for k in block0]


def random_wan_state(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random float32 state dict in original Wan key format for ``config`` (Wan terms)."""
    torch.manual_seed(seed)
    model = build_transformer(resolve_config(config))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    state = model.state_dict()
    return {k: state[wan_key_to_diffusers(k)].clone() for k in wan_keys(config["num_layers"])}


def random_adapter_state(config: dict, proj_dim: int = 32, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """An adapter in the official ckpt layout ({"proj_model": ..., "audio_processor": ...})."""
    g = torch.Generator().manual_seed(seed)
    dim = config["dim"]
    proc = {}
    for i in range(config["num_layers"]):
        for kv in "kv":
            proc[f"blocks.{i}.cross_attn.processor.{kv}_proj.weight"] = torch.randn(dim, proj_dim, generator=g) / proj_dim**0.5
    proj = {"proj.weight": torch.randn(proj_dim, 768, generator=g) / 768**0.5,
            "norm.weight": 1 + 0.1 * torch.randn(proj_dim, generator=g), "norm.bias": 0.05 * torch.randn(proj_dim, generator=g)}
    return {"proj_model": proj, "audio_processor": proc}


def flat_adapter(adapter: dict) -> dict[str, torch.Tensor]:
    return {f"{group}.{k}": v for group, sd in adapter.items() for k, v in sd.items()}


def write_shards(state: dict[str, torch.Tensor], folder: Path, num_shards: int,
                 stem: str = "diffusion_pytorch_model") -> Path:
    """A sharded safetensors set with its index json (the original Wan 14B layout); returns the index path."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    weight_map = {}
    for s in range(num_shards):
        name = f"{stem}-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = keys[s::num_shards]
        save_file({k: state[k].contiguous() for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    index = folder / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def to_fp8_scaled(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI "fp8 scaled" layout: block Linear weights as fp8 / scale with a ``.scale_weight`` each."""
    out: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in state.items():
        if k.startswith("blocks.") and k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().max() / 448.0
            out[k] = (v / scale).to(torch.float8_e4m3fn)
            out[k[: -len(".weight")] + ".scale_weight"] = scale.reshape(1).float()
        else:
            out[k] = v
    return out


def dequantized_fp8_scaled(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a correct loader must produce from :func:`to_fp8_scaled` output."""
    out = {}
    for k, v in state.items():
        if k == "scaled_fp8" or k.endswith(".scale_weight"):
            continue
        scale = state.get(k[: -len(".weight")] + ".scale_weight")
        out[k] = v.float() * scale if scale is not None else v
    return out


def write_gguf(state: dict[str, torch.Tensor], path: Path) -> None:
    """A GGUF file as ComfyUI-GGUF's converter writes them: 2-D weights Q8_0 where the row length allows, other
    weights F16, and 1-D tensors (biases, norms) BF16, which gguf-py stores as raw bytes."""
    writer = gguf.GGUFWriter(str(path), "wan")
    for key, tensor in state.items():
        array = tensor.float().numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(key, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif array.ndim == 1:
            q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.BF16)
            writer.add_tensor(key, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
        elif array.ndim > 4:  # GGUF holds at most 4 dims: flatten and record the real shape, as ComfyUI-GGUF does
            writer.add_array(f"comfy.gguf.orig_shape.{key}", list(array.shape))
            writer.add_tensor(key, array.reshape(array.shape[0], -1).astype("float16"))
        else:
            writer.add_tensor(key, array.astype("float16"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def save_wan_file(state: dict[str, torch.Tensor], path: Path, prefix: str = "") -> Path:
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path))
    return path
