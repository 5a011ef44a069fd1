"""umT5 text encoder: official parity, every file layout, the tokenizer path, strict loading, prompt cleaning."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from fantasytalking_core.errors import ModelFileError, ModelNotFoundError
from fantasytalking_core.settings import DEFAULT_NEGATIVE_PROMPT
from fantasytalking_core.tiny import make_tokenizer
from fantasytalking_core.encoders.text import (
    clean_prompt,
    encode_prompt,
    load_text_encoder,
    load_tokenizer,
    t5_config,
)
from model_files import OFFICIAL, parity_tol


T5 = OFFICIAL / "t5"
CONFIG = T5 / "config.json"
LAYERS = 2


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(T5 / "t5_io.safetensors")


@pytest.fixture(scope="module")
def wan_state() -> dict[str, torch.Tensor]:
    return torch.load(T5 / "t5.pth", weights_only=True)


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder(T5 / "t5.pth", CONFIG)


def _forward(model, io) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=io["ids"], attention_mask=io["mask"]).last_hidden_state


def _transformers_layout(wan: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI / transformers key names, written out by hand (independent of the loader's table)."""
    out = {"shared.weight": wan["token_embedding.weight"], "encoder.final_layer_norm.weight": wan["norm.weight"]}
    for i in range(LAYERS):
        a, f = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        out[a + "layer_norm.weight"] = wan[f"blocks.{i}.norm1.weight"]
        for n in "qkvo":
            out[a + f"SelfAttention.{n}.weight"] = wan[f"blocks.{i}.attn.{n}.weight"]
        out[a + "SelfAttention.relative_attention_bias.weight"] = wan[f"blocks.{i}.pos_embedding.embedding.weight"]
        out[f + "layer_norm.weight"] = wan[f"blocks.{i}.norm2.weight"]
        out[f + "DenseReluDense.wi_0.weight"] = wan[f"blocks.{i}.ffn.gate.0.weight"]  # the GELU branch
        out[f + "DenseReluDense.wi_1.weight"] = wan[f"blocks.{i}.ffn.fc1.weight"]
        out[f + "DenseReluDense.wo.weight"] = wan[f"blocks.{i}.ffn.fc2.weight"]
    assert len(out) == len(wan)
    return out


# ---------------------------------------------------------------- parity with the official encoder


def test_wan_layout_matches_official_output(encoder, io):
    out = _forward(encoder, io)
    assert out.shape == io["output_full"].shape
    torch.testing.assert_close(out, io["output_full"], rtol=0, atol=parity_tol(io["output_full"]))


def test_exact_erf_gelu_would_fail_parity(io):
    # Wan's T5 uses the tanh GELU (gelu_new); the fixture is sensitive enough to catch the erf one.
    model = load_text_encoder(T5 / "t5.pth", CONFIG)
    for block in model.encoder.block:
        block.layer[1].DenseReluDense.act = torch.nn.GELU()
    assert (_forward(model, io) - io["output_full"]).abs().max() > parity_tol(io["output_full"])


def test_comfy_layout_with_bundled_tokenizer_matches_official(tmp_path, wan_state, io):
    state = _transformers_layout(wan_state)
    state["spiece_model"] = torch.arange(64, dtype=torch.uint8)  # ComfyUI bundles the tokenizer bytes
    save_file(state, tmp_path / "umt5_xxl_fp32.safetensors")
    model = load_text_encoder(tmp_path / "umt5_xxl_fp32.safetensors", CONFIG)
    torch.testing.assert_close(_forward(model, io), io["output_full"], rtol=0, atol=parity_tol(io["output_full"]))


def test_fp16_file_loads_as_fp16_with_exact_weights(tmp_path, wan_state):
    state = {k: v.half() for k, v in _transformers_layout(wan_state).items()}
    save_file(state, tmp_path / "umt5_xxl_fp16.safetensors")
    model = load_text_encoder(tmp_path / "umt5_xxl_fp16.safetensors", CONFIG)
    assert model.dtype == torch.float16  # dtype=None keeps the file's dtype
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert torch.equal(model.encoder.embed_tokens.weight, state["shared.weight"])  # the embedding the stack uses
    # tied, not copied: moving the model keeps one embedding (2 GB in bf16 for the real umT5-XXL)
    assert model.encoder.embed_tokens.weight is model.shared.weight
    moved = model.to(torch.float32)
    assert moved.encoder.embed_tokens.weight.data_ptr() == moved.shared.weight.data_ptr()
    as_fp32 = load_text_encoder(tmp_path / "umt5_xxl_fp16.safetensors", CONFIG, dtype=torch.float32)
    assert as_fp32.dtype == torch.float32
    assert torch.equal(as_fp32.state_dict()["encoder.block.1.layer.1.DenseReluDense.wo.weight"],
                       state["encoder.block.1.layer.1.DenseReluDense.wo.weight"].float())


def test_fp8_scaled_file_is_dequantized(tmp_path, wan_state):
    state, expected = {}, {}
    for key, value in _transformers_layout(wan_state).items():
        # as ComfyUI: the Linear weights in fp8 with a per-tensor scale, embeddings and norms kept as they are
        if value.ndim == 2 and "relative_attention_bias" not in key and key != "shared.weight":
            scale = value.abs().max() / 448.0
            q = (value / scale).to(torch.float8_e4m3fn)
            state[key], state[key[: -len("weight")] + "scale_weight"] = q, scale.reshape(())
            expected[key] = q.float() * scale
        else:
            state[key] = expected[key] = value
    state["scaled_fp8"] = torch.tensor([], dtype=torch.float8_e4m3fn)
    save_file(state, tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")

    model = load_text_encoder(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", CONFIG, dtype=torch.float32)
    loaded = model.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    # the raw fp8 codes are far from the real weights: reading them unscaled would be a silent bug
    wo = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    assert (state[wo].float() - loaded[wo]).abs().max() > 1.0
    assert load_text_encoder(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", CONFIG).dtype == torch.bfloat16


# ---------------------------------------------------------------- strict loading and wrong files


def test_dit_file_is_rejected_with_what_it_is():
    with pytest.raises(ModelFileError, match="not a umT5") as err:
        load_text_encoder(OFFICIAL / "dit" / "dit.safetensors", CONFIG)
    assert "DiT" in str(err.value) and "umt5_xxl" in str(err.value)


def test_t5_v1_1_file_is_rejected(tmp_path, wan_state):
    # Flux/SD3's t5xxl has one relative position bias (block 0) instead of one per layer.
    state = _transformers_layout(wan_state)
    del state["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"]
    save_file(state, tmp_path / "t5xxl_fp16.safetensors")
    with pytest.raises(ModelFileError, match="relative_attention_bias") as err:
        load_text_encoder(tmp_path / "t5xxl_fp16.safetensors", CONFIG)
    assert "T5 v1.1" in str(err.value)


def test_missing_and_unexpected_keys_are_named(tmp_path, wan_state):
    state = dict(wan_state)
    del state["blocks.1.attn.q.weight"]
    state["blocks.1.attn.extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "t5.pth")
    with pytest.raises(ModelFileError) as err:
        load_text_encoder(tmp_path / "t5.pth", CONFIG)
    msg = str(err.value)
    assert "'blocks.1.attn.q.weight'" in msg and "'blocks.1.attn.extra.weight'" in msg and "t5.pth" in msg


def test_wrong_config_is_a_size_error():
    with pytest.raises(ModelFileError, match="wrong size"):
        load_text_encoder(T5 / "t5.pth", {"num_layers": LAYERS})  # bundled XXL widths, tiny file


# ---------------------------------------------------------------- tokenizer and encode_prompt


_make_tokenizer = make_tokenizer  # the same tiny tokenizer the --tiny models use


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(_make_tokenizer(tmp_path_factory.mktemp("umt5-xxl")))


def test_encode_prompt_matches_official_trimmed_output(encoder, tokenizer, io):
    length = int(io["mask"].sum())
    words = [f"w{i}" for i in io["ids"][0, : length - 1].tolist()]  # the official ids without EOS
    text = "  " + "\t ".join(words) + " \n"  # messy whitespace: cleaning must not change the tokens
    out = encode_prompt(encoder, tokenizer, text)
    assert out.shape == (length, 32) == io["output_trimmed"].shape[1:]
    torch.testing.assert_close(out, io["output_trimmed"][0], rtol=0, atol=parity_tol(io["output_trimmed"]))


def test_encode_prompt_truncates_to_max_length(encoder, tokenizer):
    text = " ".join(f"w{3 + i % 300}" for i in range(40))
    assert encode_prompt(encoder, tokenizer, text, max_length=16).shape == (16, 32)
    assert encode_prompt(encoder, tokenizer, "").shape == (1, 32)  # EOS only


def test_tokenizer_of_another_model_is_rejected(encoder, tmp_path):
    big = load_tokenizer(_make_tokenizer(tmp_path / "tok", vocab_size=500))
    with pytest.raises(ModelFileError, match="does not belong"):
        encode_prompt(encoder, big, "w450")


def test_load_tokenizer_folders(tmp_path):
    with pytest.raises(ModelNotFoundError):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ModelFileError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    # a Wan model folder holding google/umt5-xxl/ is accepted
    _make_tokenizer(tmp_path / "Wan2.1-I2V-14B-480P" / "google" / "umt5-xxl")
    tok = load_tokenizer(tmp_path / "Wan2.1-I2V-14B-480P")
    assert tok("w7 w8")["input_ids"] == [7, 8, 1]


def test_clean_prompt_like_wan():
    assert clean_prompt("  a\t\tb \n\n c\u3000d  ") == "a b c d"
    assert clean_prompt("Tom &amp;amp; Jerry") == "Tom & Jerry"  # unescaped twice
    # ftfy with its defaults, as Wan runs it: mojibake repaired, curly quotes and full-width punctuation made ASCII
    assert clean_prompt("The cat doesn\u00e2\u20ac\u2122t move") == "The cat doesn't move"
    assert clean_prompt("\u201chello\u201d\uff0c\uff01") == '"hello",!'


def test_default_negative_prompt_is_the_official_one():
    parts = DEFAULT_NEGATIVE_PROMPT.split("\uff0c")  # full-width commas, as in infer.py
    assert len(parts) == 30 and parts[0] == "人物静止不动" and parts[-1] == "倒着走"
    assert "JPEG压缩残留" in parts
    assert clean_prompt(DEFAULT_NEGATIVE_PROMPT) == DEFAULT_NEGATIVE_PROMPT.replace("\uff0c", ",")


def test_bundled_config_is_umt5_xxl():
    cfg = t5_config()
    assert (cfg.vocab_size, cfg.d_model, cfg.d_kv, cfg.d_ff, cfg.num_heads, cfg.num_layers) == (
        256384, 4096, 64, 10240, 64, 24)
    assert (cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance) == (32, 128)
    assert cfg.is_gated_act and cfg.dense_act_fn == "gelu_new" and cfg.layer_norm_epsilon == 1e-6
    tiny = t5_config(CONFIG)  # Wan's names: dim_attn 32 / 4 heads -> d_kv 8
    assert (tiny.vocab_size, tiny.d_model, tiny.d_kv, tiny.d_ff, tiny.num_layers) == (384, 32, 8, 64, 2)


def _sentencepiece_model() -> bytes:
    """A small real SentencePiece (unigram, NFKC) model, trained here: the format ComfyUI embeds in umT5 files."""
    import io as bytes_io

    import sentencepiece as spm

    corpus = ["a woman is talking to the camera with natural expressions", "slight head movements and a calm voice",
              "the quick brown fox jumps over the lazy dog"] * 50
    model = bytes_io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=40,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   normalization_rule_name="nmt_nfkc", minloglevel=2)
    return model.getvalue()


def test_the_tokenizer_embedded_in_a_comfyui_umt5_file_tokenizes_as_sentencepiece(tmp_path):
    """ComfyUI's umT5 files carry the tokenizer (``spiece_model``): read from the file it gives SentencePiece's own
    ids plus </s>, full-width letters normalised (NFKC) as the umT5 tokenizer does."""
    import numpy as np
    import sentencepiece as spm

    model = _sentencepiece_model()
    path = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    save_file({"spiece_model": torch.from_numpy(np.frombuffer(model, dtype=np.uint8).copy()),
               "shared.weight": torch.zeros(40, 8)}, str(path))
    tokenizer = load_tokenizer(path)
    text = "a woman talking to the camera ＡＢ"
    expected = spm.SentencePieceProcessor(model_proto=model).encode(text) + [1]
    assert tokenizer([text])["input_ids"][0] == expected


def test_a_comfyui_models_folder_needs_no_tokenizer_folder_when_the_umt5_file_carries_it(tmp_path):
    import numpy as np

    from fantasytalking_core.loaders.model_paths import MissingModelsError, find_model_files

    for rel in ("diffusion_models/wan2.1_i2v_720p_14B_fp16.safetensors", "fantasytalking/fantasytalking_model.ckpt",
                "clip_vision/clip_vision_h.safetensors", "vae/wan_2.1_vae.safetensors",
                "audio_encoders/wav2vec2-base-960h.safetensors"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    text_encoder = tmp_path / "text_encoders" / "umt5_xxl_fp16.safetensors"
    text_encoder.parent.mkdir()
    save_file({"shared.weight": torch.zeros(4, 2)}, str(text_encoder))
    with pytest.raises(MissingModelsError, match="umT5 tokenizer folder"):
        find_model_files(tmp_path)  # a file without the tokenizer: still needs the folder
    save_file({"shared.weight": torch.zeros(4, 2),
               "spiece_model": torch.from_numpy(np.frombuffer(_sentencepiece_model(), dtype=np.uint8).copy())},
              str(text_encoder))
    assert find_model_files(tmp_path).tokenizer == text_encoder
    # the same files given one by one, without a models folder and without a tokenizer: it is in the umT5 file
    parts = {"dit": "diffusion_models/wan2.1_i2v_720p_14B_fp16.safetensors", "adapter":
             "fantasytalking/fantasytalking_model.ckpt", "image_encoder": "clip_vision/clip_vision_h.safetensors",
             "vae": "vae/wan_2.1_vae.safetensors", "wav2vec2": "audio_encoders/wav2vec2-base-960h.safetensors"}
    files = find_model_files(None, text_encoder=text_encoder, **{k: tmp_path / v for k, v in parts.items()})
    assert files.tokenizer == text_encoder and files.vae == tmp_path / parts["vae"]
