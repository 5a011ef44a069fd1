"""GGUF DiT files (e.g. city96's Wan2.1-I2V-14B GGUF quantizations), on diffusers' GGUF layers.

The keys are checked strictly first (same rules as the other formats). The model is then built empty, its Linear
layers replaced by diffusers' ``GGUFLinear`` (quantized weights kept as stored, dequantized per call in
``compute_dtype``), and the tensors are views of the memory-mapped file, so memory stays near the file size
(diffusers' own ``from_single_file`` path reads the whole file into memory first).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import WanTransformer3DModel

from ..errors import ModelFileError
from ..model.transformer import build_transformer
from .common import assign_tensor
from .keys import check_dit_keys, check_matches_config, fp32_names, inspect_wan_checkpoint, model_names

if TYPE_CHECKING:
    import gguf

_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _reader(path: Path) -> "gguf.GGUFReader":
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises plain ValueErrors/struct errors for non-GGUF data
        raise ModelFileError(f"{path} is not a readable GGUF file: {exc}") from None


ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."  # ComfyUI-GGUF's record of tensors reshaped to fit GGUF's 4 dims


def gguf_shapes(reader: "gguf.GGUFReader") -> dict[str, tuple[int, ...]]:
    """Logical (PyTorch-order) shape of every tensor in a GGUF file, without reading the data.

    Tensors with more than 4 dims (Wan's Conv3d patch embedding) are stored flattened by ComfyUI-GGUF's converter,
    which records the real shape in a ``comfy.gguf.orig_shape.<name>`` field; that shape wins.
    """
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    for field_name, field in reader.fields.items():
        name = field_name[len(ORIG_SHAPE_KEY):]
        if field_name.startswith(ORIG_SHAPE_KEY) and name in shapes:
            shapes[name] = tuple(int(n) for n in field.contents())
    return shapes


def gguf_copied_bytes(path: Path, compute_dtype: torch.dtype) -> int:
    """About how many bytes of RAM :func:`load_gguf_dit` copies out of the memory-mapped file at ``path``: its
    unquantized (F32/F16/BF16) tensors, converted to ``compute_dtype`` (all of an F16 file; the biases, norms and
    embeddings of a quantized one); the quantized weights stay in the file. Read from the header only."""
    reader = _reader(path)
    return sum(int(t.n_elements) for t in reader.tensors if t.tensor_type.name in _FLOAT_TYPES) * compute_dtype.itemsize


def load_gguf_dit(path: Path, config: dict, compute_dtype: torch.dtype = torch.bfloat16,
                  device: str | torch.device = "cpu") -> WanTransformer3DModel:
    """Load a GGUF Wan2.1-I2V DiT described by ``config`` (a ``WanTransformer3DModel`` config dict)."""
    from diffusers.quantizers.gguf.utils import GGUFParameter, _replace_with_gguf_linear, dequantize_gguf_tensor

    reader = _reader(path)
    shapes = gguf_shapes(reader)
    info = inspect_wan_checkpoint(shapes)
    check_matches_config(info, config, str(path))
    names = model_names(list(shapes), info.key_format)
    model = build_transformer(config, empty=True)
    check_dit_keys({names[k]: v for k, v in shapes.items()}, model, str(path))

    keep_fp32 = fp32_names(model)
    quantized = {names[t.name]: t.tensor_type for t in reader.tensors if t.tensor_type.name not in _FLOAT_TYPES}
    markers = {n: GGUFParameter(torch.empty(0, dtype=torch.uint8), quant_type=q) for n, q in quantized.items()
               if n not in keep_fp32}
    _replace_with_gguf_linear(model, compute_dtype, markers, modules_to_not_convert=model._keep_in_fp32_modules)
    for tensor in reader.tensors:
        name = names[tensor.name]
        with warnings.catch_warnings():  # the memory map is read-only; the weights are never written to
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(tensor.data)  # a view of the memory-mapped file: no copy
        if name in markers:
            value = GGUFParameter(data, quant_type=tensor.tensor_type)
        else:
            if name in quantized:  # quantized weight of a module diffusers keeps in float32
                data = dequantize_gguf_tensor(GGUFParameter(data, quant_type=tensor.tensor_type))
            if tensor.tensor_type.name == "BF16":  # gguf-py hands bfloat16 over as raw bytes
                data = data.view(torch.bfloat16)
            value = data.reshape(shapes[tensor.name]).to(torch.float32 if name in keep_fp32 else compute_dtype)
        assign_tensor(model, name, value.to(device))
    return model.eval().requires_grad_(False)
