"""CLIP ViT-H/14 image encoder of Wan2.1 I2V: the ``clip_fea`` tokens the DiT's ``img_emb`` takes.

The network is transformers' :class:`~transformers.CLIPVisionModel`. Files accepted by
:func:`load_image_encoder`:

- Wan's ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` (open-clip layout, ``visual.*`` keys, fused
  qkv; its text tower ``textual.*``, ``log_scale`` and the projection ``visual.head`` are not needed and skipped),
  also with DiffSynth's ``model.`` prefix;
- ComfyUI's ``clip_vision_h.safetensors`` / the ``image_encoder`` of the ``-Diffusers`` repos (transformers
  layout, ``vision_model.*``; ``visual_projection`` and any text tower are skipped).

What Wan feeds the DiT is the *penultimate* hidden state: the output of all transformer blocks but the last,
without the post-norm or the projection: [B, 257, 1280] (CLS + 16x16 patches).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from transformers import CLIPVisionConfig, CLIPVisionModel

from ..errors import ImageInputError, ModelFileError
from ..loaders.common import Rename, Source, assign_weights, plan_from_table, read_config, resolve_dtype, wrong_file_error
from ..loaders.state_dict import open_checkpoint, strip_prefix

CLIP_CONFIG = "clip_vit_h_14.json"
_INFO_KEYS = {"construct", "_class_name", "_name", "architectures", "model_type", "transformers_version"}
_FIX = ("Choose the CLIP vision model Wan2.1 uses (ComfyUI's clip_vision_h.safetensors or Wan's "
        "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth), or pass the config that matches the file.")


def _qkv(index: int):
    """Slice q (0), k (1) or v (2) out of open-clip's fused ``to_qkv`` (rows are [q; k; v])."""
    return lambda t: t.chunk(3, dim=0)[index]


# Wan/open-clip layout -> transformers CLIPVisionModel names (without the ``vision_model.`` of older versions).
WAN_CLIP_KEYS: tuple[Rename, ...] = (
    Rename("embeddings.class_embedding", "visual.cls_embedding", lambda t: t.reshape(-1)),  # [1,1,D] -> [D]
    Rename("embeddings.patch_embedding.weight", "visual.patch_embedding.weight"),
    Rename("embeddings.position_embedding.weight", "visual.pos_embedding", lambda t: t[0]),  # [1,N,D] -> [N,D]
    Rename("pre_layrnorm.{p}", "visual.pre_norm.{p}"),
    Rename("encoder.layers.{i}.layer_norm1.{p}", "visual.transformer.{i}.norm1.{p}"),
    Rename("encoder.layers.{i}.self_attn.q_proj.{p}", "visual.transformer.{i}.attn.to_qkv.{p}", _qkv(0)),
    Rename("encoder.layers.{i}.self_attn.k_proj.{p}", "visual.transformer.{i}.attn.to_qkv.{p}", _qkv(1)),
    Rename("encoder.layers.{i}.self_attn.v_proj.{p}", "visual.transformer.{i}.attn.to_qkv.{p}", _qkv(2)),
    Rename("encoder.layers.{i}.self_attn.out_proj.{p}", "visual.transformer.{i}.attn.proj.{p}"),
    Rename("encoder.layers.{i}.layer_norm2.{p}", "visual.transformer.{i}.norm2.{p}"),
    Rename("encoder.layers.{i}.mlp.fc1.{p}", "visual.transformer.{i}.mlp.0.{p}"),
    Rename("encoder.layers.{i}.mlp.fc2.{p}", "visual.transformer.{i}.mlp.2.{p}"),
    Rename("post_layernorm.{p}", "visual.post_norm.{p}"),
)

# Wan's own config names -> CLIPVisionConfig names.
_WAN_NAMES = {
    "image_size": "image_size", "patch_size": "patch_size", "vision_dim": "hidden_size",
    "vision_heads": "num_attention_heads", "vision_layers": "num_hidden_layers", "norm_eps": "layer_norm_eps",
    "embed_dim": "projection_dim", "activation": "hidden_act", "mean": "image_mean", "std": "image_std",
}


def _skip_wan(key: str) -> bool:
    # Contrastive-training leftovers: the text tower, the logit scale and the image projection head.
    return key.startswith("textual.") or key in ("log_scale", "logit_bias", "visual.head")


def _skip_transformers(key: str) -> bool:
    return (key.startswith(("text_model.", "visual_projection.", "text_projection."))
            or key in ("logit_scale", "logit_bias") or key.endswith("position_ids"))


def clip_config(config: str | Path | Mapping | None = None) -> CLIPVisionConfig:
    """The CLIPVisionConfig: bundled ViT-H/14 of Wan2.1, overridden by ``config``.

    ``config`` may use transformers' names or Wan's own (``vision_dim``, ``vision_mlp_ratio``, ... as in the
    test fixture's config.json). ``image_mean``/``image_std`` are the preprocessing normalization.
    """
    merged = {k: v for k, v in read_config(None, CLIP_CONFIG).items() if k not in _INFO_KEYS}
    if config is not None:
        user = {k: v for k, v in read_config(config, CLIP_CONFIG).items() if k not in _INFO_KEYS}
        if "vision_dim" in user:
            user = _from_wan_names(user)
        allowed = set(CLIPVisionConfig().to_dict()) | {"image_mean", "image_std"}
        unknown = sorted(set(user) - allowed)
        if unknown:
            raise ModelFileError(f"Unknown CLIP vision config key(s) {unknown}.")
        merged.update(user)
    return CLIPVisionConfig(**merged)


def _from_wan_names(wan: dict) -> dict:
    if wan.get("vision_pool", "token") != "token" or not wan.get("vision_pre_norm", True):
        raise ModelFileError("Only Wan's CLIP variant is supported: vision_pool 'token' with vision_pre_norm.")
    if wan.get("activation", "gelu") not in ("gelu", "quick_gelu"):
        raise ModelFileError(f"Unsupported CLIP activation {wan['activation']!r}; expected 'gelu' or 'quick_gelu'.")
    out = {}
    for key, value in wan.items():
        if key == "vision_mlp_ratio":
            out["intermediate_size"] = int(wan["vision_dim"] * value)
        elif key in ("vision_pool", "vision_pre_norm", "vision_post_norm"):
            continue  # checked above; the post-norm never touches the penultimate output
        else:
            out[_WAN_NAMES.get(key, key)] = value
    return out


def load_image_encoder(
    path: str | Path,
    config: str | Path | Mapping | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> CLIPVisionModel:
    """Load Wan's CLIP ViT-H/14 vision tower (open-clip or transformers layout) into ``CLIPVisionModel``.

    ``config``: None for ViT-H/14, else a dict or JSON path (see :func:`clip_config`). ``dtype``: None keeps
    the file's dtype (fp8 -> bfloat16). Loading is strict; skipped tensors are listed in the module docstring.
    """
    ckpt = open_checkpoint(path)
    cfg = clip_config(config)
    prefix, names = strip_prefix(ckpt.keys, ("model.",))  # DiffSynth saves Wan's CLIP under "model."
    with init_empty_weights():
        model = CLIPVisionModel(cfg)
    targets = list(model.state_dict())
    target_prefix = "vision_model." if all(t.startswith("vision_model.") for t in targets) else ""

    if "visual.patch_embedding.weight" in names:
        plan = plan_from_table(targets, WAN_CLIP_KEYS, source_prefix=prefix, target_prefix=target_prefix)
        skip = lambda key: _skip_wan(key[len(prefix):])  # noqa: E731
        dim = cfg.hidden_size
        for name, src in plan.items():
            if "post_layernorm" in name and src.key not in ckpt.shapes:
                # Wan's ViT has no post-norm (vision_post_norm=False); it would only act on the unused last
                # block's output, so an identity norm stands in for it.
                plan[name] = Source(None, (lambda _: torch.ones(dim)) if name.endswith("weight")
                                    else (lambda _: torch.zeros(dim)))
    else:
        hf_prefix = next((p for p in ("vision_model.", "") if p + "embeddings.patch_embedding.weight" in names), None)
        if hf_prefix is None:
            raise wrong_file_error(ckpt, "CLIP vision model", _FIX)
        plan = {t: Source(prefix + hf_prefix + t[len(target_prefix):]) for t in targets}
        skip = lambda key: _skip_transformers(key[len(prefix):])  # noqa: E731

    assign_weights(model, ckpt, plan, ignored=skip, dtype=resolve_dtype(ckpt, dtype), device=device,
                   kind="CLIP ViT-H/14 vision model (CLIPVisionModel)", fix=_FIX)
    return model


def preprocess_clip_image(image: torch.Tensor, config: CLIPVisionConfig) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> CLIP pixel values [B, 3, S, S] float32 (S = config.image_size, 224).

    As Wan: the whole frame squashed to S x S (bicubic, align_corners=False, no antialias, no centre crop),
    mapped to [0, 1], then normalized per channel with ``image_mean``/``image_std`` (OpenAI CLIP values).
    """
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[1] != 3:
        hint = (" It looks channels-last (ComfyUI IMAGE): use image.permute(0, 3, 1, 2) * 2 - 1."
                if image.ndim == 4 and image.shape[-1] == 3 else "")
        raise ImageInputError(f"Expected an image [B, 3, H, W] in [-1, 1], got shape {list(image.shape)}.{hint}")
    if not torch.isfinite(image).all() or image.min() < -1.001 or image.max() > 1.001:
        raise ImageInputError(f"Image values must lie in [-1, 1], found [{image.min():.3g}, {image.max():.3g}]. "
                              "Map 8-bit pixels with x / 127.5 - 1 and [0, 1] images with x * 2 - 1.")
    size = config.image_size
    x = F.interpolate(image.float(), size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(config.image_mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x * 0.5 + 0.5 - mean) / std


@torch.no_grad()
def encode_image_clip(model: CLIPVisionModel, image: torch.Tensor) -> torch.Tensor:
    """Image -> Wan's CLIP context tokens.

    image: [B, 3, H, W] (or [3, H, W]) in [-1, 1], any size. Returns [B, 257, hidden] (hidden 1280 for
    ViT-H/14) in the model's dtype: the penultimate hidden state, no post-norm, no projection.
    """
    pixels = preprocess_clip_image(image.to(model.device), model.config)
    out = model(pixel_values=pixels.to(model.dtype), output_hidden_states=True)
    # hidden_states = (embeddings after pre-norm, block 1, ..., block L): [-2] is block L-1's output.
    return out.hidden_states[-2]
