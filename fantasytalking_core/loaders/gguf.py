"""GGUF DiT files (e.g. city96's Wan2.1-I2V-14B GGUF quantizations), through diffusers' GGUF support.

The keys are checked strictly first (same rules as the other formats); diffusers then builds the model with
``GGUFLinear`` layers that keep the quantized weights and dequantize them per call in ``compute_dtype``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import GGUFQuantizationConfig, WanTransformer3DModel

from ..errors import ModelFileError
from ..transformer import build_transformer


def gguf_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Logical (PyTorch-order) shape of every tensor in a GGUF file, without reading the data."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises plain ValueErrors/struct errors for non-GGUF data
        raise ModelFileError(f"{path} is not a readable GGUF file: {exc}") from None
    return {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}


def load_gguf_dit(path: Path, config: dict, compute_dtype: torch.dtype = torch.bfloat16,
                  device: str | torch.device = "cpu") -> WanTransformer3DModel:
    """Load a GGUF Wan2.1-I2V DiT described by ``config`` (a ``WanTransformer3DModel`` config dict)."""
    from .wan_dit import _file_to_names, check_keys, check_matches_config, inspect_wan_checkpoint

    shapes = gguf_shapes(path)
    info = inspect_wan_checkpoint(shapes)
    check_matches_config(info, config, str(path))
    names = _file_to_names(list(shapes), info.key_format)
    check_keys({names[k]: v for k, v in shapes.items()}, build_transformer(config, empty=True), str(path))
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel", **config}))
        model = WanTransformer3DModel.from_single_file(
            str(path), config=folder, local_files_only=True, torch_dtype=compute_dtype,
            quantization_config=GGUFQuantizationConfig(compute_dtype=compute_dtype),
        )
    return model.to(device).eval().requires_grad_(False)
