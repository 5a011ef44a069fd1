"""FantasyTalking audio features: wav2vec2-base-960h ``last_hidden_state`` for a recording, the official way.

The official pipeline (Fantasy-AMAP/fantasy-talking, infer.py + utils.get_audio_features) does:

1. ``duration = librosa.get_duration(filename=audio_path)``
2. ``num_frames = min(int(fps * duration // 4) * 4 + 5, max_num_frames)``          -> :func:`frames_for_duration`
3. ``audio = librosa.load(audio_path, sr=16000)``: mean of channels, soxr resample   -> :mod:`.audio_io`
4. ``audio[: int(num_frames / fps * 16000)]``                                        -> :func:`crop_for_frames`
5. ``Wav2Vec2Processor(...)(segment, sampling_rate=16000).input_values``:
   ``(x - mean) / sqrt(var + 1e-7)`` over the whole cropped segment                  -> :func:`normalize_utterance`
6. ``Wav2Vec2Model(input_values).last_hidden_state`` -> [1, L, 768], 50 tokens/s     -> :func:`encode_audio`

:func:`extract_audio_features` runs all of it; the ComfyUI nodes and the CLI call that one.

Long recordings (section "Chunking" in :func:`encode_audio`) are encoded in bounded memory: the convolutional
front end is computed block by block *exactly* (its one global operation, the GroupNorm of the first conv layer,
uses statistics gathered over the whole utterance in a first pass), and the transformer runs on overlapping
windows of ``chunk_seconds`` that are stitched at the middle of each overlap. A clip that fits in one window gives
the one-shot result (measured max |diff| 4e-6 with a base-size model); a clip that is split differs from a one-shot
run because wav2vec2's self-attention sees the whole utterance (see docs/benchmarks.md for measured figures).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

from . import io as audio_io
from .io import TARGET_SAMPLE_RATE, DecodedAudio, ResampleBackend
from ..errors import AudioInputError, ModelFileError, ModelNotFoundError

logger = logging.getLogger(__name__)

RIGHT_MODEL = "facebook/wav2vec2-base-960h"
SAMPLE_RATE = TARGET_SAMPLE_RATE
NORM_EPS = 1e-7
"""Wav2Vec2FeatureExtractor's epsilon: (x - mean) / sqrt(var + 1e-7)."""
DEFAULT_FPS = 23
DEFAULT_MAX_FRAMES = 81
# Transformer windows. 60 s keeps every clip up to a minute exact (one window, the official one-shot result) while
# memory stays ~1.1 GB for a base model on CPU (SDPA attention does not materialise the 3000x3000 score matrix)
# and the attention cost is still small next to the linear layers. 10 s of overlap gives every kept token >= 5 s
# of context on each side of a seam, at 1.2x the cost of no overlap.
DEFAULT_CHUNK_SECONDS = 60.0
DEFAULT_OVERLAP_SECONDS = 10.0
# The exact convolutional front end runs on blocks of this many seconds of output; it only bounds memory
# (the result does not depend on it). 10 s of base-size front end peaks at about 0.3 GB of activations.
FRONTEND_BLOCK_SECONDS = 10.0

BUNDLED_CONFIG_PATH = Path(__file__).parent.parent / "configs" / "wav2vec2-base-960h.json"

ProgressCallback = Callable[[int, int], None]
"""``progress(done, total)``: work units done so far out of ``total``."""

_FIX_HINT = (
    f"FantasyTalking's audio adapter was trained on the features of {RIGHT_MODEL} (wav2vec2-base, 768 wide, "
    "12 layers, CTC fine-tuned on LibriSpeech 960 h); any other audio encoder gives features it cannot read. "
    f"Put {RIGHT_MODEL} in models/audio_encoders/: either its folder (config.json + model.safetensors) "
    "or its weights as one .safetensors file."
)

# Substrings of file/folder names or config `_name_or_path` that identify models known to be wrong.
_WRONG_NAME_HINTS: tuple[tuple[str, str], ...] = (
    ("chinese", "chinese-wav2vec2-base (TencentGameMate), a different model with the same shapes"),
    ("whisper", "a Whisper model"),
    ("hubert", "a HuBERT model"),
    ("wavlm", "a WavLM model"),
    ("data2vec", "a data2vec-audio model"),
    ("xlsr", "a wav2vec2 XLSR model"),
    ("lv60", "wav2vec2-large-lv60"),
    ("large", "a wav2vec2-large model"),
)

# Config fields that change the computation (shapes, norms, activations). They must equal the reference.
_ARCH_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "conv_dim",
    "conv_kernel",
    "conv_stride",
    "conv_bias",
    "feat_extract_norm",
    "feat_extract_activation",
    "hidden_act",
    "do_stable_layer_norm",
    "num_conv_pos_embeddings",
    "num_conv_pos_embedding_groups",
    "layer_norm_eps",
    "add_adapter",
)
_ACCEPTED_ARCHITECTURES = {"Wav2Vec2ForCTC", "Wav2Vec2Model"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


# ====================================================================================================================
# Frame count and crop (the official rules)
# ====================================================================================================================


def frames_for_duration(duration_s: float, fps: float = DEFAULT_FPS, max_frames: int | None = DEFAULT_MAX_FRAMES) -> int:
    """Number of video frames for a recording, the official rule ``min(int(fps * duration // 4) * 4 + 5, max)``.

    The result is always 4k+1 (what Wan's VAE needs). Uncapped, the video lasts between 1 and 5 frames longer
    than the audio (``fps * duration < num_frames <= fps * duration + 5``); capped, it is shorter.

    Args:
        duration_s: length of the recording in seconds (>= 0).
        fps: video frame rate (> 0). The official default is 23.
        max_frames: cap (4k+1, >= 5), or None for no cap. The official default is 81.
    """
    if not math.isfinite(float(fps)) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if not math.isfinite(float(duration_s)) or duration_s < 0:
        raise ValueError(f"duration_s must be a finite number of seconds >= 0, got {duration_s!r}")
    if max_frames is not None and (int(max_frames) != max_frames or max_frames < 5 or (max_frames - 1) % 4):
        raise ValueError(f"max_frames must be 4k+1 and >= 5 (e.g. 81, 121, 161), got {max_frames!r}")
    # Same float expression as infer.py, so boundary cases round identically.
    num_frames = int(fps * duration_s // 4) * 4 + 5
    return num_frames if max_frames is None else min(num_frames, int(max_frames))


def crop_samples_for_frames(num_frames: int, fps: float = DEFAULT_FPS, sample_rate: int = SAMPLE_RATE) -> int:
    """Number of 16 kHz samples the official code keeps for ``num_frames``: ``int(num_frames / fps * sr)``."""
    return int(num_frames / fps * sample_rate)


def crop_for_frames(waveform_16k: torch.Tensor, num_frames: int, fps: float = DEFAULT_FPS) -> torch.Tensor:
    """Keep the first ``int(num_frames / fps * 16000)`` samples of a 16 kHz waveform [T] (fewer if it is shorter)."""
    return waveform_16k[: crop_samples_for_frames(num_frames, fps)]


def wav2vec2_num_tokens(
    num_samples: int,
    conv_kernel: tuple[int, ...] | list[int] = (10, 3, 3, 3, 3, 2, 2),
    conv_stride: tuple[int, ...] | list[int] = (5, 2, 2, 2, 2, 2, 2),
) -> int:
    """Tokens L that wav2vec2's conv stack makes from ``num_samples`` (0 when the input is too short).

    Each layer maps n -> floor((n - kernel) / stride) + 1; for wav2vec2-base 400 samples (25 ms) give 1 token and
    every further 320 samples (20 ms) one more, i.e. ~50 tokens per second.
    """
    n = int(num_samples)
    for k, s in zip(conv_kernel, conv_stride):
        if n < k:
            return 0
        n = (n - k) // s + 1
    return n


def _receptive_field(conv_kernel: tuple[int, ...] | list[int], conv_stride: tuple[int, ...] | list[int]) -> tuple[int, int]:
    """(samples one output token sees, samples between consecutive tokens) of a conv stack: (400, 320) for base."""
    field, hop = 1, 1
    for k, s in zip(conv_kernel, conv_stride):
        field += (k - 1) * hop
        hop *= s
    return field, hop


# ====================================================================================================================
# Per-utterance normalisation (Wav2Vec2FeatureExtractor, do_normalize=True)
# ====================================================================================================================


def utterance_stats(waveform: torch.Tensor, block_samples: int = 1 << 20) -> tuple[float, float]:
    """Mean and population variance of a waveform [T], accumulated block by block in float64.

    Blocks are merged with Chan et al.'s pairwise update, so memory stays bounded by one block and the result
    does not depend on ``block_samples`` beyond float64 rounding.
    """
    if waveform.ndim != 1 or waveform.numel() == 0:
        raise AudioInputError(f"Expected a non-empty mono waveform [samples], got shape {list(waveform.shape)}.")
    count, mean, m2 = 0, 0.0, 0.0
    for start in range(0, waveform.shape[0], block_samples):
        block = waveform[start : start + block_samples].to(torch.float64)
        n_b = block.numel()
        mean_b = float(block.mean())
        m2_b = float(((block - mean_b) ** 2).sum())
        total = count + n_b
        delta = mean_b - mean
        mean += delta * n_b / total
        m2 += m2_b + delta * delta * count * n_b / total
        count = total
    return mean, m2 / count


def _norm_constants(stats: tuple[float, float]) -> tuple[float, float]:
    """(mean, sqrt(var + eps)), the two numbers of the utterance normalisation."""
    mean, var = stats
    return mean, math.sqrt(var + NORM_EPS)


def normalize_utterance(waveform: torch.Tensor, stats: tuple[float, float] | None = None) -> torch.Tensor:
    """Zero mean, unit variance, exactly as Wav2Vec2FeatureExtractor(do_normalize=True) does for one utterance.

    ``(x - mean) / sqrt(var + 1e-7)`` with the statistics of the whole waveform. Digital silence gives zeros (the
    epsilon keeps the denominator >= 3.2e-4), never NaN.

    Args:
        waveform: float tensor [T], 16 kHz, the whole utterance the model will see (i.e. after cropping).
        stats: (mean, population variance) to use, e.g. from :func:`utterance_stats`; computed when None.

    Returns:
        float32 tensor [T].
    """
    mean, denom = _norm_constants(stats if stats is not None else utterance_stats(waveform))
    x = waveform.to(torch.float32)
    return (x - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(denom, dtype=torch.float32)


# ====================================================================================================================
# Loading wav2vec2-base-960h (offline, strict)
# ====================================================================================================================


def bundled_wav2vec2_config() -> Wav2Vec2Config:
    """The config of facebook/wav2vec2-base-960h shipped in ``configs/wav2vec2-base-960h.json``."""
    data = json.loads(BUNDLED_CONFIG_PATH.read_text(encoding="utf-8"))
    data.pop("feature_extractor", None)  # the preprocessor settings, kept next to the model config for reference
    return Wav2Vec2Config.from_dict(data)


def _wrong_model(where: str, found: str) -> ModelFileError:
    return ModelFileError(f"{where}: {found}. {_FIX_HINT}")


def _name_hint(name: str) -> str | None:
    """What a file/folder name (one path component) says about a known wrong model, if anything."""
    low = name.lower()
    return next((what for needle, what in _WRONG_NAME_HINTS if needle in low), None)


def _size_family(hidden: Any, layers: Any) -> str:
    if hidden == 1024 or layers == 24:
        return " (wav2vec2-large size, e.g. wav2vec2-large-960h-lv60-self or wav2vec2-large-xlsr-53)"
    return ""


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _check_config_dict(cfg: Mapping[str, Any], reference: Wav2Vec2Config, where: str) -> None:
    """Refuse a config that is not wav2vec2-base-960h's architecture (or names a known different model)."""
    model_type = cfg.get("model_type")
    if model_type != "wav2vec2":
        what = {"whisper": "a Whisper model", "hubert": "a HuBERT model", "wavlm": "a WavLM model"}.get(
            str(model_type), "not a wav2vec2 model"
        )
        raise _wrong_model(where, f"its config has model_type {model_type!r}: {what}")
    name = str(cfg.get("_name_or_path") or "")
    hint = _name_hint(Path(name).name) if name else None
    if hint:
        raise _wrong_model(where, f"its config names {name!r}, {hint}")
    archs = list(cfg.get("architectures") or [])
    if "Wav2Vec2ForPreTraining" in archs:
        raise _wrong_model(where, "it is a pre-training checkpoint (Wav2Vec2ForPreTraining), not the CTC fine-tuned model")
    others = [a for a in archs if a not in _ACCEPTED_ARCHITECTURES]
    if others:
        raise _wrong_model(where, f"it is a wav2vec2 fine-tuned for another task ({', '.join(others)})")
    defaults = Wav2Vec2Config()  # what transformers assumes for fields a config.json leaves out
    diffs = []
    for field in (*_ARCH_FIELDS, "vocab_size"):
        got, expected = _as_list(cfg.get(field, getattr(defaults, field))), _as_list(getattr(reference, field))
        if got != expected:
            diffs.append(f"{field}={got!r} (expected {expected!r})")
    if diffs:
        family = _size_family(cfg.get("hidden_size"), cfg.get("num_hidden_layers"))
        raise _wrong_model(where, f"its config differs from wav2vec2-base-960h: {', '.join(diffs)}{family}")


def _check_preprocessor(folder: Path, where: str) -> None:
    """The folder's preprocessor_config.json, if any, must describe the same input normalisation."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return
    try:
        pp = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{where}: preprocessor_config.json is not valid JSON ({e}).") from None
    do_normalize, rate = pp.get("do_normalize", True), pp.get("sampling_rate", SAMPLE_RATE)
    if do_normalize is not True or rate != SAMPLE_RATE:
        raise _wrong_model(
            where,
            f"its preprocessor_config.json has do_normalize={do_normalize!r}, sampling_rate={rate!r} "
            f"({RIGHT_MODEL}: true, {SAMPLE_RATE}), so it is a different model",
        )


def _folder_weight_files(folder: Path, where: str) -> list[Path]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ModelFileError(f"{where}: {index} is not a valid shard index ({e}).") from None
            shards = [folder / s for s in sorted(set(weight_map.values()))]
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise ModelNotFoundError(f"{where}: shard files listed in {index} are missing: {', '.join(missing)}.")
            return shards
    present = sorted(f.name for f in folder.iterdir() if f.is_file())
    raise ModelNotFoundError(
        f"{where} has a config.json but no PyTorch weights (model.safetensors or pytorch_model.bin); it contains "
        f"{', '.join(present) or 'nothing else'}. Download {RIGHT_MODEL}'s model.safetensors into it."
    )


def _read_torch_file(file: Path, mmap: bool = False) -> Mapping[str, Any]:
    """The state dict in a torch pickle (weights_only: no code runs). ``mmap`` reads lazily (for inspection)."""
    try:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            obj = torch.load(file, map_location="cpu", weights_only=True)  # legacy format cannot be mapped
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a weights file we can read safely"
        raise ModelFileError(f"{file.name} is not a readable PyTorch weights file ({type(e).__name__}: {e}).") from None
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model", "module"):  # checkpoints that wrap the state dict
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise ModelFileError(f"{file.name} holds a {type(obj).__name__} that is not a state dict of tensors.")


def _inspect_weights(file: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, Any] | None]:
    """(tensor name -> shape, config JSON from safetensors metadata or None), without reading tensor data."""
    suffix = file.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                meta = f.metadata() or {}
        except Exception as e:  # noqa: BLE001 - SafetensorError and OS errors alike
            raise ModelFileError(
                f"{file.name} is not a valid safetensors file ({e}); the download may be incomplete."
            ) from None
        config = None
        if "config" in meta:
            try:
                config = json.loads(meta["config"])
            except ValueError:
                config = None
        return shapes, config if isinstance(config, dict) else None
    if suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return {k: tuple(v.shape) for k, v in _read_torch_file(file, mmap=True).items()}, None
    if suffix == ".gguf":
        raise ModelFileError(f"{file.name}: GGUF is not supported for the audio encoder (it is small; use .safetensors).")
    raise ModelFileError(f"{file.name}: unknown weights format {suffix!r}; expected one of {', '.join(_WEIGHT_SUFFIXES)}.")


def _read_weights(file: Path) -> Mapping[str, torch.Tensor]:
    if file.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file), device="cpu")
    return _read_torch_file(file)


_POS_CONV = "encoder.pos_conv_embed.conv."
_POS_G, _POS_V = _POS_CONV + "parametrizations.weight.original0", _POS_CONV + "parametrizations.weight.original1"


def _canonical_key(key: str) -> str | None:
    """Map a checkpoint key to Wav2Vec2Model's name, or None for keys ignored by design."""
    if key.startswith("wav2vec2."):  # Wav2Vec2ForCTC checkpoints prefix the base model
        key = key[len("wav2vec2.") :]
    if key.startswith("lm_head."):
        # The CTC character head of the fine-tuned checkpoint. FantasyTalking reads last_hidden_state, which
        # is computed before this head, so it is ignored by design (its vocabulary is still checked).
        return None
    # Weight-norm of the positional conv: old checkpoints store weight_g / weight_v.
    return key.replace(_POS_CONV + "weight_g", _POS_G).replace(_POS_CONV + "weight_v", _POS_V)


def _pos_conv_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Shapes with a fused positional-conv ``weight`` shown as the weight-norm pair it will be split into."""
    if _POS_CONV + "weight" in shapes:
        shapes = dict(shapes)
        v = shapes.pop(_POS_CONV + "weight")
        shapes[_POS_G], shapes[_POS_V] = (1, 1, v[2]) if len(v) == 3 else v, v
    return shapes


def _check_weights(
    raw_shapes: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    reference: Wav2Vec2Config,
    where: str,
) -> None:
    """Refuse weights that are not wav2vec2-base(-960h)-shaped, with a message naming what was found."""
    keys = list(raw_shapes)
    if any("embed_positions" in k or re.search(r"(^|\.)encoder\.conv[12]\.weight$", k) for k in keys):
        raise _wrong_model(where, "it holds a Whisper encoder (keys like 'encoder.conv1.weight', 'embed_positions')")
    shapes: dict[str, tuple[int, ...]] = {}
    for k, shape in raw_shapes.items():
        canonical = _canonical_key(k)
        if canonical is not None:
            if canonical in shapes:
                raise ModelFileError(f"{where}: the tensor {canonical!r} is stored twice (as {k!r} and another key).")
            shapes[canonical] = shape
    if "feature_extractor.conv_layers.0.conv.weight" not in shapes:
        sample = ", ".join(repr(k) for k in sorted(keys)[:4])
        raise _wrong_model(where, f"it is not a wav2vec2 model ({len(keys)} tensors such as {sample})")
    if any(k.startswith(("quantizer.", "project_q.", "project_hid.")) for k in shapes):
        raise _wrong_model(where, "it is a wav2vec2 pre-training checkpoint (quantizer/project_q keys), not the CTC fine-tuned model")
    hidden = (shapes.get("encoder.layer_norm.weight") or (None,))[0]
    layer_ids = [int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.layers\.(\d+)\.", k))]
    layers = max(layer_ids) + 1 if layer_ids else 0
    conv_norm = "layer" if "feature_extractor.conv_layers.1.layer_norm.weight" in shapes else "group"
    conv_bias = "feature_extractor.conv_layers.1.conv.bias" in shapes
    found = (hidden, layers, conv_norm, conv_bias)
    wanted = (reference.hidden_size, reference.num_hidden_layers, reference.feat_extract_norm, reference.conv_bias)
    if found != wanted:
        raise _wrong_model(
            where,
            f"it holds a wav2vec2-type model with hidden size {hidden}, {layers} layers, a {conv_norm}-norm conv "
            f"front end{' with' if conv_bias else ' without'} conv bias (wav2vec2-base-960h: {wanted[0]}, "
            f"{wanted[1]} layers, {wanted[2]}-norm, {'with' if wanted[3] else 'without'} bias)"
            + _size_family(hidden, layers),
        )
    lm_head = next((s for k, s in raw_shapes.items() if k.endswith("lm_head.weight")), None)
    if lm_head is not None and lm_head[0] != reference.vocab_size:
        raise _wrong_model(
            where, f"its CTC head has {lm_head[0]} outputs (wav2vec2-base-960h: {reference.vocab_size}): another fine-tune"
        )
    shapes = _pos_conv_shapes(shapes)
    optional = {"masked_spec_embed"}  # SpecAugment's mask vector: training only, dropped by some repacks
    missing = [k for k in expected if k not in shapes and k not in optional]
    unexpected = [k for k in shapes if k not in expected]
    mismatched = [f"{k} {list(shapes[k])} (expected {list(expected[k])})" for k in expected if k in shapes and shapes[k] != expected[k]]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        if items:
            more = f" and {len(items) - 5} more" if len(items) > 5 else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:5])}{more}")
    if problems:
        raise ModelFileError(
            f"{where} does not match wav2vec2-base-960h tensor for tensor ({'; '.join(problems)}). "
            f"The file is incomplete or a different model. {_FIX_HINT}"
        )


def _fit_pos_conv(state: dict[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Convert the positional conv between its three stored forms to the one this transformers version uses."""
    fused_key = _POS_CONV + "weight"
    if fused_key in state and _POS_V in expected:  # fused weight -> weight-norm pair (norm over all dims but 2)
        w = state.pop(fused_key).float()
        state[_POS_G] = torch.linalg.vector_norm(w, dim=(0, 1), keepdim=True)
        state[_POS_V] = w
    elif _POS_V in state and fused_key in expected:  # weight-norm pair -> fused weight
        g, v = state.pop(_POS_G).float(), state.pop(_POS_V).float()
        state[fused_key] = v * (g / torch.linalg.vector_norm(v, dim=(0, 1), keepdim=True))


def load_wav2vec2(
    path: str | os.PathLike[str],
    device: torch.device | str | None = None,
    *,
    config: Wav2Vec2Config | None = None,
) -> Wav2Vec2Model:
    """Load wav2vec2-base-960h offline, strictly, from a Hugging Face folder or a single weights file.

    Accepted:
      * a folder with ``config.json`` and ``model.safetensors`` / ``pytorch_model.bin`` (or a shard index), as
        saved by ``save_pretrained`` or downloaded from the Hub;
      * one ``.safetensors`` / ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` file, e.g. in ComfyUI's
        ``models/audio_encoders/``. Its architecture is the bundled config unless the safetensors metadata
        carries a ``config`` JSON.
    Keys may carry the ``wav2vec2.`` prefix of Wav2Vec2ForCTC or not. The CTC ``lm_head.*`` is ignored by
    design; every other key must match (strict). The positional conv may be stored as ``weight_g``/``weight_v``
    (old), ``parametrizations.weight.original0/1`` (new) or a fused ``weight``.

    Args:
        path: folder or file.
        device: where to put the model (default CPU).
        config: architecture to expect; defaults to the bundled wav2vec2-base-960h config (tests pass tiny ones).

    Returns:
        Wav2Vec2Model in eval mode with gradients off, float32 whatever the file stores: the official code runs
        wav2vec2 in float32, and a bfloat16 encode is not a rounding of it (on CPUs with AMX-BF16 it differed by
        73% of the output's range), so no reduced-precision option is offered.

    Raises:
        ModelNotFoundError: path or weights missing.
        ModelFileError: unreadable file, wrong model (wav2vec2-large, chinese-wav2vec2-base, Whisper, HuBERT,
            a VAE, ...), or tensors that do not match. Messages name the right model, ``facebook/wav2vec2-base-960h``.

    Limits: a chinese-wav2vec2-base (or HuBERT-base) file without config has exactly the same tensor names and
    shapes; it is recognised only by its file name or config, not by its weights.
    """
    reference = config if config is not None else bundled_wav2vec2_config()
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"wav2vec2 model not found: {p}. {_FIX_HINT}")
    where = p.name
    hint = _name_hint(p.stem if p.is_file() else p.name)
    if hint:
        raise _wrong_model(where, f"the name says it is {hint}")
    if p.is_dir():
        config_path = p / "config.json"
        if not config_path.is_file():
            raise ModelNotFoundError(
                f"{where} has no config.json. Add the model's config.json, or point at the weights file itself "
                f"to load it with the bundled {RIGHT_MODEL} config."
            )
        try:
            config_dict = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ModelFileError(f"{where}: config.json is not valid JSON ({e}).") from None
        _check_config_dict(config_dict, reference, where)
        _check_preprocessor(p, where)
        files = _folder_weight_files(p, where)
    else:
        files = [p]
    raw_shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        shapes, meta_config = _inspect_weights(f)
        if meta_config is not None and not p.is_dir():
            _check_config_dict(meta_config, reference, where)
        raw_shapes.update(shapes)

    # Build on the meta device: no time or memory spent on a random init that the checkpoint overwrites.
    with torch.device("meta"):
        model = Wav2Vec2Model(reference)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_weights(raw_shapes, expected, reference, where)

    state: dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in _read_weights(f).items():
            canonical = _canonical_key(k)
            if canonical is not None:
                state[canonical] = v
    _fit_pos_conv(state, expected)
    if "masked_spec_embed" in expected and "masked_spec_embed" not in state:
        state["masked_spec_embed"] = torch.zeros(expected["masked_spec_embed"])
    for k in list(state):  # one tensor at a time, so an fp16 file never exists twice in memory in float32
        state[k] = state[k].to(torch.float32).contiguous()
    # assign=True makes the loaded tensors the parameters (no second copy of the weights at load time).
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.eval().requires_grad_(False)
    return model.to(device=torch.device(device) if device is not None else "cpu")


# ====================================================================================================================
# Chunked encoding
# ====================================================================================================================


def encoder_windows(num_tokens: int, window: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Split ``num_tokens`` into overlapping transformer windows.

    Consecutive windows overlap by ``overlap`` tokens; the seam between two windows is the middle of their overlap,
    so every kept token has at least ``overlap // 2`` tokens of context on the seam side.

    Returns:
        list of (start, end, keep_start, keep_end): the model sees tokens [start, end) and its outputs for
        [keep_start, keep_end) are kept. The keep ranges tile [0, num_tokens) in order.
    """
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"need window >= 1 and 0 <= overlap < window, got window={window}, overlap={overlap}")
    if num_tokens <= window:
        return [(0, num_tokens, 0, num_tokens)]
    step = window - overlap
    count = math.ceil((num_tokens - window) / step) + 1
    starts = [min(i * step, num_tokens - window) for i in range(count)]
    out = []
    for i, start in enumerate(starts):
        end = start + window
        keep_start = 0 if i == 0 else (start + starts[i - 1] + window) // 2
        keep_end = num_tokens if i == count - 1 else (starts[i + 1] + end) // 2
        out.append((start, end, keep_start, keep_end))
    return out


def _check_model(model: Any) -> Wav2Vec2Model:
    if not isinstance(model, Wav2Vec2Model):
        raise TypeError(f"encode_audio needs a transformers Wav2Vec2Model (see load_wav2vec2), got {type(model).__name__}")
    if model.config.feat_extract_norm != "group":
        raise ModelFileError(f"This wav2vec2 uses feat_extract_norm={model.config.feat_extract_norm!r}. {_FIX_HINT}")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise TypeError(
            f"encode_audio computes wav2vec2 in float32, as the official code does; this model holds "
            f"{', '.join(sorted(str(d) for d in dtypes))} weights. Load it with load_wav2vec2 or call model.float()."
        )
    return model


@torch.inference_mode()
def encode_audio(
    model: Wav2Vec2Model,
    waveform_16k: torch.Tensor,
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
    overlap_seconds: float = DEFAULT_OVERLAP_SECONDS,
    progress: ProgressCallback | None = None,
) -> torch.Tensor:
    """wav2vec2 ``last_hidden_state`` of one utterance, in bounded memory.

    Args:
        model: a float32 Wav2Vec2Model (from :func:`load_wav2vec2`), on any device.
        waveform_16k: float tensor [T], mono, 16 kHz, NOT normalised (this function normalises it over the whole
            utterance, like Wav2Vec2FeatureExtractor). T >= 400 samples (25 ms, one token).
        chunk_seconds: longest stretch of audio one transformer call sees (> 0). Bounds memory and time: the
            attention cost grows with its square. Clips up to this length are encoded in one call.
        overlap_seconds: overlap between consecutive transformer windows, 0 <= overlap < chunk. Stitching happens
            at the middle of each overlap, so every kept token has >= overlap/2 seconds of context on each side.
        progress: optional ``progress(done, total)`` callback.

    Returns:
        float32 CPU tensor [L, hidden_size], L = :func:`wav2vec2_num_tokens` (T) (~50 per second).

    Chunking:
        1. mean/variance of the utterance, streamed (:func:`utterance_stats`).
        2. pass 1 over the first conv layer, block by block, to get the per-channel statistics of its GroupNorm
           over the whole utterance (that GroupNorm normalises each channel over time, the only global step of the
           conv front end).
        3. pass 2: conv front end + feature projection on blocks of FRONTEND_BLOCK_SECONDS whose inputs overlap
           by the receptive field (400 samples), using the global GroupNorm statistics: identical to one-shot up to
           float rounding for any length.
        4. the transformer (positional conv + 12 self-attention layers) on windows of ``chunk_seconds`` overlapping
           by ``overlap_seconds``. Exact when the clip fits in one window; otherwise approximate, because
           self-attention in a one-shot run mixes in context from the whole utterance.
    """
    model = _check_model(model)
    if not isinstance(waveform_16k, torch.Tensor) or waveform_16k.ndim != 1:
        shape = list(waveform_16k.shape) if isinstance(waveform_16k, torch.Tensor) else type(waveform_16k).__name__
        raise AudioInputError(f"encode_audio expects a mono 16 kHz waveform [samples], got {shape}.")
    if not (math.isfinite(chunk_seconds) and chunk_seconds > 0):
        raise ValueError(f"chunk_seconds must be > 0, got {chunk_seconds!r}")
    if not (math.isfinite(overlap_seconds) and 0 <= overlap_seconds < chunk_seconds):
        raise ValueError(f"overlap_seconds must be >= 0 and < chunk_seconds ({chunk_seconds}), got {overlap_seconds!r}")
    cfg = model.config
    field, hop = _receptive_field(cfg.conv_kernel, cfg.conv_stride)
    wave = waveform_16k.detach().to("cpu", torch.float32)
    num_tokens = wav2vec2_num_tokens(wave.shape[0], cfg.conv_kernel, cfg.conv_stride)
    if num_tokens < 1:
        raise AudioInputError(
            f"The audio is {1000 * wave.shape[0] / SAMPLE_RATE:.1f} ms long; wav2vec2 needs at least "
            f"{1000 * field / SAMPLE_RATE:.0f} ms ({field} samples at 16 kHz) to make one feature. "
            "Give a longer recording."
        )
    audio_io.validate_waveform(wave[None], SAMPLE_RATE, "16 kHz waveform")

    tokens_per_second = SAMPLE_RATE / hop
    window = max(1, round(chunk_seconds * tokens_per_second))
    overlap = min(window - 1, round(overlap_seconds * tokens_per_second))
    windows = encoder_windows(num_tokens, window, overlap)
    block_tokens = max(1, round(FRONTEND_BLOCK_SECONDS * tokens_per_second))
    blocks = [(a, min(a + block_tokens, num_tokens)) for a in range(0, num_tokens, block_tokens)]
    k0, s0 = cfg.conv_kernel[0], cfg.conv_stride[0]
    # Every conv0 output frame counts in its GroupNorm statistics, also the trailing ones no token uses.
    frames0_total = (wave.shape[0] - k0) // s0 + 1
    frames0_per_block = block_tokens * (hop // s0)
    stat_blocks = range(0, frames0_total, frames0_per_block)
    total, done = len(stat_blocks) + len(blocks) + len(windows), 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    mean, denom = _norm_constants(utterance_stats(wave))

    def normalized(start: int, stop: int) -> torch.Tensor:
        seg = (wave[start:stop] - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(denom, dtype=torch.float32)
        return seg.to(device, dtype)[None, None]  # [1, 1, n]

    conv0 = model.feature_extractor.conv_layers[0]

    # Pass 1: per-channel mean/variance of conv0's output over the whole utterance (Chan merge in float64),
    # on non-overlapping blocks of conv0 frames.
    count, ch_mean, ch_m2 = 0, None, None
    for f0 in stat_blocks:
        f1 = min(f0 + frames0_per_block, frames0_total)
        y = conv0.conv(normalized(f0 * s0, (f1 - 1) * s0 + k0))[0].float()  # [C0, f1 - f0]
        var_b, mean_b = torch.var_mean(y, dim=1, correction=0)
        n_b, mean_b, m2_b = y.shape[1], mean_b.double(), var_b.double() * y.shape[1]
        if ch_mean is None:
            count, ch_mean, ch_m2 = n_b, mean_b, m2_b
        else:
            tot = count + n_b
            delta = mean_b - ch_mean
            ch_mean = ch_mean + delta * (n_b / tot)
            ch_m2 = ch_m2 + m2_b + delta * delta * (count * n_b / tot)
            count = tot
        tick()
    # GroupNorm(x) = (x - mean) / sqrt(var + eps) * w + b, folded into x * scale + shift; kept in float32 so
    # that half-precision models normalise as accurately as torch's GroupNorm (which upcasts internally).
    gn = conv0.layer_norm
    inv_std = 1.0 / torch.sqrt(ch_m2 / count + gn.eps)
    gn_scale = (gn.weight.double() * inv_std).to(device, torch.float32)[:, None]
    gn_shift = (gn.bias.double() - ch_mean * gn.weight.double() * inv_std).to(device, torch.float32)[:, None]

    # Pass 2: exact conv front end + feature projection, block by block.
    hidden = torch.empty(num_tokens, cfg.hidden_size, dtype=dtype, device=device)
    for a, b in blocks:
        x = conv0.conv(normalized(a * hop, (b - 1) * hop + field))
        x = conv0.activation((x.float() * gn_scale + gn_shift).to(dtype))
        for layer in model.feature_extractor.conv_layers[1:]:
            x = layer(x)
        if x.shape[-1] != b - a:  # geometry guard: would mean a wrong receptive-field computation
            raise RuntimeError(f"front-end block gave {x.shape[-1]} tokens, expected {b - a}")
        projected, _ = model.feature_projection(x.transpose(1, 2))
        hidden[a:b] = projected[0]
        tick()

    # Transformer on overlapping windows, stitched at the middle of each overlap.
    out = torch.empty(num_tokens, cfg.hidden_size, dtype=torch.float32)
    for start, end, keep_start, keep_end in windows:
        states = model.encoder(hidden[start:end][None]).last_hidden_state[0]
        out[keep_start:keep_end] = states[keep_start - start : keep_end - start].float().cpu()
        tick()
    return out


# ====================================================================================================================
# One call for the nodes and the CLI
# ====================================================================================================================


@dataclass(frozen=True)
class AudioFeatures:
    """Everything the video pipeline needs from the recording.

    Attributes:
        features: float32 [L, 768] wav2vec2 last_hidden_state, ~50 tokens per second of the cropped audio.
        num_frames: video frames (4k+1) by the official rule.
        fps: video frame rate.
        duration_s: length of the whole recording in seconds (before cropping).
        waveform_16k: float32 [T] mono 16 kHz audio actually encoded (cropped, not normalised); mux this into
            the video so sound and picture line up.
    """

    features: torch.Tensor
    num_frames: int
    fps: float
    duration_s: float
    waveform_16k: torch.Tensor

    sample_rate: int = SAMPLE_RATE

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_latent_frames(self) -> int:
        """Latent frames of Wan's VAE: (num_frames - 1) // 4 + 1."""
        return (self.num_frames - 1) // 4 + 1

    @property
    def video_duration_s(self) -> float:
        return self.num_frames / self.fps


def extract_audio_features(
    model: Wav2Vec2Model,
    audio: Mapping[str, Any] | str | os.PathLike[str] | DecodedAudio,
    fps: float = DEFAULT_FPS,
    max_frames: int | None = DEFAULT_MAX_FRAMES,
    *,
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
    overlap_seconds: float = DEFAULT_OVERLAP_SECONDS,
    progress: ProgressCallback | None = None,
    resample_backend: ResampleBackend = "auto",
) -> AudioFeatures:
    """Recording in, FantasyTalking audio features out (steps 1-6 of the module docstring).

    Args:
        model: wav2vec2-base-960h from :func:`load_wav2vec2`.
        audio: a ComfyUI AUDIO value ``{"waveform": [B=1, C, T], "sample_rate": int}``, an audio/video file path,
            or a :class:`~.audio_io.DecodedAudio`.
        fps: video frame rate (official default 23).
        max_frames: cap on the frame count (4k+1; official default 81), None for no cap.
        chunk_seconds, overlap_seconds, progress: see :func:`encode_audio`.
        resample_backend: see :func:`.audio_io.resample`.

    Raises:
        AudioInputError: empty, non-finite, shorter than 25 ms, not audio; FileNotFoundError: missing file.
    """
    decoded = audio_io.load_audio(audio)
    duration_s, sample_rate = decoded.duration_s, decoded.sample_rate
    # Frame count from the original recording's length, as librosa.get_duration gives it in infer.py.
    num_frames = frames_for_duration(duration_s, fps, max_frames)
    mono = audio_io.to_mono(decoded.waveform)
    del decoded  # the multichannel original can be large; only the mono copy is needed from here
    # Resample the whole recording, then crop: the official order (it matters within a filter length of the cut).
    wave_16k = audio_io.resample(mono, sample_rate, SAMPLE_RATE, resample_backend)
    del mono
    wave_16k = crop_for_frames(wave_16k, num_frames, fps).clone()  # clone: do not pin the uncropped buffer
    if not bool(wave_16k.any()):
        logger.warning("The audio is digital silence: the features are valid, but the face will not speak.")
    features = encode_audio(model, wave_16k, chunk_seconds, overlap_seconds, progress)
    return AudioFeatures(features, num_frames, float(fps), duration_s, wave_16k)
