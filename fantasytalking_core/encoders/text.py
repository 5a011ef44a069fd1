"""umT5-XXL text encoder of Wan2.1: prompt -> context embeddings [L, 4096] for the DiT's cross-attention.

The network is transformers' :class:`~transformers.UMT5EncoderModel` (gated-GELU with the tanh approximation,
as Wan's own T5; a relative position bias in every layer). Files accepted by :func:`load_text_encoder`:

- Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` (keys ``token_embedding``, ``blocks.{i}.*``, ``norm``);
- ComfyUI's ``umt5_xxl_fp16.safetensors`` / ``umt5_xxl_fp8_e4m3fn_scaled.safetensors`` and the ``text_encoder``
  of the ``-Diffusers`` repos (transformers layout: ``shared``, ``encoder.block.{i}.layer.*``); the fp8-scaled
  weights are dequantized on read. A bundled tokenizer (``spiece_model``) and a T5 decoder are skipped.

Prompts are cleaned like Wan (:func:`clean_prompt`), tokenized to ``max_length`` (512) tokens with an attention
mask, encoded, and trimmed to the real length (tokens + EOS), as Wan's prompter returns them.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path

import regex  # a transformers dependency; Wan collapses whitespace with it
import torch
from accelerate import init_empty_weights
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from ..errors import ModelFileError, ModelNotFoundError
from ..loaders.common import Rename, Source, assign_weights, plan_from_table, read_config, resolve_dtype, wrong_file_error
from ..loaders.state_dict import open_checkpoint, strip_prefix

T5_CONFIG = "umt5_xxl_encoder.json"
TEXT_LEN = 512

_INFO_KEYS = {"construct", "_class_name", "_name", "architectures", "model_type", "transformers_version"}
_FIX = ("Choose the umT5-XXL text encoder of Wan2.1 (ComfyUI's umt5_xxl_fp16.safetensors / "
        "umt5_xxl_fp8_e4m3fn_scaled.safetensors, or Wan's models_t5_umt5-xxl-enc-bf16.pth), or pass the config "
        "that matches the file.")

# Wan layout -> transformers UMT5EncoderModel names. Wan's FFN is fc1(x) * gelu(gate(x)); transformers' gated
# FFN is act(wi_0(x)) * wi_1(x), so gate -> wi_0 and fc1 -> wi_1.
WAN_T5_KEYS: tuple[Rename, ...] = (
    Rename("shared.weight", "token_embedding.weight"),
    Rename("encoder.embed_tokens.weight", "token_embedding.weight"),  # tied to shared: same tensor, one read
    Rename("encoder.block.{i}.layer.0.layer_norm.weight", "blocks.{i}.norm1.weight"),
    Rename("encoder.block.{i}.layer.0.SelfAttention.q.weight", "blocks.{i}.attn.q.weight"),
    Rename("encoder.block.{i}.layer.0.SelfAttention.k.weight", "blocks.{i}.attn.k.weight"),
    Rename("encoder.block.{i}.layer.0.SelfAttention.v.weight", "blocks.{i}.attn.v.weight"),
    Rename("encoder.block.{i}.layer.0.SelfAttention.o.weight", "blocks.{i}.attn.o.weight"),
    Rename("encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",
           "blocks.{i}.pos_embedding.embedding.weight"),
    Rename("encoder.block.{i}.layer.1.layer_norm.weight", "blocks.{i}.norm2.weight"),
    Rename("encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight", "blocks.{i}.ffn.gate.0.weight"),
    Rename("encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight", "blocks.{i}.ffn.fc1.weight"),
    Rename("encoder.block.{i}.layer.1.DenseReluDense.wo.weight", "blocks.{i}.ffn.fc2.weight"),
    Rename("encoder.final_layer_norm.weight", "norm.weight"),
)

# Wan's own config names -> UMT5Config names (dim_attn becomes d_kv = dim_attn / num_heads).
_WAN_NAMES = {"vocab": "vocab_size", "dim": "d_model", "dim_ffn": "d_ff", "num_heads": "num_heads",
              "num_layers": "num_layers", "num_buckets": "relative_attention_num_buckets", "dropout": "dropout_rate"}


def t5_config(config: str | Path | Mapping | None = None) -> UMT5Config:
    """The UMT5Config: bundled umT5-XXL encoder, overridden by ``config``.

    ``config`` may use transformers' names or Wan's own (``vocab``, ``dim``, ``dim_attn``, ... as in the test
    fixture's config.json).
    """
    merged = {k: v for k, v in read_config(None, T5_CONFIG).items() if k not in _INFO_KEYS}
    if config is not None:
        user = {k: v for k, v in read_config(config, T5_CONFIG).items() if k not in _INFO_KEYS}
        if "dim" in user and "d_model" not in user:
            user = _from_wan_names(user)
        unknown = sorted(set(user) - set(UMT5Config().to_dict()))
        if unknown:
            raise ModelFileError(f"Unknown umT5 config key(s) {unknown}.")
        merged.update(user)
    config = UMT5Config(**merged)
    # The official umT5 attention is the plain matmul-softmax-matmul. transformers' SDPA route hands bf16 to a
    # CPU flash kernel that depends on the CPU's instruction set (it fails outright when ATEN_CPU_CAPABILITY is
    # below the CPU's); the encoder runs once per video, so the portable eager path costs nothing noticeable.
    config._attn_implementation = "eager"
    return config


def _from_wan_names(wan: dict) -> dict:
    if wan.get("shared_pos", False):
        raise ModelFileError("shared_pos=True describes a T5 with one shared position bias; Wan's umT5 has one "
                             "per layer (shared_pos=False), which is the only layout supported.")
    out = {}
    for key, value in wan.items():
        if key == "dim_attn":
            heads = wan.get("num_heads")
            if not heads or value % heads:
                raise ModelFileError(f"dim_attn {value} needs num_heads dividing it, got num_heads={heads}.")
            out["d_kv"] = value // heads
        elif key in ("shared_pos", "text_len"):
            continue  # checked above / a tokenizer setting (max_length of encode_prompt), not the network's
        else:
            out[_WAN_NAMES.get(key, key)] = value
    return out


def _skip_transformers(key: str) -> bool:
    # spiece_model: ComfyUI stores the tokenizer inside the weights file; decoder/lm_head: a full T5 checkpoint.
    return key == "spiece_model" or key.startswith(("decoder.", "lm_head."))


def load_text_encoder(
    path: str | Path,
    config: str | Path | Mapping | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> UMT5EncoderModel:
    """Load the umT5-XXL encoder (Wan or transformers layout, fp32/bf16/fp16/fp8-scaled) into UMT5EncoderModel.

    ``config``: None for umT5-XXL, else a dict or JSON path (see :func:`t5_config`). ``dtype``: None keeps the
    file's dtype (fp8 -> bfloat16). Loading is strict (see :func:`~.vae.assign_weights`).
    """
    ckpt = open_checkpoint(path)
    cfg = t5_config(config)
    prefix, names = strip_prefix(ckpt.keys, ("text_encoder.", "model."))
    with init_empty_weights():
        model = UMT5EncoderModel(cfg)
    targets = list(model.state_dict())

    if "token_embedding.weight" in names and "blocks.0.attn.q.weight" in names:
        plan = plan_from_table(targets, WAN_T5_KEYS, source_prefix=prefix)
        skip = lambda key: False  # noqa: E731
    elif "encoder.block.0.layer.0.SelfAttention.q.weight" in names:
        # The embedding may be stored as shared.weight, encoder.embed_tokens.weight or both (tied: one is read).
        embed = next((k for k in ("shared.weight", "encoder.embed_tokens.weight") if k in names), "shared.weight")
        embed_names = ("shared.weight", "encoder.embed_tokens.weight")
        plan = {t: Source(prefix + (embed if t in embed_names else t)) for t in targets}
        skip = lambda key: (_skip_transformers(key[len(prefix):])  # noqa: E731
                            or key[len(prefix):] in embed_names)
    else:
        raise wrong_file_error(ckpt, "umT5-XXL text encoder", _FIX)

    assign_weights(model, ckpt, plan, ignored=skip, dtype=resolve_dtype(ckpt, dtype), device=device,
                   kind="umT5 text encoder (UMT5EncoderModel)", fix=_FIX)
    return model


EMBEDDED_TOKENIZER = "spiece_model"  # ComfyUI's umT5 files carry the SentencePiece model as a uint8 tensor


def embedded_tokenizer(path: str | Path) -> bytes | None:
    """The SentencePiece model stored inside a text-encoder safetensors file (ComfyUI's umT5 files), or None."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if EMBEDDED_TOKENIZER not in f.keys():
                return None
            return f.get_tensor(EMBEDDED_TOKENIZER).numpy().tobytes()
    except Exception:  # noqa: BLE001 - not a readable safetensors file: the text-encoder loader says so
        return None


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The umT5 tokenizer, read locally (never downloads).

    ``path`` is a folder in the ``google/umt5-xxl`` layout (``tokenizer.json``, or ``spiece.model``, with
    ``tokenizer_config.json``; a Wan model folder containing ``google/umt5-xxl/`` is accepted too), or a umT5
    ``.safetensors`` file from ComfyUI that carries its SentencePiece model (``spiece_model``).
    """
    path = Path(path)
    model = embedded_tokenizer(path)
    if model is not None:
        return _tokenizer_from_sentencepiece(model, path)
    folder = path.parent if path.is_file() else path
    if not folder.is_dir():
        raise ModelNotFoundError(f"Tokenizer folder not found: {folder}")
    if (folder / "google" / "umt5-xxl").is_dir():
        folder = folder / "google" / "umt5-xxl"
    if not any((folder / name).is_file() for name in ("tokenizer.json", "spiece.model")):
        raise ModelFileError(
            f"{folder} holds no umT5 tokenizer (tokenizer.json or spiece.model). Use the google/umt5-xxl folder "
            "of the Wan2.1 model download (tokenizer.json, tokenizer_config.json, special_tokens_map.json), or a "
            "ComfyUI umT5 file that carries its tokenizer.")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelFileError(f"Could not load the tokenizer in {folder}: {exc}") from None


def _tokenizer_from_sentencepiece(model: bytes, source: Path) -> PreTrainedTokenizerBase:
    """transformers' T5 tokenizer built from a SentencePiece model (needs the sentencepiece and protobuf packages,
    as converting ``spiece.model`` always does); it tokenizes exactly as the SentencePiece model, with ``</s>``."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "spiece.model").write_bytes(model)
        (Path(folder) / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer",
                                                                         "extra_ids": 0}))
        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, ImportError) as exc:
            raise ModelFileError(f"Could not build the tokenizer embedded in {source.name}: {exc}") from None


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning (``clean='whitespace'``): ftfy, HTML unescape (twice), whitespace collapse.

    ftfy's defaults change ordinary text too: full-width punctuation becomes ASCII (the default negative
    prompt's "，" -> ","), curly quotes become straight. The official tokens depend on it, so ftfy is
    required (requirements.txt) rather than skipped when missing.
    """
    try:
        import ftfy
    except ImportError:
        raise ImportError("Prompt cleaning needs the 'ftfy' package (pip install ftfy); without it prompts with "
                          "full-width punctuation or curly quotes tokenize differently from Wan.") from None
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def encode_prompt(
    encoder: UMT5EncoderModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    max_length: int = TEXT_LEN,
) -> torch.Tensor:
    """Prompt -> context embeddings [L, d_model] (d_model 4096) in the encoder's dtype, on its device.

    L = number of real tokens including EOS (at most ``max_length``); the padded rows are dropped, as Wan's
    prompter does (the DiT zero-pads the context back to 512 rows itself). The encoder still sees the full
    ``max_length`` sequence with its attention mask, exactly as the official graph.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}.")
    batch = tokenizer([clean_prompt(text)], padding="max_length", truncation=True, max_length=max_length,
                      add_special_tokens=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if int(ids.max()) >= encoder.config.vocab_size:
        raise ModelFileError(f"The tokenizer produced token id {int(ids.max())} but the text encoder has only "
                             f"{encoder.config.vocab_size} embeddings: the tokenizer does not belong to this encoder "
                             "(Wan2.1 needs the google/umt5-xxl tokenizer).")
    out = encoder(input_ids=ids.to(encoder.device), attention_mask=mask.to(encoder.device)).last_hidden_state
    return out[0, : int(mask.sum())]
