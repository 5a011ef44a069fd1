"""Loading wav2vec2-base-960h, offline and strictly: the audio encoder FantasyTalking's adapter was trained on.

:func:`load_wav2vec2` accepts a Hugging Face folder or one weights file, and refuses every other audio model
(wav2vec2-large, chinese-wav2vec2-base, Whisper, HuBERT, a pre-training checkpoint, ...) with a message naming the
right one. Encoding is in :mod:`.encode`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

from ..errors import ModelFileError, ModelNotFoundError
from ..loaders.common import check_keys
from ..loaders.state_dict import Checkpoint, open_checkpoint, strip_prefix
from .rules import SAMPLE_RATE

RIGHT_MODEL = "facebook/wav2vec2-base-960h"
BUNDLED_CONFIG_PATH = Path(__file__).parent.parent / "configs" / "wav2vec2-base-960h.json"

FIX_HINT = (
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


def bundled_wav2vec2_config() -> Wav2Vec2Config:
    """The config of facebook/wav2vec2-base-960h shipped in ``configs/wav2vec2-base-960h.json``."""
    data = json.loads(BUNDLED_CONFIG_PATH.read_text(encoding="utf-8"))
    data.pop("feature_extractor", None)  # the preprocessor settings, kept next to the model config for reference
    return Wav2Vec2Config.from_dict(data)


def _wrong_model(where: str, found: str) -> ModelFileError:
    return ModelFileError(f"{where}: {found}. {FIX_HINT}")


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
    """The weights of a Hugging Face folder: one file, a safetensors shard index (opened as one checkpoint) or the
    shards of a pytorch_model.bin index."""
    for name in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"):
        if (folder / name).is_file():
            return [folder / name]
    index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelFileError(f"{where}: {index.name} is not a valid shard index ({e}).") from None
        shards = [folder / s for s in sorted(set(weight_map.values()))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise ModelNotFoundError(f"{where}: shard files listed in {index.name} are missing: {', '.join(missing)}.")
        return shards
    present = sorted(f.name for f in folder.iterdir() if f.is_file())
    raise ModelNotFoundError(
        f"{where} has a config.json but no PyTorch weights (model.safetensors or pytorch_model.bin); it contains "
        f"{', '.join(present) or 'nothing else'}. Download {RIGHT_MODEL}'s model.safetensors into it."
    )


def _open_weights(file: Path) -> tuple[Checkpoint, dict[str, str], dict[str, Any] | None]:
    """The shared checkpoint reader on one weights file (or shard index), without reading tensor data.

    Returns the checkpoint, a map from state-dict key to checkpoint key (a pickle's ``state_dict``/``model``/
    ``module`` wrapper removed) and the config JSON of the safetensors metadata, if any.
    """
    name = file.name.lower()
    if name.endswith(".gguf"):
        raise ModelFileError(f"{file.name}: GGUF is not supported for the audio encoder (it is small; use .safetensors).")
    if not name.endswith(_WEIGHT_SUFFIXES + (".safetensors.index.json",)):
        raise ModelFileError(f"{file.name}: unknown weights format {file.suffix!r}; expected one of "
                             f"{', '.join(_WEIGHT_SUFFIXES)}.")
    ckpt = open_checkpoint(file)
    _, keys = strip_prefix(ckpt.keys, ("state_dict.", "model.", "module."))
    config = None
    if "config" in ckpt.metadata:
        try:
            config = json.loads(ckpt.metadata["config"])
        except ValueError:
            config = None
    return ckpt, keys, config if isinstance(config, dict) else None


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
    needed = {k: v for k, v in expected.items() if k in shapes or k not in optional}
    check_keys(shapes, needed, where, "wav2vec2-base-960h", f"The file is incomplete or a different model. {FIX_HINT}")


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
        raise ModelNotFoundError(f"wav2vec2 model not found: {p}. {FIX_HINT}")
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
    opened = []
    for f in files:
        ckpt, keys, meta_config = _open_weights(f)
        if meta_config is not None and not p.is_dir():
            _check_config_dict(meta_config, reference, where)
        raw_shapes.update({key: ckpt.shapes[stored] for key, stored in keys.items()})
        opened.append((ckpt, keys))

    # Build on the meta device: no time or memory spent on a random init that the checkpoint overwrites.
    with torch.device("meta"):
        model = Wav2Vec2Model(reference)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_weights(raw_shapes, expected, reference, where)

    state: dict[str, torch.Tensor] = {}
    for ckpt, keys in opened:
        for k, stored in keys.items():
            canonical = _canonical_key(k)
            if canonical is not None:
                state[canonical] = ckpt.tensor(stored)
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
