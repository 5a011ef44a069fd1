"""fantasytalking_core.audio.wav2vec2 and .encode: loading wav2vec2-base-960h, normalisation, chunked encoding."""

from __future__ import annotations

import json
import logging
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2Model

from fantasytalking_core.audio import encode as af
from fantasytalking_core.audio.encode import (
    AudioFeatures,
    encode_audio,
    encoder_windows,
    extract_audio_features,
    normalize_utterance,
    utterance_stats,
)
from fantasytalking_core.audio.io import resample, to_mono
from fantasytalking_core.audio.rules import frames_for_duration, wav2vec2_num_tokens
from fantasytalking_core.audio.wav2vec2 import BUNDLED_CONFIG_PATH, RIGHT_MODEL, bundled_wav2vec2_config, load_wav2vec2
from fantasytalking_core.errors import AudioInputError, ModelFileError, ModelNotFoundError

SR = 16000


def tiny_config(layers: int = 2, **overrides) -> Wav2Vec2Config:
    """wav2vec2-base's layout (conv kernels/strides, group norm, post-LN encoder) at toy width."""
    kwargs = dict(
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8,) * 7,
        num_conv_pos_embeddings=16,  # receptive field +-8 tokens
        num_conv_pos_embedding_groups=2,
        vocab_size=32,
    )
    kwargs.update(overrides)
    return Wav2Vec2Config(**kwargs)


def randomize_norms(module: torch.nn.Module, seed: int) -> None:
    """Give norm layers non-trivial scales/biases so that a mixed-up norm is visible in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))


@pytest.fixture(scope="module")
def ctc() -> Wav2Vec2ForCTC:
    torch.manual_seed(0)
    model = Wav2Vec2ForCTC(tiny_config()).eval()
    randomize_norms(model, 0)
    return model


@pytest.fixture(scope="module")
def model(ctc) -> Wav2Vec2Model:
    return ctc.wav2vec2


def speechlike(seconds: float, seed: int = 0, sr: int = SR) -> torch.Tensor:
    """Noise with a DC offset and a slow level envelope (non-stationary, like speech)."""
    g = torch.Generator().manual_seed(seed)
    n = int(round(seconds * sr))
    env = 0.05 + 0.4 * torch.sin(torch.linspace(0, 7 * math.pi, n)).abs()
    return 0.02 + env * torch.randn(n, generator=g)


def one_shot(model: Wav2Vec2Model, wave: torch.Tensor) -> torch.Tensor:
    """What the official code computes: Wav2Vec2FeatureExtractor(do_normalize) + Wav2Vec2Model, whole clip."""
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SR, padding_value=0.0, do_normalize=True)
    values = torch.from_numpy(fe(wave.numpy(), sampling_rate=SR).input_values[0])
    with torch.no_grad():
        return model(values[None]).last_hidden_state[0]


# =====================================================================================================================
# Normalisation
# =====================================================================================================================


def test_normalization_matches_wav2vec2_feature_extractor():
    wave = 0.3 + 0.05 * torch.randn(12345, generator=torch.Generator().manual_seed(3))
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SR, padding_value=0.0, do_normalize=True)
    expected = fe(wave.numpy(), sampling_rate=SR).input_values[0]
    got = normalize_utterance(wave)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, atol=2e-6, rtol=0)
    var = float(wave.double().var(correction=0))
    assert abs(float(got.double().mean())) < 1e-6
    # Unit variance up to the epsilon: std = sqrt(var / (var + 1e-7)).
    assert float(got.double().std(correction=0)) == pytest.approx(math.sqrt(var / (var + 1e-7)), abs=1e-6)


def test_streaming_statistics_do_not_depend_on_block_size():
    wave = speechlike(2.0)
    mean, var = utterance_stats(wave, block_samples=1 << 20)
    mean_b, var_b = utterance_stats(wave, block_samples=777)
    assert mean == pytest.approx(float(wave.double().mean()), abs=1e-12)
    assert var == pytest.approx(float(wave.double().var(correction=0)), rel=1e-12)
    assert (mean_b, var_b) == pytest.approx((mean, var), rel=1e-12, abs=1e-15)


def test_digital_silence_normalizes_to_zeros_not_nan():
    out = normalize_utterance(torch.zeros(8000))
    assert torch.equal(out, torch.zeros(8000))


# =====================================================================================================================
# Chunked encoding
# =====================================================================================================================


def test_clip_within_one_window_matches_one_shot(model):
    wave = speechlike(3.0)
    expected = one_shot(model, wave)
    got = encode_audio(model, wave)  # default chunk_seconds=60: one transformer window
    assert got.shape == expected.shape == (wav2vec2_num_tokens(len(wave)), 16)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < 1e-4


def test_conv_front_end_is_exact_across_blocks(model, monkeypatch):
    # Blocks of 0.3 s: the first conv layer's GroupNorm must still use whole-utterance statistics.
    monkeypatch.setattr(af, "FRONTEND_BLOCK_SECONDS", 0.3)
    wave = speechlike(3.0, seed=1)
    got = encode_audio(model, wave)
    assert (got - one_shot(model, wave)).abs().max() < 1e-4


@pytest.mark.parametrize("seconds", [2.0, 2.337, 3.01])
def test_transformer_windows_stitch_exactly_when_context_suffices(seconds, monkeypatch):
    # With no attention layers, the encoder only has the positional conv (+-8 tokens here): windows that
    # overlap by >= 2 * 8 tokens must reproduce the one-shot result exactly. Catches off-by-one stitching.
    torch.manual_seed(1)
    local = Wav2Vec2Model(tiny_config(layers=0)).eval()
    randomize_norms(local, 1)
    monkeypatch.setattr(af, "FRONTEND_BLOCK_SECONDS", 0.45)
    wave = speechlike(seconds, seed=2)
    got = encode_audio(local, wave, chunk_seconds=0.7, overlap_seconds=0.4)
    assert len(encoder_windows(got.shape[0], 35, 20)) > 3
    assert (got - one_shot(local, wave)).abs().max() < 1e-5


def test_split_clip_with_attention_stays_close_but_is_not_exact(model):
    # Self-attention sees the whole utterance in a one-shot run, so split windows are an approximation.
    wave = speechlike(4.0, seed=3)
    expected = one_shot(model, wave)
    got = encode_audio(model, wave, chunk_seconds=1.5, overlap_seconds=0.6)
    diff = (got - expected).abs().max()
    assert 1e-6 < diff < 0.1 * expected.abs().max()


@pytest.mark.parametrize("tokens, window, overlap", [(10, 20, 5), (100, 20, 6), (101, 20, 7), (333, 50, 0), (21, 20, 19)])
def test_encoder_windows_tile_the_sequence(tokens, window, overlap):
    wins = encoder_windows(tokens, window, overlap)
    assert wins[0][2] == 0 and wins[-1][3] == tokens
    for (s, e, ks, ke), nxt in zip(wins, wins[1:] + [None]):
        assert 0 <= s <= ks < ke <= e <= tokens and e - s <= window
        if nxt is not None:
            assert ke == nxt[2]  # contiguous, no gap, no double use
            assert e - ke >= overlap // 2 and nxt[2] - nxt[0] >= overlap // 2  # context on both sides of the seam
    if tokens > window:
        assert all(e - s == window for s, e, _, _ in wins)


def test_encoder_windows_reject_bad_sizes():
    for window, overlap in [(0, 0), (10, 10), (10, -1)]:
        with pytest.raises(ValueError):
            encoder_windows(100, window, overlap)


# 32390 samples: exactly 100 tokens (2 front-end blocks) but 6477 conv0 frames (3 statistics blocks).
@pytest.mark.parametrize("samples", [40000, 32390])
def test_progress_reports_every_step(model, monkeypatch, samples):
    monkeypatch.setattr(af, "FRONTEND_BLOCK_SECONDS", 1.0)  # 50 tokens per front-end block
    calls = []
    wave = speechlike(samples / SR)
    encode_audio(model, wave, chunk_seconds=1.0, overlap_seconds=0.5, progress=lambda d, t: calls.append((d, t)))
    total = calls[0][1]
    tokens = wav2vec2_num_tokens(samples)
    conv0_frames = (samples - 10) // 5 + 1
    # statistics pass over conv0 frames + front-end blocks + transformer windows (50 tokens, step 25)
    expected = math.ceil(conv0_frames / 3200) + math.ceil(tokens / 50) + len(encoder_windows(tokens, 50, 25))
    assert total == expected
    assert calls == [(i, total) for i in range(1, total + 1)]


def test_encode_audio_bad_input(model):
    with pytest.raises(AudioInputError, match="25 ms"):
        encode_audio(model, torch.zeros(399))
    bad = speechlike(1.0)
    bad[100] = float("nan")
    with pytest.raises(AudioInputError, match="NaN"):
        encode_audio(model, bad)
    with pytest.raises(AudioInputError, match="mono"):
        encode_audio(model, torch.zeros(2, 16000))
    with pytest.raises(ValueError, match="chunk_seconds"):
        encode_audio(model, speechlike(1.0), chunk_seconds=0)
    with pytest.raises(ValueError, match="overlap_seconds"):
        encode_audio(model, speechlike(1.0), chunk_seconds=2, overlap_seconds=2)
    with pytest.raises(TypeError, match="Wav2Vec2Model"):
        encode_audio(torch.nn.Linear(1, 1), speechlike(1.0))


def test_bfloat16_file_is_computed_in_float32(tmp_path, ctc):
    # The official code runs wav2vec2 in float32: a bf16 file loads as float32 and encodes exactly like a float32
    # model holding the same (bf16-rounded) weights. A bf16 compute path differs by most of the output's range on
    # CPUs with AMX-BF16, so it must not exist.
    path = tmp_path / "w2v_bf16.safetensors"
    rounded = {k: v.to(torch.bfloat16) for k, v in base_state(ctc).items()}
    save_file(rounded, path)
    loaded = load_wav2vec2(path, config=tiny_config())
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    reference = load_wav2vec2(_save(tmp_path / "w2v_f32.safetensors", {k: v.float() for k, v in rounded.items()}),
                              config=tiny_config())
    wave = speechlike(1.0, seed=11)
    assert torch.equal(encode_audio(loaded, wave), encode_audio(reference, wave))


def test_reduced_precision_model_is_refused(model):
    half = Wav2Vec2Model(model.config).eval().to(torch.bfloat16)
    with pytest.raises(TypeError, match="float32.*model.float"):
        encode_audio(half, speechlike(0.5, seed=3))


def _save(path, state):
    save_file(state, path)
    return path


def test_silence_encodes_to_finite_features(model):
    out = encode_audio(model, torch.zeros(16000))
    assert out.shape == (49, 16) and torch.isfinite(out).all()


# =====================================================================================================================
# Loading
# =====================================================================================================================


def base_state(ctc: Wav2Vec2ForCTC) -> dict[str, torch.Tensor]:
    """The base model's tensors without prefix or CTC head (the layout of ComfyUI repacks)."""
    return {k[len("wav2vec2.") :]: v.clone() for k, v in ctc.state_dict().items() if k.startswith("wav2vec2.")}


def assert_same_outputs(loaded: Wav2Vec2Model, reference: Wav2Vec2Model, atol: float = 0.0) -> None:
    x = speechlike(0.5, seed=9)[None]
    with torch.no_grad():
        diff = (loaded(x).last_hidden_state - reference(x).last_hidden_state).abs().max()
    assert diff <= atol
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


POS = "encoder.pos_conv_embed.conv."


def test_load_hugging_face_folder(tmp_path, ctc, model):
    folder = tmp_path / "wav2vec2-base-960h"
    ctc.save_pretrained(folder)  # config.json + model.safetensors with 'wav2vec2.' prefix and lm_head
    assert_same_outputs(load_wav2vec2(folder, config=tiny_config()), model)


def test_load_folder_with_pytorch_bin(tmp_path, ctc, model):
    folder = tmp_path / "w2v"
    ctc.save_pretrained(folder)
    state = {k: v.clone() for k, v in ctc.state_dict().items()}
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    assert_same_outputs(load_wav2vec2(folder, config=tiny_config()), model)


def test_load_sharded_folders_and_wrapped_pickles(tmp_path, ctc, model):
    """The shared checkpoint reader: a safetensors shard set (read as one checkpoint through its index), the shards
    of a pytorch_model.bin index, and a pickle that wraps its state dict (``{"state_dict": ...}``)."""
    state = {k: v.clone() for k, v in ctc.state_dict().items()}
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    folder = tmp_path / "sharded"
    ctc.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, folder / name)
    index = {"metadata": {}, "weight_map": {k: name for name, part in halves.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_same_outputs(load_wav2vec2(folder, config=tiny_config()), model)

    for name in halves:
        (folder / name).unlink()
        torch.save({k: state[k] for k in halves[name]}, folder / name.replace("model", "pytorch_model").replace(".safetensors", ".bin"))
    (folder / "model.safetensors.index.json").unlink()
    bin_index = {"weight_map": {k: name.replace("model", "pytorch_model").replace(".safetensors", ".bin")
                                for name, part in halves.items() for k in part}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(bin_index))
    assert_same_outputs(load_wav2vec2(folder, config=tiny_config()), model)

    wrapped = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": base_state(ctc)}, wrapped)
    assert_same_outputs(load_wav2vec2(wrapped, config=tiny_config()), model)


def test_load_single_safetensors_comfy_layout(tmp_path, ctc, model):
    path = tmp_path / "wav2vec2-base-960h.safetensors"
    save_file(base_state(ctc), path)
    assert_same_outputs(load_wav2vec2(path, config=tiny_config()), model)


def test_load_single_file_with_prefix_and_ctc_head(tmp_path, ctc, model):
    path = tmp_path / "w2v_ctc.safetensors"
    save_file({k: v.clone() for k, v in ctc.state_dict().items()}, path)
    assert_same_outputs(load_wav2vec2(path, config=tiny_config()), model)


def test_load_old_weight_norm_names(tmp_path, ctc, model):
    state = base_state(ctc)
    state[POS + "weight_g"] = state.pop(POS + "parametrizations.weight.original0")
    state[POS + "weight_v"] = state.pop(POS + "parametrizations.weight.original1")
    path = tmp_path / "old.bin"
    torch.save({"wav2vec2." + k: v for k, v in state.items()}, path)
    assert_same_outputs(load_wav2vec2(path, config=tiny_config()), model)


def test_load_fused_positional_conv_weight(tmp_path, ctc, model):
    state = base_state(ctc)
    g, v = state.pop(POS + "parametrizations.weight.original0"), state.pop(POS + "parametrizations.weight.original1")
    state[POS + "weight"] = torch._weight_norm(v, g, 2)
    path = tmp_path / "fused.safetensors"
    save_file(state, path)
    assert_same_outputs(load_wav2vec2(path, config=tiny_config()), model, atol=1e-5)


def test_load_fp16_file_casts_to_float32(tmp_path, ctc):
    path = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in base_state(ctc).items()}, path)
    loaded = load_wav2vec2(path, config=tiny_config())
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    key = "feature_projection.projection.weight"
    assert torch.equal(loaded.state_dict()[key], base_state(ctc)[key].half().float())


def test_masked_spec_embed_is_optional(tmp_path, ctc, model):
    state = base_state(ctc)
    del state["masked_spec_embed"]
    path = tmp_path / "no_mask.safetensors"
    save_file(state, path)
    assert_same_outputs(load_wav2vec2(path, config=tiny_config()), model)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("encoder.layers.1.attention.q_proj.bias"), "1 tensor\\(s\\) missing from the file, e.g. 'encoder.layers.1.attention.q_proj.bias'"),
        (lambda s: s.__setitem__("encoder.layers.0.extra.weight", torch.zeros(3)), "unexpected tensor\\(s\\) in the file, e.g. 'encoder.layers.0.extra"),
        (lambda s: s.__setitem__("feature_projection.projection.bias", torch.zeros(17)), "wrong size: 'feature_projection.projection.bias' is \\[17\\]"),
        (lambda s: s.__setitem__("lm_head.weight", torch.zeros(40, 16)), "40 outputs"),
    ],
)
def test_load_is_strict(tmp_path, ctc, edit, message):
    state = base_state(ctc)
    edit(state)
    path = tmp_path / "edited.safetensors"
    save_file(state, path)
    with pytest.raises(ModelFileError, match=message):
        load_wav2vec2(path, config=tiny_config())


def save_folder(tmp_path: Path, name: str, ctc, **config_edits) -> Path:
    folder = tmp_path / name
    ctc.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(config_edits)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize(
    "edits, message",
    [
        (dict(hidden_size=1024, num_hidden_layers=24, feat_extract_norm="layer", do_stable_layer_norm=True), "1024.*large"),
        (dict(model_type="whisper"), "Whisper"),
        (dict(model_type="hubert"), "HuBERT"),
        (dict(_name_or_path="TencentGameMate/chinese-wav2vec2-base"), "chinese-wav2vec2-base"),
        (dict(architectures=["Wav2Vec2ForPreTraining"]), "pre-training"),
        (dict(architectures=["Wav2Vec2ForSequenceClassification"]), "another task"),
        (dict(vocab_size=5000), "vocab_size"),
    ],
)
def test_wrong_model_folders_are_refused_naming_the_right_model(tmp_path, ctc, edits, message):
    folder = save_folder(tmp_path, "audio_encoder", ctc, **edits)
    with pytest.raises(ModelFileError, match=message) as err:
        load_wav2vec2(folder, config=tiny_config())
    assert RIGHT_MODEL in str(err.value)


def test_preprocessor_without_normalisation_is_refused(tmp_path, ctc):
    folder = save_folder(tmp_path, "audio_encoder", ctc)
    (folder / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False, "sampling_rate": 16000}))
    with pytest.raises(ModelFileError, match="do_normalize=False"):
        load_wav2vec2(folder, config=tiny_config())


def test_real_base_config_refuses_a_large_folder(tmp_path):
    # The default reference is the bundled base config: a large config is refused before any weights are read.
    folder = tmp_path / "some_encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(model_type="wav2vec2", hidden_size=1024, num_hidden_layers=24)))
    (folder / "model.safetensors").write_bytes(b"unused")
    with pytest.raises(ModelFileError, match="hidden_size=1024 \\(expected 768\\)"):
        load_wav2vec2(folder)


def test_chinese_file_name_is_refused(tmp_path, ctc):
    path = tmp_path / "chinese-wav2vec2-base-fp16.safetensors"
    save_file(base_state(ctc), path)
    with pytest.raises(ModelFileError, match="chinese-wav2vec2-base.*" + RIGHT_MODEL):
        load_wav2vec2(path, config=tiny_config())


@pytest.mark.parametrize(
    "tensors, message",
    [
        (  # Whisper encoder (ComfyUI's whisper layout)
            {"model.encoder.conv1.weight": torch.zeros(4, 2, 3), "model.encoder.embed_positions.weight": torch.zeros(5, 4)},
            "Whisper",
        ),
        (  # wav2vec2-large-shaped repack: layer norm in every conv layer, 1024 wide, 24 layers
            {
                "feature_extractor.conv_layers.0.conv.weight": torch.zeros(512, 1, 10),
                "feature_extractor.conv_layers.1.layer_norm.weight": torch.zeros(512),
                "encoder.layer_norm.weight": torch.zeros(1024),
                "encoder.layers.23.final_layer_norm.weight": torch.zeros(1024),
            },
            "hidden size 1024, 24 layers.*large",
        ),
        (  # a VAE
            {"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3), "encoder.down.0.block.0.norm1.weight": torch.zeros(4)},
            "not a wav2vec2 model",
        ),
        (  # wav2vec2 pre-training checkpoint (e.g. wav2vec2-base or chinese-wav2vec2-base before fine-tuning)
            {"wav2vec2.feature_extractor.conv_layers.0.conv.weight": torch.zeros(8, 1, 10), "quantizer.codevectors": torch.zeros(1, 4, 2)},
            "pre-training",
        ),
    ],
)
def test_wrong_single_files_are_refused(tmp_path, tensors, message):
    path = tmp_path / "audio_encoder.safetensors"
    save_file(tensors, path)
    with pytest.raises(ModelFileError, match=message) as err:
        load_wav2vec2(path)
    assert RIGHT_MODEL in str(err.value)


def test_config_in_safetensors_metadata_is_checked(tmp_path, ctc):
    path = tmp_path / "with_config.safetensors"
    save_file(base_state(ctc), path, metadata={"config": json.dumps({"model_type": "wav2vec2", "hidden_size": 1024})})
    with pytest.raises(ModelFileError, match="hidden_size=1024"):
        load_wav2vec2(path, config=tiny_config())


def test_missing_and_unreadable_files(tmp_path, ctc):
    with pytest.raises(ModelNotFoundError, match="nothing_here"):
        load_wav2vec2(tmp_path / "nothing_here.safetensors")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_wav2vec2(empty)
    no_weights = save_folder(tmp_path, "no_weights", ctc)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="no PyTorch weights"):
        load_wav2vec2(no_weights, config=tiny_config())
    corrupt = tmp_path / "truncated.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(ModelFileError, match="not a readable safetensors"):
        load_wav2vec2(corrupt)
    text = tmp_path / "readme.bin"
    text.write_text("hello")
    with pytest.raises(ModelFileError, match="not a readable torch checkpoint"):
        load_wav2vec2(text)
    odd = tmp_path / "model.onnx"
    odd.write_bytes(b"x")
    with pytest.raises(ModelFileError, match="unknown weights format"):
        load_wav2vec2(odd)


def test_bundled_config_is_wav2vec2_base_960h():
    cfg = bundled_wav2vec2_config()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (768, 12, 12, 3072)
    assert list(cfg.conv_dim) == [512] * 7
    assert list(cfg.conv_kernel) == [10, 3, 3, 3, 3, 2, 2] and list(cfg.conv_stride) == [5, 2, 2, 2, 2, 2, 2]
    assert (cfg.feat_extract_norm, cfg.do_stable_layer_norm, cfg.conv_bias) == ("group", False, False)
    assert (cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups, cfg.vocab_size) == (128, 16, 32)
    assert not hasattr(cfg, "feature_extractor")
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Wav2Vec2Model(cfg).parameters())
    assert n_params == 94_371_712  # wav2vec2-base's 94.4 M
    fe = json.loads(BUNDLED_CONFIG_PATH.read_text())["feature_extractor"]
    assert (fe["sampling_rate"], fe["do_normalize"], fe["return_attention_mask"], fe["padding_value"]) == (16000, True, False, 0.0)


# =====================================================================================================================
# extract_audio_features: the entry point of the nodes and the CLI
# =====================================================================================================================


def comfy_audio(wave: torch.Tensor, sr: int) -> dict:
    return {"waveform": wave[None], "sample_rate": sr}


def test_extract_from_comfy_audio_follows_the_official_steps(model):
    sr = 44100
    stereo = torch.stack([speechlike(1.0, 4, sr), speechlike(1.0, 5, sr)])
    out = extract_audio_features(model, comfy_audio(stereo, sr), fps=23, max_frames=81, resample_backend="soxr")
    assert isinstance(out, AudioFeatures)
    assert (out.num_frames, out.fps, out.duration_s) == (25, 23.0, 1.0)
    assert out.num_latent_frames == 7 and out.video_duration_s == pytest.approx(25 / 23)
    # 1 s of audio is shorter than the 25-frame crop (17391 samples): all 16000 samples are kept.
    expected_wave = resample(to_mono(stereo), sr, 16000, backend="soxr")
    assert torch.equal(out.waveform_16k, expected_wave) and out.sample_rate == 16000
    assert out.features.shape == (49, 16) and out.num_tokens == 49
    assert torch.equal(out.features, encode_audio(model, expected_wave))


def test_extract_crops_long_audio_to_the_frame_count(model):
    out = extract_audio_features(model, comfy_audio(speechlike(5.0)[None], 16000))
    assert out.num_frames == 81 and out.duration_s == 5.0
    assert out.waveform_16k.shape == (int(81 / 23 * 16000),)
    assert out.features.shape[0] == wav2vec2_num_tokens(int(81 / 23 * 16000)) == 175
    assert (out.features - one_shot(model, speechlike(5.0)[: int(81 / 23 * 16000)])).abs().max() < 1e-4


def write_wav(path: Path, x: np.ndarray, sr: int) -> Path:
    """float [C, T] -> 16-bit wav with PyAV."""
    layout = {1: "mono", 2: "stereo"}[x.shape[0]]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=sr)
        stream.layout, stream.format = layout, "s16"
        pcm = np.ascontiguousarray(np.round(np.clip(x, -1, 1) * 32767).astype(np.int16).T).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = sr, 0, Fraction(1, sr)
        for packet in list(stream.encode(frame)) + list(stream.encode(None)):
            out.mux(packet)
    return path


def test_extract_from_file_equals_extract_from_the_same_audio_value(tmp_path, model):
    x = np.stack([speechlike(0.7, 6, 8000).numpy(), speechlike(0.7, 7, 8000).numpy()]) * 0.5
    path = write_wav(tmp_path / "voice.wav", x, 8000)
    from_file = extract_audio_features(model, path, fps=16, max_frames=81)
    pcm = torch.from_numpy(np.round(np.clip(x, -1, 1) * 32767).astype(np.int16))
    from_value = extract_audio_features(model, {"waveform": pcm[None], "sample_rate": 8000}, fps=16, max_frames=81)
    assert from_file.num_frames == from_value.num_frames == frames_for_duration(0.7, 16, 81) == 13
    assert torch.equal(from_file.features, from_value.features)


@pytest.mark.parametrize(
    "sr, channels, dtype",
    [(8000, 1, torch.float32), (44100, 2, torch.int16), (48000, 8, torch.int32), (48000, 3, torch.float64)],
)
def test_extract_handles_rates_channels_and_sample_types(model, sr, channels, dtype):
    wave = torch.stack([speechlike(0.6, c, sr) for c in range(channels)]).clamp(-1, 1)
    if dtype == torch.int16:
        wave = (wave * 32767).round().to(dtype)
    elif dtype == torch.int32:
        wave = (wave * 2147483647).round().to(dtype)
    else:
        wave = wave.to(dtype)
    out = extract_audio_features(model, comfy_audio(wave, sr))
    # 0.6 s at 23 fps: 17 frames, whose crop (11826 samples) is longer than the 9600 samples there are.
    assert out.num_frames == 17 and out.waveform_16k.shape == (9600,)
    assert out.features.shape == (wav2vec2_num_tokens(9600), 16) and torch.isfinite(out.features).all()


def test_clipped_audio_gives_the_same_features_at_any_level(model):
    # Hard-clipped speech is valid input; the per-utterance normalisation makes the level irrelevant, so nothing
    # may clamp samples to [-1, 1] on the way in.
    clipped = (3 * speechlike(1.0, 8)).clamp(-1, 1)
    quiet = extract_audio_features(model, comfy_audio(clipped[None], 16000))
    hot = extract_audio_features(model, comfy_audio(4 * clipped[None], 16000))
    assert (quiet.features - hot.features).abs().max() < 1e-4


def test_audio_shorter_than_one_latent_frame_still_gives_the_official_result(model):
    out = extract_audio_features(model, comfy_audio(speechlike(0.1)[None], 16000))  # 0.1 s < 4 frames at 23 fps
    assert out.num_frames == 5 and out.features.shape == (wav2vec2_num_tokens(1600), 16) == (4, 16)


def test_audio_too_short_for_one_token_is_refused(model):
    with pytest.raises(AudioInputError, match="25 ms"):
        extract_audio_features(model, comfy_audio(speechlike(0.01)[None], 16000))


def test_silent_recording_warns_but_works(model, caplog):
    with caplog.at_level(logging.WARNING, logger="fantasytalking_core.audio.wav2vec2"):
        out = extract_audio_features(model, comfy_audio(torch.zeros(2, 24000), 48000))
    assert torch.isfinite(out.features).all() and out.features.shape == (24, 16)
    assert "silence" in caplog.text


def test_extract_refuses_non_audio(tmp_path, model):
    path = tmp_path / "portrait.wav"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(AudioInputError, match="portrait.wav"):
        extract_audio_features(model, path)
    with pytest.raises(AudioInputError, match="empty"):
        extract_audio_features(model, comfy_audio(torch.zeros(1, 0), 16000))
