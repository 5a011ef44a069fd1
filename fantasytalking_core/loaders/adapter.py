"""Load the FantasyTalking audio adapter and join it to a loaded DiT.

Two layouts hold the same tensors:
- the official ``fantasytalking_model.ckpt``: a torch pickle ``{"proj_model": {...}, "audio_processor":
  {"blocks.{i}.cross_attn.processor.{k,v}_proj.weight": ...}}``;
- its safetensors repack with flattened keys ``proj_model.*`` and ``audio_processor.*``.
Strict: the projection and every block's k/v must be there with shapes that fit the DiT, and nothing else.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from ..errors import ModelFileError
from ..model.adapter import AudioAdapter, attach_audio_adapter
from ..model.transformer import FantasyTalkingModel, compute_dtype
from .common import assign_tensor, identify_checkpoint, key_mismatch_error
from .state_dict import open_checkpoint

_PROC_KEY = "audio_processor.blocks.{i}.cross_attn.processor.{kv}_proj.weight"
_PROC_RE = re.compile(r"^audio_processor\.blocks\.(\d+)\.cross_attn\.processor\.([kv])_proj\.weight$")
PROJ_KEYS = ("proj_model.proj.weight", "proj_model.norm.weight", "proj_model.norm.bias")
NEEDED = "FantasyTalking audio adapter (fantasytalking_model.ckpt or its .safetensors repack)"


def read_audio_adapter(
    path: str | Path,
    num_layers: int | None = None,
    dim: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> AudioAdapter:
    """The adapter in ``path`` as an :class:`AudioAdapter`, checked strictly against the DiT it is for.

    Args:
        num_layers, dim: the DiT's block count and width; ``None``: taken from the file (then the caller checks).
        dtype: dtype of the per-block k/v weights (default: as stored). The projection is always float32 (small;
            the official code computes it in float32).
        device: where the weights go.
    """
    ckpt = open_checkpoint(path)
    keys = ckpt.keys
    if not any(k.startswith(("proj_model.", "audio_processor.")) for k in keys):
        found = identify_checkpoint(keys)
        what = f"{found[1]}, not an audio adapter" if found else "not an audio adapter"
        raise ModelFileError(f"{path} is {what}: no 'proj_model.*' / 'audio_processor.*' keys. Needed: the {NEEDED}.")

    missing = [k for k in PROJ_KEYS if k not in ckpt.shapes]
    if missing:
        raise ModelFileError(f"{path}: adapter projection incomplete, missing {', '.join(missing)}.")
    proj_dim, audio_dim = ckpt.shapes["proj_model.proj.weight"]

    blocks: dict[tuple[int, str], str] = {}
    unexpected = []
    for key in keys:
        match = _PROC_RE.match(key)
        if match:
            blocks[(int(match.group(1)), match.group(2))] = key
        elif key not in PROJ_KEYS:
            unexpected.append(key)
    if num_layers is None:
        num_layers = 1 + max((i for i, _ in blocks), default=-1)
    want = {(i, kv) for i in range(num_layers) for kv in "kv"}
    absent = sorted(want - set(blocks))
    extra = sorted(set(blocks) - want)
    if unexpected or absent or extra or not want:
        hint = f"The adapter needs k/v for each of the DiT's blocks (DiT has {num_layers})"
        if absent:
            hint += f"; no k/v for blocks {sorted({i for i, _ in absent})[:8]}"
        if extra:
            hint += f"; k/v for blocks the DiT does not have ({sorted({i for i, _ in extra})[:8]})"
        missing = [(name, name) for name in (_PROC_KEY.format(i=i, kv=kv) for i, kv in absent)]
        raise key_mismatch_error(path, "audio adapter", hint + f". Needed: the {NEEDED} for this DiT.", missing,
                                 unexpected + [blocks[b] for b in extra], {})
    if dim is None:
        dim = ckpt.shapes[blocks[(0, "k")]][0]
    for key in blocks.values():
        if ckpt.shapes[key] != (dim, proj_dim):
            raise ModelFileError(
                f"{path}: {key} has shape {ckpt.shapes[key]}, but this DiT needs ({dim}, {proj_dim}) "
                f"(model width {dim}, adapter width {proj_dim}). Is the adapter for a different Wan size?"
            )
    for key, shape in (("proj_model.norm.weight", (proj_dim,)), ("proj_model.norm.bias", (proj_dim,))):
        if ckpt.shapes[key] != shape:
            raise ModelFileError(f"{path}: {key} has shape {ckpt.shapes[key]}, expected {shape}.")

    with torch.device("meta"):  # every parameter is assigned below: no random init of ~3 GB for the 14B adapter
        adapter = AudioAdapter(num_layers, dim, proj_dim, audio_dim)
    for key in PROJ_KEYS:
        assign_tensor(adapter.proj, key[len("proj_model."):], ckpt.tensor(key).to(device=device, dtype=torch.float32))
    for (i, kv), key in blocks.items():
        tensor = ckpt.tensor(key)
        assign_tensor(adapter.blocks[i], f"{kv}_proj.weight", tensor.to(device=device, dtype=dtype or tensor.dtype))
    return adapter.requires_grad_(False)


def load_audio_adapter(
    path: str | Path, transformer: WanTransformer3DModel, dtype: torch.dtype | None = None
) -> FantasyTalkingModel:
    """Attach the adapter in ``path`` to ``transformer`` and return the combined model.

    Args:
        dtype: dtype of the per-block k/v weights; default: the DiT's compute dtype. The audio projection is
            always kept in float32 (small; the official code computes it in float32).
    """
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    adapter = read_audio_adapter(path, len(transformer.blocks), dim, dtype or compute_dtype(transformer),
                                 transformer.patch_embedding.weight.device)
    attach_audio_adapter(transformer, adapter)
    return FantasyTalkingModel(transformer, adapter.proj)
