"""Load the Wan2.1-I2V DiT from the files users have, streaming, strictly.

Accepted: the original single file or 7-shard set (Wan key names), ComfyUI repackaged files (the same keys under
``model.diffusion_model.``), a diffusers-format folder, in fp32/fp16/bf16, fp8_e4m3fn (kept as fp8 storage
when asked), ComfyUI "fp8 scaled" (dequantized with its scale tensors), and GGUF (``loaders/gguf.py``).
Anything else that is a model (T2V, 1.3B, Wan2.2, a VAE, a text encoder, ...) is refused with what was found.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from torch import nn

from ..errors import ModelFileError, ModelNotFoundError
from ..model.transformer import build_transformer, resolve_config
from .common import assign_tensor, identify_checkpoint
from .state_dict import FP8_DTYPES, open_checkpoint, strip_prefix

COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
NEEDED = "Wan2.1-I2V-14B (480P or 720P) diffusion model, e.g. wan2.1_i2v_480p_14B_bf16.safetensors"
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class WanCheckpointInfo:
    """What a DiT checkpoint is, read from its key names and shapes alone (no weight is read)."""

    key_format: str  # "wan" (original / ComfyUI) or "diffusers"
    dim: int
    in_channels: int
    num_layers: int
    ffn_dim: int
    text_dim: int
    has_image_embedding: bool
    extras: tuple[str, ...]  # model families recognised by extra keys (vace, animate, flf2v ...)

    def describe(self) -> str:
        kind = "I2V" if self.has_image_embedding and self.in_channels == 36 else (
            "T2V" if self.in_channels == 16 else f"{self.in_channels}-channel")
        extra = f", with {'/'.join(self.extras)} layers" if self.extras else ""
        return f"a Wan {kind} DiT with dim {self.dim}, {self.num_layers} blocks{extra}"


def inspect_wan_checkpoint(shapes: dict[str, tuple[int, ...]]) -> WanCheckpointInfo:
    """Classify a DiT state dict from key names and shapes; raise ModelFileError for non-Wan files."""
    keys = list(shapes)
    found = identify_checkpoint(keys)
    if found is not None and found[0] != "dit":
        raise ModelFileError(f"This file is {found[1]}, not a Wan diffusion model. FantasyTalking needs the {NEEDED}.")
    _, stripped = strip_prefix(keys, COMFY_PREFIXES)
    shapes = {k: shapes[v] for k, v in stripped.items()}
    if "patch_embedding.weight" not in shapes:
        raise ModelFileError(f"No Wan DiT found in this file (no 'patch_embedding.weight'). Needed: the {NEEDED}.")
    fmt = "diffusers" if "proj_out.weight" in shapes else "wan"
    dim, in_channels = shapes["patch_embedding.weight"][:2]
    layers = {int(m.group(1)) for k in shapes if (m := _BLOCK_RE.match(k))}
    ffn_key = "blocks.0.ffn.0.weight" if fmt == "wan" else "blocks.0.ffn.net.0.proj.weight"
    text_key = "text_embedding.0.weight" if fmt == "wan" else "condition_embedder.text_embedder.linear_1.weight"
    img_prefix = "img_emb." if fmt == "wan" else "condition_embedder.image_embedder."
    extras = tuple(name for name, prefix in (
        ("VACE", "vace_blocks."), ("Animate", "motion_encoder."), ("FLF2V", img_prefix + "emb_pos"),
        ("FLF2V", img_prefix + "pos_embed")) if any(k.startswith(prefix) for k in shapes))
    return WanCheckpointInfo(
        key_format=fmt,
        dim=dim,
        in_channels=in_channels,
        num_layers=len(layers),
        ffn_dim=shapes[ffn_key][0] if ffn_key in shapes else 0,
        text_dim=shapes[text_key][1] if text_key in shapes else 0,
        has_image_embedding=any(k.startswith(img_prefix) for k in shapes),
        extras=extras,
    )


def check_matches_config(info: WanCheckpointInfo, config: dict, source: str) -> None:
    """Refuse a checkpoint that is not the Wan2.1 I2V model ``config`` describes, saying what it is."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    want = (dim, config["in_channels"], config["num_layers"], config["ffn_dim"], config["text_dim"])
    found = (info.dim, info.in_channels, info.num_layers, info.ffn_dim, info.text_dim)
    if info.has_image_embedding and info.in_channels == 36 and not info.extras and want == found:
        return
    hint = ""
    if info.in_channels == 16:
        hint = " A text-to-video (T2V) model cannot animate a portrait."
    elif not info.has_image_embedding and info.in_channels == 36:
        hint = " This looks like Wan2.2 I2V, which FantasyTalking was not trained on."
    elif info.dim != dim:
        hint = " FantasyTalking's adapter was trained on the 14B model (dim 5120); other sizes cannot use it."
    raise ModelFileError(
        f"{source} is {info.describe()} ({info.in_channels} input channels, CLIP image embedding: "
        f"{'yes' if info.has_image_embedding else 'no'}), but FantasyTalking needs the {NEEDED} "
        f"(dim {dim}, {config['num_layers']} blocks, 36 input channels, CLIP image embedding).{hint}"
    )


def wan_key_to_diffusers(key: str) -> str:
    """One original-Wan key -> its ``WanTransformer3DModel`` name (diffusers' own rename table)."""
    return next(iter(convert_wan_transformer_to_diffusers({key: None})))


def check_keys(found: dict[str, tuple[int, ...]], model: nn.Module, source: str, skip: str = ".processor.") -> None:
    """Strict: every model tensor present with its shape, nothing extra; raise ModelFileError listing the first few."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if skip not in k}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(found) & set(expected) if tuple(found[k]) != expected[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:5])})")
        if wrong:
            parts.append("wrong shapes: " + ", ".join(f"{k} {tuple(found[k])} vs {expected[k]}" for k in wrong[:5]))
        raise ModelFileError(f"{source} does not match the model it is loaded into: {'; '.join(parts)}.")


def _fp32_names(model: WanTransformer3DModel) -> set[str]:
    """Parameters diffusers keeps in float32 when the rest is half precision (norms, time embedder, modulation)."""
    patterns = model._keep_in_fp32_modules or []
    return {n for n, _ in model.named_parameters() if any(p in n.split(".") or p in n for p in patterns)}


def _target_dtype(
    name: str, shape: tuple[int, ...], stored: torch.dtype, dtype: torch.dtype | None, store_fp8: bool,
    compute_dtype: torch.dtype, keep_fp32: set[str],
) -> torch.dtype:
    """The in-memory dtype of one tensor: fp8 for block Linear weights when storing fp8, else ``dtype`` (default:
    the stored dtype, fp8 files becoming ``compute_dtype``), with diffusers' fp32-kept modules in float32."""
    if store_fp8 and name.startswith("blocks.") and name.endswith(".weight") and len(shape) == 2:
        return torch.float8_e4m3fn
    base = dtype if dtype is not None and dtype not in FP8_DTYPES else None
    base = base or (compute_dtype if stored in FP8_DTYPES or dtype in FP8_DTYPES else stored)
    if base in (torch.float16, torch.bfloat16) and name in keep_fp32:
        return torch.float32
    return base


def _folder_config(folder: Path) -> dict | None:
    """The DiT config.json of a model folder (original Wan or diffusers), None if there is none."""
    file = folder / "config.json"
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    is_dit = isinstance(config, dict) and ({"dim", "num_heads"} <= set(config) or "num_attention_heads" in config)
    return config if is_dit else None


def _resolve_files(path: Path) -> tuple[Path, dict | None]:
    """A file, shard, index json or folder -> (the file to open, the DiT config.json of its folder or None).

    A file inside a model folder (a shard of the original release, a diffusers folder's weights) picks up the
    folder's ``config.json``, so the folder's architecture is used wherever the file is chosen from.
    """
    if not path.exists():
        raise ModelNotFoundError(f"Diffusion model not found: {path}. Put the {NEEDED} in ComfyUI/models/diffusion_models/.")
    if not path.is_dir():
        return path, _folder_config(path.parent)
    config = _folder_config(path)
    for pattern in ("*.safetensors.index.json", "*.safetensors", "*.gguf", "*.pth"):
        found = sorted(path.glob(pattern))
        if found:
            return found[0], config
    raise ModelNotFoundError(f"No model weights (.safetensors, shard index, .gguf, .pth) in folder {path}.")


def load_wan_dit(
    path: str | Path,
    config: str | Path | dict | None = None,
    dtype: torch.dtype | None = None,
    fp8_storage: bool = False,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> WanTransformer3DModel:
    """Load the Wan2.1-I2V DiT, streaming tensor by tensor.

    Args:
        path: a .safetensors / .pth file, one shard or the index json of a shard set, a diffusers or original
            Wan folder, or a .gguf file.
        config: bundled config name, JSON path or dict (diffusers or Wan terms); default: the config in the
            model's folder if any, else the bundled Wan2.1-I2V-14B config.
        dtype: weight dtype; default keeps the file's (fp8 files become bfloat16 unless ``fp8_storage``).
        fp8_storage: keep the block Linear weights as float8_e4m3fn in memory and upcast them to
            ``compute_dtype`` layer by layer at run time (half the memory of bf16).
    """
    file, folder_config = _resolve_files(Path(path))
    config = resolve_config(config if config is not None else folder_config)
    if file.name.lower().endswith(".gguf"):
        from .gguf import load_gguf_dit

        # quantized weights stay as stored; ``dtype`` (if a float type) sets what the rest is kept and computed in
        float_dtype = dtype if dtype is not None and dtype not in FP8_DTYPES else compute_dtype
        return load_gguf_dit(file, config, compute_dtype=float_dtype, device=device)
    ckpt = open_checkpoint(file)
    info = inspect_wan_checkpoint(ckpt.shapes)
    check_matches_config(info, config, str(path))

    model = build_transformer(config, empty=True)
    names = _file_to_names(ckpt.keys, info.key_format)
    check_keys({names[k]: ckpt.shapes[k] for k in ckpt.keys}, model, str(path))

    keep_fp32 = _fp32_names(model)
    store_fp8 = fp8_storage or dtype in FP8_DTYPES
    scales: dict[str, torch.Tensor] = {}
    for key in ckpt.keys:
        name = names[key]
        target = _target_dtype(name, ckpt.shapes[key], ckpt.dtypes[key], dtype, store_fp8, compute_dtype, keep_fp32)
        if target == ckpt.dtypes[key] == torch.float8_e4m3fn:
            tensor = ckpt.raw(key)  # fp8 stays fp8; an fp8-scaled weight keeps its scale beside it
            scale = ckpt.scale(key)
            if scale is not None:
                scales[name] = scale.to(device)
        else:
            # every conversion goes through the checkpoint's reader, which dequantizes fp8-scaled weights
            tensor = ckpt.tensor(key, dtype=target)
        assign_tensor(model, name, tensor.to(device=device, dtype=target))
    model.eval().requires_grad_(False)
    if store_fp8:
        enable_fp8_storage(model, scales)
    return model


def _file_to_names(keys: list[str], key_format: str) -> dict[str, str]:
    """File key -> model parameter name (prefix stripped, Wan names renamed to diffusers')."""
    _, stripped = strip_prefix(keys, COMFY_PREFIXES)
    convert = wan_key_to_diffusers if key_format == "wan" else (lambda k: k)
    return {original: convert(short) for short, original in stripped.items()}


class FP8Linear(nn.Linear):
    """A Linear whose weight is stored in fp8 and upcast to the input's dtype for each call.

    ``scale_weight`` (a float32 scalar, 1 for plain fp8 files) is the per-tensor scale of ComfyUI fp8-scaled files:
    the real weight is ``weight * scale_weight``. The bias keeps its own precision.
    """

    scale_weight: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) * self.scale_weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, weight, bias)


def enable_fp8_storage(model: nn.Module, scales: dict[str, torch.Tensor] | None = None) -> None:
    """Turn every Linear whose weight is fp8 into an :class:`FP8Linear` sharing the same tensors.

    Args:
        scales: parameter name of a weight -> its fp8-scaled scale (missing: scale 1).
    """
    scales = scales or {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in parent.named_children():
            if type(child) is nn.Linear and child.weight.dtype in FP8_DTYPES:
                fp8 = FP8Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                fp8.weight, fp8.bias = child.weight, child.bias
                name = f"{parent_name}.{child_name}.weight" if parent_name else f"{child_name}.weight"
                scale = scales.get(name, torch.ones(1, device=child.weight.device))
                fp8.register_buffer("scale_weight", scale.reshape(()).float(), persistent=False)
                setattr(parent, child_name, fp8)
