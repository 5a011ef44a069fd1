"""Finding the model files in a ComfyUI ``models/`` tree or the official FantasyTalking layout, and loading them.

Every missing file is reported at once, with where it goes and where it comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import FantasyTalkingError

# What each part is, where it goes in ComfyUI, where it comes from, and the names to look for (globs, lower case,
# searched recursively; official-layout names last).
PARTS: dict[str, dict[str, Any]] = {
    "dit": {
        "what": "Wan2.1-I2V-14B diffusion model",
        "folder": "diffusion_models",
        "source": "Comfy-Org/Wan_2.1_ComfyUI_repackaged (wan2.1_i2v_480p_14B_bf16.safetensors, fp16/fp8 variants), "
                  "city96/Wan2.1-I2V-14B-480P-gguf, or Wan-AI/Wan2.1-I2V-14B-480P / -720P",
        "globs": ("*i2v*14b*.safetensors", "*i2v*14b*.gguf", "*i2v*14b*/*.safetensors.index.json"),
    },
    "adapter": {
        "what": "FantasyTalking audio adapter",
        "folder": "fantasytalking",
        "source": "acvlab/FantasyTalking (fantasytalking_model.ckpt) or Kijai/WanVideo_comfy (fantasytalking_fp16.safetensors)",
        "globs": ("*fantasytalking*.ckpt", "*fantasytalking*.safetensors"),
    },
    "text_encoder": {
        "what": "umT5-XXL text encoder",
        "folder": "text_encoders",
        "source": "Comfy-Org/Wan_2.1_ComfyUI_repackaged (umt5_xxl_fp16.safetensors) or the Wan release "
                  "(models_t5_umt5-xxl-enc-bf16.pth)",
        "globs": ("umt5*xxl*.safetensors", "models_t5_umt5-xxl-enc-bf16.pth"),
    },
    "tokenizer": {
        "what": "umT5 tokenizer folder (tokenizer.json / spiece.model)",
        "folder": "text_encoders/umt5-xxl",
        "source": "google/umt5-xxl (the tokenizer files), also inside the Wan release as google/umt5-xxl/",
        "globs": ("umt5-xxl/tokenizer_config.json", "umt5-xxl/tokenizer.json", "umt5-xxl/spiece.model"),
        "parent": True,
    },
    "image_encoder": {
        "what": "CLIP ViT-H/14 vision encoder",
        "folder": "clip_vision",
        "source": "Comfy-Org/Wan_2.1_ComfyUI_repackaged (clip_vision_h.safetensors) or the Wan release "
                  "(models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth)",
        "globs": ("clip_vision_h*.safetensors", "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"),
    },
    "vae": {
        "what": "Wan2.1 VAE",
        "folder": "vae",
        "source": "Comfy-Org/Wan_2.1_ComfyUI_repackaged (wan_2.1_vae.safetensors) or the Wan release (Wan2.1_VAE.pth)",
        "globs": ("wan_2.1_vae*.safetensors", "wan2.1_vae.pth"),
    },
    "wav2vec2": {
        "what": "wav2vec2-base-960h audio encoder",
        "folder": "audio_encoders",
        "source": "facebook/wav2vec2-base-960h (a folder with config.json + model.safetensors, or one .safetensors file)",
        "globs": ("*wav2vec2-base-960h*.safetensors", "wav2vec2-base-960h/config.json"),
        "parent_for": "config.json",
    },
}


class MissingModelsError(FantasyTalkingError, FileNotFoundError):
    """Some model files were not found; the message lists every one."""


@dataclass
class ModelFiles:
    """Paths of every part; ``configs`` optionally overrides a part's architecture (tiny test models)."""

    dit: Path
    adapter: Path
    text_encoder: Path
    tokenizer: Path
    image_encoder: Path
    vae: Path
    wav2vec2: Path
    configs: dict[str, Any] = field(default_factory=dict)


def _find(root: Path, spec: dict[str, Any]) -> Path | None:
    for pattern in spec["globs"]:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix().lower()
            if Path(rel).match(pattern):
                if spec.get("parent") or (spec.get("parent_for") and path.name == spec["parent_for"]):
                    return path.parent
                return path
    return None


def find_model_files(models_dir: str | Path, **overrides: str | Path | None) -> ModelFiles:
    """Locate every part under ``models_dir`` (a ComfyUI ``models/`` folder or the official ``models/``).

    ``overrides`` (e.g. ``dit=...``) take precedence. Raises :class:`MissingModelsError` listing each missing part,
    the folder it belongs in and where to download it.
    """
    root = Path(models_dir)
    if not root.is_dir():
        raise MissingModelsError(f"Models folder not found: {root}. Pass --models with your ComfyUI/models folder.")
    found: dict[str, Path] = {}
    missing = []
    for name, spec in PARTS.items():
        path = overrides.get(name) or _find(root, spec)
        if path is None or not Path(path).exists():
            missing.append(f"  - {spec['what']}: put it in {root / spec['folder']}/  (from {spec['source']})")
        else:
            found[name] = Path(path)
    if missing:
        raise MissingModelsError("Missing model files:\n" + "\n".join(missing))
    return ModelFiles(**found)


def load_models(files: ModelFiles, dtype: torch.dtype | None = None, fp8_storage: bool = False):
    """Load every part on the CPU (the pipeline moves each to the compute device while it works)."""
    from ..audio.wav2vec2 import load_wav2vec2
    from ..encoders.image import load_image_encoder
    from ..encoders.text import load_text_encoder, load_tokenizer
    from ..encoders.vae import load_vae
    from ..pipeline import FantasyTalkingModels
    from .adapter import load_audio_adapter
    from .wan_dit import load_wan_dit

    cfg = files.configs
    dit = load_wan_dit(files.dit, config=cfg.get("dit"), dtype=dtype, fp8_storage=fp8_storage,
                       compute_dtype=dtype or torch.bfloat16)
    return FantasyTalkingModels(
        dit=load_audio_adapter(files.adapter, dit),
        vae=load_vae(files.vae, config=cfg.get("vae")),
        text_encoder=load_text_encoder(files.text_encoder, config=cfg.get("text_encoder"), dtype=dtype),
        tokenizer=load_tokenizer(files.tokenizer),
        image_encoder=load_image_encoder(files.image_encoder, config=cfg.get("image_encoder"), dtype=dtype),
        wav2vec2=load_wav2vec2(files.wav2vec2, config=cfg.get("wav2vec2")),
    )


__all__ = ["MissingModelsError", "ModelFiles", "find_model_files", "load_models"]
