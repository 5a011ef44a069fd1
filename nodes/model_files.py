"""Which model files the loader dropdowns offer, and where a chosen entry is on disk (no ComfyUI import).

The loader nodes pass in what ``folder_paths`` lists and the folders it knows; these functions only filter and
resolve, so they are tested on plain lists and temporary folders.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from fantasytalking_core.loaders.model_paths import walk_files

ADAPTER_FOLDER = "fantasytalking"  # models/fantasytalking, registered with folder_paths by the loader module
DIT_FOLDER = "fantasytalking_dit"  # the diffusion_models folders, listing every format the engine reads
TRANSFORMERS_FOLDER = "transformers"  # models/transformers: Hugging Face model folders
TRANSFORMERS_PREFIX = "transformers/"  # how a Hugging Face folder appears in the wav2vec2 dropdown

WEIGHT_EXTENSIONS = frozenset({".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin"})
DIT_EXTENSIONS = WEIGHT_EXTENSIONS | {".gguf", ".json"}
_SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$", re.IGNORECASE)
_INDEX_SUFFIX = ".safetensors.index.json"


def _is_adapter_name(name: str) -> bool:
    return "fantasytalking" in os.path.basename(name).lower()


def dit_choices(files: Iterable[str]) -> list[str]:
    """The diffusion-model dropdown from every file in the diffusion_models folders (relative paths).

    Kept: single weight files and GGUF; a shard set appears once, as its ``.safetensors.index.json``. Dropped:
    other JSON (configs), the shards of an indexed set, and the FantasyTalking adapter (it has its own dropdown).
    """
    files = sorted(set(files))
    indexed = {os.path.dirname(f) for f in files if f.lower().endswith(_INDEX_SUFFIX)}
    keep = []
    for f in files:
        low = f.lower()
        if low.endswith(".json") and not low.endswith(_INDEX_SUFFIX):
            continue
        if _SHARD.search(low) and os.path.dirname(f) in indexed:
            continue
        if _is_adapter_name(f):
            continue
        keep.append(f)
    return keep


def adapter_choices(adapter_files: Iterable[str], diffusion_files: Iterable[str]) -> list[str]:
    """The adapter dropdown: everything in models/fantasytalking, then the diffusion_models files named like the
    adapter (``fantasytalking_fp16.safetensors`` is commonly kept there)."""
    own = sorted(f for f in adapter_files if os.path.splitext(f)[1].lower() in WEIGHT_EXTENSIONS)
    shared = sorted(f for f in diffusion_files
                    if _is_adapter_name(f) and os.path.splitext(f)[1].lower() in WEIGHT_EXTENSIONS)
    return own + [f for f in shared if f not in own]


def wav2vec2_folders(roots: Iterable[str | Path]) -> list[str]:
    """Hugging Face wav2vec2 folders (``config.json`` with ``model_type`` wav2vec2) under ``roots``, as
    ``transformers/<path relative to its root>`` with forward slashes; linked folders are looked into, as
    ComfyUI's own scan does (the command line's ``--models`` search walks the same way)."""
    found = set()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for config in walk_files(root):
            if config.name != "config.json":
                continue
            try:
                model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
            except (OSError, ValueError, AttributeError):
                continue
            if model_type == "wav2vec2":
                found.add(TRANSFORMERS_PREFIX + config.parent.relative_to(root).as_posix())
    return sorted(found)


def resolve_wav2vec2(choice: str, audio_roots: Iterable[str | Path], transformers_roots: Iterable[str | Path]) -> Path | None:
    """Where a wav2vec2 dropdown entry is: a ``transformers/...`` folder, or a file in an audio_encoders folder.

    A file inside a Hugging Face folder (its ``config.json`` beside it, below the audio_encoders root) resolves to
    the folder, so the folder's config is checked and used. None when the entry is not on disk.
    """
    if choice.startswith(TRANSFORMERS_PREFIX):
        rel = choice[len(TRANSFORMERS_PREFIX):]
        for root in transformers_roots:
            folder = _inside(root, rel)
            if folder is not None and (folder / "config.json").is_file():
                return folder
        return None
    for root in audio_roots:
        path = _inside(root, choice)
        if path is not None and path.is_file():
            inside_folder = path.parent != Path(os.path.abspath(root)) and (path.parent / "config.json").is_file()
            return path.parent if inside_folder else path
    return None


def _inside(root: str | Path, relative: str) -> Path | None:
    """``root / relative`` when it stays inside ``root``, else None: a prompt sent to ComfyUI's API may name any
    path (ComfyUI skips its dropdown check for inputs a ``validate_inputs`` takes), and a loader reads only its
    models folders. Judged by name, so a model file linked in from another disk still loads."""
    root = os.path.abspath(root)
    path = os.path.abspath(os.path.join(root, relative))  # by name: a linked model file may live on another disk
    try:
        inside = os.path.commonpath([root, path]) == root and path != root
    except ValueError:  # another Windows drive
        inside = False
    return Path(path) if inside else None
