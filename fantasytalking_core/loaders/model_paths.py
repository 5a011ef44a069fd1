"""Finding the model files in a ComfyUI ``models/`` tree or the official FantasyTalking layout, and loading them.

Every missing file is reported at once, with where it goes and where it comes from.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import FantasyTalkingError, reworded

# What each part is, where it goes in ComfyUI, where it comes from, and the names to look for (globs, lower case,
# searched recursively, linked folders included; official-layout names last). ``within``: the only top folders a
# part's single files are taken from, besides the models folder itself (a flat folder of files); loras/ holds LoRAs
# named like the DiT, e.g. ``Wan21_I2V_14B_..._lora``. ``anywhere``: the globs also taken outside them (the
# official release's folder, found where the user keeps it).
PARTS: dict[str, dict[str, Any]] = {
    "dit": {
        "what": "Wan2.1-I2V-14B-720P diffusion model (the released adapter's pairing; 480P also runs)",
        "folder": "diffusion_models",
        "source": "Comfy-Org/Wan_2.1_ComfyUI_repackaged (wan2.1_i2v_720p_14B_bf16.safetensors, fp16/fp8 variants), "
                  "city96/Wan2.1-I2V-14B-720P-gguf, or Wan-AI/Wan2.1-I2V-14B-720P",
        "globs": ("*i2v*14b*.safetensors", "*i2v*14b*.gguf", "*i2v*14b*/*.safetensors.index.json"),
        "within": ("diffusion_models", "unet"),  # ComfyUI's folders for diffusion models (unet: the older name)
        "anywhere": ("*i2v*14b*/*.safetensors.index.json",),
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
        "what": "umT5 tokenizer folder (tokenizer.json / spiece.model; not needed with a ComfyUI umT5 file, which "
                "carries it)",
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


def walk_files(root: str | Path) -> Iterator[Path]:
    """Every file under ``root``, going into linked folders as ComfyUI's own folder scan does (``Path.rglob`` does
    not, so a ``models/vae`` linked to another disk looked empty).

    A linked folder is skipped only when it is one of the folders it sits in (by real path), so a link back up the
    tree ends the walk there; a folder linked in under two names is seen under both, as ComfyUI lists it (a global
    visited set would hide ``models/unet -> diffusion_models`` or the DiT behind whichever name came first).
    """
    top = os.fspath(root)
    above = {top: frozenset({os.path.realpath(top)})}  # folder -> real paths of it and the folders it sits in
    for folder, dirs, files in os.walk(top, followlinks=True):
        chain = above.pop(folder)
        keep = []
        for name in dirs:
            path = os.path.join(folder, name)
            real = os.path.realpath(path)
            if real not in chain:
                above[path] = chain | {real}
                keep.append(name)
        dirs[:] = keep
        for name in files:
            yield Path(folder, name)


# A Wan2.2 name (wan2.2_i2v_low_noise_14B_..., Wan22-I2V-A14B, wan2_2...): matches the DiT globs but is another model.
# Ranked last rather than excluded: alone, it is still picked and the loader says it is Wan2.2, which is clearer
# than "not found" beside a file the user can see.
_WAN22 = re.compile(r"wan[ ._-]?2[._-]?2(?!\d)")


def _preference(rel: str) -> tuple[int, str]:
    """Sort key among paths (relative to the models folder, lower case) that match one pattern: 720P first (the
    released adapter was trained on Wan2.1-I2V-14B-720P), then by path so the pick does not depend on the file
    system's order."""
    return (0 if "720p" in rel else 1, rel)


def _dit_preference(rel: str, pattern: int) -> tuple[bool, bool, int, str]:
    """Sort key among every DiT candidate, whichever glob found it: a Wan2.1 file before a Wan2.2 one or a LoRA
    kept beside the models, then 720P before 480P, then the globs' order (safetensors, GGUF, shard index), then by
    path. Ranking all globs together keeps a 720P GGUF ahead of any lesser ``.safetensors``."""
    not_wan21 = bool(_WAN22.search(rel)) or "lora" in rel.rsplit("/", 1)[-1]
    return (not_wan21, "720p" not in rel, pattern, rel)


def _find(spec: dict[str, Any], tree: dict[str, Path]) -> Path | None:
    """The file (or folder) for one part in ``tree`` (lower-case path relative to the models folder -> path)."""
    if "within" in spec:
        within, anywhere = spec["within"], spec.get("anywhere", ())
        ranked = {}
        for rank, pattern in enumerate(spec["globs"]):
            for rel in tree:
                place_ok = ("/" not in rel or rel.split("/", 1)[0] in within  # a flat folder of model files too
                            or (pattern in anywhere and not rel.startswith("loras/")))
                if rel not in ranked and place_ok and Path(rel).match(pattern):
                    ranked[rel] = rank
        return tree[min(ranked, key=lambda rel: _dit_preference(rel, ranked[rel]))] if ranked else None
    for pattern in spec["globs"]:
        matches = {rel: p for rel, p in tree.items() if Path(rel).match(pattern)}
        if matches:
            path = matches[min(matches, key=_preference)]
            if spec.get("parent") or (spec.get("parent_for") and path.name == spec["parent_for"]):
                return path.parent
            return path
    return None


def is_480p(dit: str | Path) -> bool:
    """True when a DiT's file or folder name says 480P: it runs (same architecture) but is not the adapter's
    pairing."""
    path = Path(dit)
    return "480p" in f"{path.parent.name}/{path.name}".lower()


def find_model_files(models_dir: str | Path | None, names: Mapping[str, str] | None = None,
                     **explicit: str | Path | None) -> ModelFiles:
    """Locate every part under ``models_dir`` (a ComfyUI ``models/`` folder or the official ``models/``).

    ``explicit`` files (e.g. ``dit=...``, the command line's ``--dit``) take precedence and need no ``models_dir``;
    ``names``: how the caller's user gives each part (``{"dit": "--dit", ...}``), for the message when one is
    missing and there is no ``models_dir`` (default: the keyword, ``dit=``).
    When both a 720P and a 480P DiT are present, 720P is picked. Raises :class:`MissingModelsError` listing each
    missing part, the folder it belongs in and where to download it.
    """
    from ..encoders.text import embedded_tokenizer

    root = Path(models_dir) if models_dir is not None else None
    if root is not None and not root.is_dir():
        raise MissingModelsError(f"Models folder not found: {root}. Pass --models with your ComfyUI/models folder.")
    found: dict[str, Path] = {}
    missing = []
    tree: dict[str, Path] | None = None  # walked once, and only when some part is searched for
    for name, spec in PARTS.items():
        given = explicit.get(name)
        if given is not None and not Path(given).exists():
            missing.append(f"  - {spec['what']}: {given} does not exist")
            continue
        path = Path(given) if given is not None else None
        if path is None and root is not None:
            if tree is None:
                tree = {p.relative_to(root).as_posix().lower(): p for p in walk_files(root)}
            path = _find(spec, tree)
        if path is None and name == "tokenizer" and embedded_tokenizer(found.get("text_encoder", "")) is not None:
            path = found["text_encoder"]  # ComfyUI's umT5 file carries its tokenizer
        if path is None and root is not None:
            missing.append(f"  - {spec['what']}: put it in {root / spec['folder']}/  (from {spec['source']})")
        elif path is None:  # no models folder: each file was to be given on its own
            given_as = (names or {}).get(name, f"{name}=")
            missing.append(f"  - {spec['what']}: not given; pass {given_as} with its file, or a models folder that "
                           f"has it in {spec['folder']}/  (from {spec['source']})")
        else:
            found[name] = path
    if missing:
        raise MissingModelsError("Missing model files:\n" + "\n".join(missing))
    return ModelFiles(**found)


def _naming(path: Path, error: FantasyTalkingError) -> FantasyTalkingError:
    """``error`` with ``path`` in front when its message does not say which file (the DiT checks read key names
    and shapes, not paths): ``--models`` picked the file, so the user has to be told which one failed."""
    message = str(error)
    return error if str(path) in message or Path(path).name in message else reworded(error, f"{path}: {message}")


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".gguf")


def _disk_bytes(path: str | Path) -> int:
    """Bytes of a model file, or of the weights a model folder is loaded from: its safetensors files when it has
    any (a Hugging Face clone also holds .bin and TensorFlow copies, and .git), else its other weight files."""
    path = Path(path)
    if not path.is_dir():
        return path.stat().st_size
    weights = [p for p in walk_files(path) if p.name.lower().endswith(WEIGHT_SUFFIXES)
               and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    chosen = [p for p in weights if p.name.lower().endswith(".safetensors")] or weights
    return sum(p.stat().st_size for p in chosen)


def load_models(files: ModelFiles, compute_dtype: torch.dtype = torch.bfloat16, fp8_storage: bool = False,
                processes: int = 1, check_memory: bool = True):
    """Load every part on the CPU (the pipeline moves each to the compute device while it works).

    Before any weight is read, the RAM they take is checked against the machine's (``check_memory``), counted
    ``processes`` times when that many processes on this machine each load a copy (torchrun's ranks).

    The DiT (with the adapter's k/v) and umT5 compute in ``compute_dtype`` whatever their files store (fp32
    shards, fp16, bf16, fp8, GGUF): bf16 is what the official code runs. An fp8 file's weights stay fp8 (half the
    memory, as ComfyUI keeps them), and ``fp8_storage`` stores any file's block weights in fp8; GGUF weights stay
    quantized; both are upcast layer by layer. CLIP runs in float32 and wav2vec2 in float32, as in the official
    code.
    """
    from ..audio.wav2vec2 import load_wav2vec2
    from ..encoders.image import load_image_encoder
    from ..encoders.text import load_text_encoder, load_tokenizer
    from ..encoders.vae import load_vae
    from ..pipeline import FantasyTalkingModels
    from ..runtime.memory import check_host_memory
    from .adapter import load_audio_adapter
    from .wan_dit import load_wan_dit, loaded_bytes, stores_fp8

    if check_memory:
        others = (files.adapter, files.text_encoder, files.image_encoder, files.vae, files.wav2vec2)
        one_copy = (loaded_bytes(files.dit, torch.float8_e4m3fn if fp8_storage else None, compute_dtype)
                    + sum(_disk_bytes(path) for path in others))
        check_host_memory(processes * one_copy, "Loading the models" if processes == 1 else
                          f"Loading the models in {processes} processes on this machine (one copy each)",
                          "--fp8 keeps the DiT in 8 bits (half of bf16), a GGUF DiT (Q8_0, Q6_K, ...) in less; or "
                          + ("close other programs, or add swap." if processes == 1 else
                             "start fewer processes per machine (torchrun --nproc-per-node), or add swap."))
    cfg = files.configs
    # smallest first: a wrong tokenizer or audio encoder is reported in seconds, not after the 14B DiT has loaded
    tokenizer = load_tokenizer(files.tokenizer)
    wav2vec2 = load_wav2vec2(files.wav2vec2, config=cfg.get("wav2vec2"))
    vae = load_vae(files.vae, config=cfg.get("vae"))
    image_encoder = load_image_encoder(files.image_encoder, config=cfg.get("image_encoder"), dtype=torch.float32)
    text_encoder = load_text_encoder(files.text_encoder, config=cfg.get("text_encoder"), dtype=compute_dtype)
    try:
        dit = load_wan_dit(files.dit, config=cfg.get("dit"), dtype=compute_dtype,
                           fp8_storage=fp8_storage or stores_fp8(files.dit), compute_dtype=compute_dtype)
    except FantasyTalkingError as exc:
        raise _naming(files.dit, exc) from None
    return FantasyTalkingModels(dit=load_audio_adapter(files.adapter, dit), vae=vae, text_encoder=text_encoder,
                                tokenizer=tokenizer, image_encoder=image_encoder, wav2vec2=wav2vec2)


__all__ = ["MissingModelsError", "ModelFiles", "find_model_files", "is_480p", "load_models", "walk_files"]
