"""DiT forward parity with the official implementation (tolerance: 1e-4 x max|reference|)."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fantasytalking_core.model.adapter import AudioBlockKV, AudioConditioning, FantasyTalkingAttnProcessor, audio_processors
from fantasytalking_core.audio.windows import audio_windows_for_frames, gather_audio_windows
from fantasytalking_core.model.transformer import pad_text, resolve_config, wan_config_to_diffusers
from fantasytalking_core.errors import ModelFileError
from model_files import rounding_tol


@pytest.fixture(scope="module")
def outputs(official_dir):
    return load_file(official_dir / "dit_outputs.safetensors")


@pytest.fixture(scope="module")
def audio(tiny_model, official_inputs):
    windows = audio_windows_for_frames(official_inputs["audio_features"].shape[1], 17)
    with torch.no_grad():
        full = tiny_model.project_audio(official_inputs["audio_features"])
    return full, gather_audio_windows(full, windows), windows.k_lens_tensor()


def test_audio_projection_and_windows_match(audio, outputs, official_inputs):
    full, windows, k_lens = audio
    # Linear 768 -> P then LayerNorm: one 768-term reduction per output (the error model in rounding_tol).
    terms = official_inputs["audio_features"].shape[-1]
    torch.testing.assert_close(full, outputs["audio_proj_full"], rtol=0, atol=rounding_tol(outputs["audio_proj_full"], terms))
    torch.testing.assert_close(windows, outputs["audio_proj"], rtol=0, atol=rounding_tol(outputs["audio_proj"], terms))
    assert k_lens.tolist() == outputs["audio_context_lens"].tolist()


@pytest.mark.parametrize("name,context,scale,masked", [
    ("pred_audio0", "context_pos", 0.0, True),
    ("pred_audio1_masked", "context_pos", 1.0, True),
    ("pred_audio1_unmasked", "context_pos", 1.0, False),
    ("pred_audio_custom_masked", "context_pos", None, True),
    ("pred_neg_audio0", "context_neg", 0.0, True),
])
def test_dit_forward_matches_official(tiny_model, official_inputs, official_dir, audio, outputs, name, context, scale, masked):
    if scale is None:
        with safe_open(str(official_dir / "dit_outputs.safetensors"), "pt") as f:
            scale = float(f.metadata()["custom_audio_scale"])
    _, windows, k_lens = audio
    x = official_inputs
    with torch.no_grad():
        pred = tiny_model(x["x"], x["timestep"], x[context], x["clip_feature"], x["y"],
                          AudioConditioning(windows, k_lens if masked else None, scale))
    ref = outputs[name]
    assert (pred - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_audio_off_equals_no_adapter_pass(tiny_model, official_inputs, audio):
    x = official_inputs
    with torch.no_grad():
        plain = tiny_model(x["x"], x["timestep"], x["context_pos"], x["clip_feature"], x["y"], None)
        zero = tiny_model(x["x"], x["timestep"], x["context_pos"], x["clip_feature"], x["y"],
                          AudioConditioning(audio[1], audio[2], 0.0))
        on = tiny_model(x["x"], x["timestep"], x["context_pos"], x["clip_feature"], x["y"],
                        AudioConditioning(audio[1], audio[2], 1.0))
    assert torch.equal(plain, zero)
    assert (on - plain).abs().max() > 0.1  # the audio branch really acts


def test_conditioning_does_not_leak_between_calls(tiny_model, official_inputs, audio):
    x = official_inputs
    with torch.no_grad():
        first = tiny_model(x["x"], x["timestep"], x["context_pos"], x["clip_feature"], x["y"], None)
        tiny_model(x["x"], x["timestep"], x["context_pos"], x["clip_feature"], x["y"], AudioConditioning(audio[1], audio[2], 1.0))
        again = tiny_model(x["x"], x["timestep"], x["context_pos"], x["clip_feature"], x["y"], None)
    assert torch.equal(first, again)
    assert all(p.conditioning is None for p in audio_processors(tiny_model.transformer))


def test_a_processor_swapped_in_later_still_gets_the_audio(tiny_model, official_inputs, audio):
    """diffusers' attention-backend and parallelism helpers replace processors; audio must not silently stop."""
    x = official_inputs
    cond = AudioConditioning(audio[1], audio[2], 1.0)
    attn2 = tiny_model.transformer.blocks[1].attn2
    original = attn2.processor
    with torch.no_grad():
        before = tiny_model(x["x"], x["timestep"], x["context_pos"], x["clip_feature"], x["y"], cond)
        swapped = FantasyTalkingAttnProcessor(AudioBlockKV(original.audio.k_proj.in_features, original.audio.k_proj.out_features))
        swapped.load_state_dict(original.state_dict())
        attn2.set_processor(swapped)
        try:
            after = tiny_model(x["x"], x["timestep"], x["context_pos"], x["clip_feature"], x["y"], cond)
            attn2.set_processor(AttnProcessorStandIn())
            with pytest.raises(ValueError, match="no FantasyTalking audio adapter"):
                tiny_model(x["x"], x["timestep"], x["context_pos"], x["clip_feature"], x["y"], cond)
        finally:
            attn2.set_processor(original)
    assert torch.equal(before, after)


class AttnProcessorStandIn:
    """A processor that is not FantasyTalking's (as a generic attention-backend helper would install)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        raise AssertionError("the forward must refuse before running a processor without the audio branch")


def test_pad_text_zero_pads_to_512_and_refuses_longer():
    out = pad_text(torch.ones(2, 11, 4))
    assert out.shape == (2, 512, 4) and out[:, :11].eq(1).all() and out[:, 11:].eq(0).all()
    with pytest.raises(ValueError, match="at most 512"):
        pad_text(torch.ones(1, 513, 4))


def test_bundled_14b_config_and_wan_terms():
    cfg = resolve_config(None)
    assert (cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["num_layers"], cfg["in_channels"]) == (5120, 40, 36)
    assert cfg["image_dim"] == 1280 and cfg["added_kv_proj_dim"] == 5120 and cfg["text_dim"] == 4096
    assert resolve_config("wan2.1_i2v_14b_720p") == cfg
    with pytest.raises(ModelFileError, match="needs 'i2v'"):
        wan_config_to_diffusers({"model_type": "t2v", "dim": 64, "num_heads": 2})


def test_a_sequence_that_does_not_split_over_the_context_parallel_ranks_is_refused(tiny_model, official_inputs):
    """45 video tokens (5 frames of 3 x 3) over 2 ranks: one clear error before any rank splits them; 3 ranks and
    diffusers' uneven mode pass the check."""
    from types import SimpleNamespace

    from fantasytalking_core.model.adapter import TokenLayoutError
    from fantasytalking_core.model.transformer import check_token_split

    def config(ring, ulysses, anything=False):
        return SimpleNamespace(context_parallel_config=SimpleNamespace(
            ring_degree=ring, ulysses_degree=ulysses, ulysses_anything=anything, ring_anything=False))

    x = official_inputs
    tiny_model.transformer._parallel_config = config(1, 2)
    try:
        with pytest.raises(TokenLayoutError, match="45 video tokens do not split evenly over the 2 ring x ulysses"):
            tiny_model(x["x"], x["timestep"], x["context_pos"], x["clip_feature"], x["y"])
    finally:
        tiny_model.transformer._parallel_config = None
    check_token_split(SimpleNamespace(_parallel_config=config(3, 1)), 45)
    check_token_split(SimpleNamespace(_parallel_config=config(1, 2, anything=True)), 45)
    check_token_split(SimpleNamespace(_parallel_config=None), 45)
