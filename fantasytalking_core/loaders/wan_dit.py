"""Load the Wan2.1-I2V DiT from the files users have, streaming, strictly.

Accepted: the original single file or 7-shard set (Wan key names), ComfyUI repackaged files (the same keys under
``model.diffusion_model.``), a diffusers-format folder, in fp32/fp16/bf16, fp8_e4m3fn (kept as fp8 storage
when asked), ComfyUI "fp8 scaled" (dequantized with its scale tensors), and GGUF (``loaders/gguf.py``).
Anything else that is a model (T2V, 1.3B, Wan2.2, a VAE, a text encoder, ...) is refused with what was found.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from torch import nn

from ..errors import ModelFileError, ModelNotFoundError
from ..model.transformer import build_transformer, resolve_config
from ..runtime.fp8 import SCALED, UPCAST, fits_scaled_mm, scaled_fp8_linear
from .common import assign_tensor
from .gguf import load_gguf_dit
from .keys import NEEDED, check_dit_keys, check_matches_config, fp32_names, inspect_wan_checkpoint, model_names
from .state_dict import FP8_DTYPES, open_checkpoint


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
    """The DiT config.json of a model folder (original Wan or diffusers), None if there is none or it describes
    another kind of model. An unreadable or malformed one is an error: falling back to the bundled 14B config
    would load the folder's weights into the wrong architecture, or fail later with a confusing shape message."""
    file = folder / "config.json"
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"Cannot read {file} ({exc}): fix or re-download it, or remove it to use the bundled "
                             "Wan2.1-I2V-14B config.") from None
    is_dit = isinstance(config, dict) and ({"dim", "num_heads"} <= set(config) or "num_attention_heads" in config)
    return config if is_dit else None


def _resolve_files(path: Path) -> tuple[Path, Path]:
    """A file, shard, index json or folder -> (the file to open, the folder whose config.json describes it).

    A file inside a model folder (a shard of the original release, a diffusers folder's weights) picks up the
    folder's ``config.json``, so the folder's architecture is used wherever the file is chosen from.
    """
    if not path.exists():
        raise ModelNotFoundError(f"Diffusion model not found: {path}. Put the {NEEDED} in ComfyUI/models/diffusion_models/.")
    if not path.is_dir():
        return path, path.parent
    for pattern in ("*.safetensors.index.json", "*.safetensors", "*.gguf", "*.pth"):
        found = sorted(path.glob(pattern))
        if found:
            return found[0], path
    raise ModelNotFoundError(f"No model weights (.safetensors, shard index, .gguf, .pth) in folder {path}.")


def stores_fp8(path: str | Path) -> bool:
    """Whether the DiT at ``path`` stores its weights in fp8 (ComfyUI's ``fp8_e4m3fn`` files, scaled or not), from
    the file's header. A GGUF file does not: it stays quantized its own way."""
    file, _ = _resolve_files(Path(path))
    if file.name.lower().endswith(".gguf"):
        return False
    return any(dtype in FP8_DTYPES for dtype in open_checkpoint(file).dtypes.values())


def loaded_bytes(path: str | Path, weight_dtype: torch.dtype | None, compute_dtype: torch.dtype) -> int:
    """About how many bytes of RAM the DiT at ``path`` takes once loaded as :class:`~.model_source.ModelSource`
    loads it, from the file's header (no weight is read): the blocks' Linear weights in 8 bits where the file stores
    them so (``weight_dtype`` None) or ``weight_dtype`` is fp8, everything else in ``weight_dtype`` or
    ``compute_dtype``; a pickle file counts its size on disk (read whole), a GGUF file the tensors it copies."""
    file, _ = _resolve_files(Path(path))
    if file.name.lower().endswith(".gguf"):  # quantized weights stay in the memory-mapped file; float ones are copied
        from .gguf import gguf_copied_bytes

        return gguf_copied_bytes(file, compute_dtype)
    if not file.name.lower().endswith((".safetensors", ".safetensors.index.json")):
        return file.stat().st_size
    checkpoint = open_checkpoint(file)
    keep = (compute_dtype if weight_dtype is None or weight_dtype in FP8_DTYPES else weight_dtype).itemsize
    total = 0
    for key, shape in checkpoint.shapes.items():
        stored = checkpoint.dtypes[key]
        block_matrix = "blocks." in key and len(shape) == 2  # the block Linears: what the loader keeps in 8 bits
        eight_bits = block_matrix and (stored in FP8_DTYPES if weight_dtype is None else weight_dtype in FP8_DTYPES)
        total += math.prod(shape) * (1 if eight_bits else keep)
    return total


def dit_config(path: str | Path, config: str | Path | dict | None = None) -> dict:
    """The config :func:`load_wan_dit` builds the DiT at ``path`` from, read before any weight (a parallel layout
    checks the head count with it): ``config`` when given, else the config in the model's folder if any, else the
    bundled Wan2.1-I2V-14B config."""
    _, folder = _resolve_files(Path(path))
    return resolve_config(config if config is not None else _folder_config(folder))  # an explicit one wins


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
    file, _ = _resolve_files(Path(path))
    config = dit_config(path, config)
    if file.name.lower().endswith(".gguf"):
        # quantized weights stay as stored; ``dtype`` (if a float type) sets what the rest is kept and computed in
        float_dtype = dtype if dtype is not None and dtype not in FP8_DTYPES else compute_dtype
        return load_gguf_dit(file, config, compute_dtype=float_dtype, device=device)
    ckpt = open_checkpoint(file)
    info = inspect_wan_checkpoint(ckpt.shapes)
    check_matches_config(info, config, str(path))

    model = build_transformer(config, empty=True)
    names = model_names(ckpt.keys, info.key_format)
    check_dit_keys({names[k]: ckpt.shapes[k] for k in ckpt.keys}, model, str(path))

    keep_fp32 = fp32_names(model)
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


class FP8Linear(nn.Linear):
    """A Linear whose weight is stored in fp8 and upcast to the input's dtype for each call.

    ``scale_weight`` (a float32 scalar, 1 for plain fp8 files) is the per-tensor scale of ComfyUI fp8-scaled files.
    The real weight is ``weight * scale_weight``. The bias keeps its own precision. ``matmul`` says how a call
    computes: ``"upcast"`` (default: the weight upcast to the input's dtype, a bf16 matmul) or ``"scaled"`` (a real
    fp8 matmul, set for one run by :func:`fantasytalking_core.runtime.fp8.fp8_matmuls` where the GPU has them).
    """

    scale_weight: torch.Tensor
    matmul: str = UPCAST
    rowwise: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matmul == SCALED and fits_scaled_mm(self.weight):
            return scaled_fp8_linear(x, self.weight, self.scale_weight, self.bias, self.rowwise)
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
