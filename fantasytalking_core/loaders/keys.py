"""The Wan DiT's key names, shared by every DiT file format (``wan_dit.py``, ``gguf.py``).

What a checkpoint is, read from its key names and shapes alone; how its keys map to diffusers'
``WanTransformer3DModel`` names; which tensors diffusers keeps in float32 when the rest is half precision.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from torch import nn

from ..errors import ModelFileError
from .common import check_keys, identify_checkpoint
from .state_dict import strip_prefix

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


def model_names(keys: list[str], key_format: str) -> dict[str, str]:
    """File key -> model parameter name (prefix stripped, Wan names renamed to diffusers')."""
    _, stripped = strip_prefix(keys, COMFY_PREFIXES)
    convert = wan_key_to_diffusers if key_format == "wan" else (lambda k: k)
    return {original: convert(short) for short, original in stripped.items()}


def fp32_names(model: WanTransformer3DModel) -> set[str]:
    """Parameters diffusers keeps in float32 when the rest is half precision (norms, time embedder, modulation)."""
    patterns = model._keep_in_fp32_modules or []
    return {n for n, _ in model.named_parameters() if any(p in n.split(".") or p in n for p in patterns)}


def check_dit_keys(found: dict[str, tuple[int, ...]], model: nn.Module, source: str) -> None:
    """Strict: every DiT tensor (model names, the audio processors excepted) present with its shape, nothing extra."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if ".processor." not in k}
    check_keys(found, expected, source, "Wan2.1-I2V DiT", f"FantasyTalking needs the {NEEDED}.")
