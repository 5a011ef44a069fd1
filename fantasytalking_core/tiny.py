"""Tiny random-weight stand-ins for every model, written in real file formats, to check an installation.

``python -m fantasytalking_core generate --tiny`` runs the whole pipeline on them: the video it writes is noise,
not a portrait (the weights are random), but every loader, encoder, the sampler and the mp4 writer really ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .loaders.model_paths import ModelFiles

TINY_DIR = Path(__file__).parent / "configs" / "tiny"


def tiny_configs() -> dict[str, dict]:
    """The tiny architectures (one JSON per part in ``configs/tiny``)."""
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(TINY_DIR.glob("*.json"))}


def make_tokenizer(folder: Path, vocab_size: int = 384) -> Path:
    """A tiny umT5-style tokenizer in the Hugging Face layout: Unigram pieces '▁w<i>' = id i, </s> = 1, <pad> = 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581w{i}", -1.0) for i in range(3, vocab_size)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                    extra_ids=0).save_pretrained(str(folder))
    return folder


def make_tiny_models(folder: str | Path, seed: int = 0) -> ModelFiles:
    """Write random tiny models in a ComfyUI-style ``models/`` tree under ``folder`` and return their paths.

    Formats: DiT as a diffusers folder, adapter as the official ``.ckpt`` pickle, umT5 and CLIP in ComfyUI's
    transformers-style safetensors, VAE in diffusers layout, wav2vec2 as a Hugging Face folder.
    """
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionModel, UMT5EncoderModel, Wav2Vec2Config, Wav2Vec2Model

    from .encoders.image import clip_config
    from .encoders.text import t5_config
    from .encoders.vae import vae_config
    from .model.transformer import build_transformer

    torch.manual_seed(seed)
    root = Path(folder)
    cfg = tiny_configs()
    paths = {name: root / sub for name, sub in {
        "dit": "diffusion_models/wan2.1_i2v_14b_tiny", "adapter": "fantasytalking/fantasytalking_model.ckpt",
        "text_encoder": "text_encoders/umt5_xxl_tiny.safetensors", "tokenizer": "text_encoders/umt5-xxl",
        "image_encoder": "clip_vision/clip_vision_h_tiny.safetensors", "vae": "vae/wan_2.1_vae_tiny.safetensors",
        "wav2vec2": "audio_encoders/wav2vec2-base-960h"}.items()}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)

    dit = build_transformer(cfg["dit"])
    dit.save_pretrained(paths["dit"])
    dim = cfg["dit"]["num_attention_heads"] * cfg["dit"]["attention_head_dim"]
    audio_dim, proj_dim = cfg["wav2vec2"]["hidden_size"], 32
    g = torch.Generator().manual_seed(seed)
    torch.save({
        "proj_model": {"proj.weight": torch.randn(proj_dim, audio_dim, generator=g) / audio_dim**0.5,
                       "norm.weight": torch.ones(proj_dim), "norm.bias": torch.zeros(proj_dim)},
        "audio_processor": {f"blocks.{i}.cross_attn.processor.{kv}_proj.weight": torch.randn(dim, proj_dim, generator=g) / proj_dim**0.5
                            for i in range(cfg["dit"]["num_layers"]) for kv in "kv"},
    }, paths["adapter"])

    t5 = UMT5EncoderModel(t5_config(cfg["text_encoder"])).state_dict()
    t5.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight, stored once as ComfyUI files do
    save_file({k: v.contiguous() for k, v in t5.items()}, str(paths["text_encoder"]))
    make_tokenizer(paths["tokenizer"], cfg["text_encoder"]["vocab"])
    clip = CLIPVisionModel(clip_config(cfg["image_encoder"])).state_dict()
    save_file({k: v.contiguous() for k, v in clip.items()}, str(paths["image_encoder"]))
    vae = AutoencoderKLWan(**vae_config(cfg["vae"])).state_dict()
    save_file({k: v.contiguous() for k, v in vae.items()}, str(paths["vae"]))
    Wav2Vec2Model(Wav2Vec2Config(**cfg["wav2vec2"])).save_pretrained(paths["wav2vec2"])

    return ModelFiles(**paths, configs=tiny_model_configs())


def tiny_model_configs() -> dict:
    """``ModelFiles.configs`` for the tiny models (so files written earlier can be loaded again)."""
    from transformers import Wav2Vec2Config

    cfg = tiny_configs()
    return {"dit": None, "text_encoder": cfg["text_encoder"], "image_encoder": cfg["image_encoder"],
            "vae": cfg["vae"], "wav2vec2": Wav2Vec2Config(**cfg["wav2vec2"])}
