"""The native route's cross-attention (original Wan layout, as ComfyUI's Wan model) gives exactly what the engine's
diffusers processor gives, per guidance chunk, under context windows, and refuses a frame-count mismatch."""

import pytest
import torch
import torch.nn.functional as F
from model_files import rounding_tol
from torch import nn

from fantasytalking_core.audio.windows import audio_windows_for_frames, gather_audio_windows
from fantasytalking_core.model.adapter import AudioConditioning, window_runs
from fantasytalking_core.model.wan_native import (
    AUDIO_CHUNKS,
    AUDIO_CHUNKS_KEY,
    AudioCrossAttention,
    NativeAudio,
    audio_pass_conds,
    chunk_scales,
    conditioning_for_call,
    native_audio,
)

FRAMES, TOKENS_PER_FRAME = 3, 9  # latent frames, 3x3 patches each
IMAGE_LEN, TEXT_LEN = 257, 512


class WanLayoutCrossAttention(nn.Module):
    """A Wan-layout I2V cross-attention (ComfyUI's attribute names) sharing a diffusers ``WanAttention``'s layers."""

    def __init__(self, attn):
        super().__init__()
        self.q, self.k, self.v, self.o = attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]
        self.norm_q, self.norm_k = attn.norm_q, attn.norm_k
        self.k_img, self.v_img, self.norm_k_img = attn.add_k_proj, attn.add_v_proj, attn.norm_added_k
        self.num_heads = attn.heads


def sdpa(heads):
    """ComfyUI's ``optimized_attention`` contract: [B, S, H*D] in and out."""

    def attention(q, k, v, transformer_options):
        split = [t.unflatten(2, (heads, -1)).transpose(1, 2) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*split).transpose(1, 2).flatten(2)

    return attention


@pytest.fixture(scope="module")
def setup(tiny_model, official_inputs):
    g = torch.Generator().manual_seed(11)
    attn = tiny_model.transformer.blocks[1].attn2
    dim = attn.to_q.in_features
    features = official_inputs["audio_features"][0]
    num_frames = 4 * FRAMES - 3
    adapter_proj = tiny_model.audio_proj
    windows = audio_windows_for_frames(features.shape[0], num_frames)
    with torch.no_grad():
        tokens = gather_audio_windows(adapter_proj(features[None]), windows)
    return {
        "attn": attn,
        "native": WanLayoutCrossAttention(attn),
        "kv": attn.processor.audio,
        "x": torch.randn(3, FRAMES * TOKENS_PER_FRAME, dim, generator=g),
        "context": torch.randn(3, IMAGE_LEN + TEXT_LEN, dim, generator=g),
        "tokens": tokens,
        "k_lens": windows.k_lens_tensor(),
        "features": features,
        "num_frames": num_frames,
    }


def engine(setup, scale):
    """The engine's diffusers processor on the same layers (audio scale per row)."""
    proc = setup["attn"].processor
    proc.conditioning = AudioConditioning(setup["tokens"], setup["k_lens"], scale)
    try:
        return setup["attn"](setup["x"], setup["context"])
    finally:
        proc.conditioning = None


def native_call(setup, options, audio=None, x=None):
    audio = audio or NativeAudio(setup["tokens"], setup["k_lens"], 0.7, AUDIO_CHUNKS["dual_cfg"])
    forward = AudioCrossAttention(setup["native"], setup["kv"], audio, sdpa(setup["native"].num_heads))
    return forward(setup["x"] if x is None else x, setup["context"], IMAGE_LEN, options)


def test_each_guidance_chunk_gets_audio_exactly_as_the_engine(setup):
    options = {"cond_or_uncond": [0, 1, 2], "grid_sizes": (FRAMES, 3, 3)}
    with torch.no_grad():
        native = native_call(setup, options)
        reference = engine(setup, torch.tensor([0.0, 0.0, 0.7]))
        no_audio = engine(setup, 0.0)
    tol = rounding_tol(reference, setup["x"].shape[-1] + TEXT_LEN)
    torch.testing.assert_close(native, reference, rtol=0, atol=tol)
    assert (native[2] - no_audio[2]).abs().max() > 100 * tol  # the audio chunk really differs from no audio
    torch.testing.assert_close(native[:2], no_audio[:2], rtol=0, atol=tol)


def test_the_audio_branch_runs_on_comfyuis_attention(setup):
    # ComfyUI's attention options (--use-flash-attention, attention override patches) must reach the audio branch
    # as they reach the text and image attention, not diffusers' SDPA behind ComfyUI's back; its short key sets
    # take the variant without low-precision kernels, as the CLIP tokens do (ComfyUI keeps sage off there)
    calls = []
    attention = sdpa(setup["native"].num_heads)

    def recording(which):
        def attend(q, k, v, transformer_options):
            calls.append((which, q.shape[0], k.shape[1], transformer_options.get("marker")))
            return attention(q, k, v, transformer_options)

        return attend

    audio = NativeAudio(setup["tokens"], setup["k_lens"], 0.7, AUDIO_CHUNKS["dual_cfg"])
    options = {"cond_or_uncond": [0, 1, 2], "grid_sizes": (FRAMES, 3, 3), "marker": "this call's options"}
    forward = AudioCrossAttention(setup["native"], setup["kv"], audio, recording("text"), recording("no low precision"))
    with torch.no_grad():
        forward(setup["x"], setup["context"], IMAGE_LEN, options)
    marker = "this call's options"
    assert calls == [("text", 3, TEXT_LEN, marker), ("no low precision", 3, IMAGE_LEN, marker)] + [
        ("no low precision", 3 * (end - first), length, marker)
        for first, end, length in window_runs(setup["k_lens"].tolist())]


def test_a_guider_names_its_audio_chunk_over_the_patch_default(setup):
    """KSampler order (cfg): positive is chunk 0; the FantasyTalking guider says chunk 2 whatever the default."""
    cfg_audio = NativeAudio(setup["tokens"], setup["k_lens"], 1.0, AUDIO_CHUNKS["cfg"])
    with torch.no_grad():
        ksampler = native_call(setup, {"cond_or_uncond": [1, 0, 1]}, cfg_audio)
        guided = native_call(setup, {"cond_or_uncond": [1, 0, 1], AUDIO_CHUNKS_KEY: (1,)}, cfg_audio)
        reference_ks = engine(setup, torch.tensor([0.0, 1.0, 0.0]))
        reference_guided = engine(setup, torch.tensor([1.0, 0.0, 1.0]))
    tol = rounding_tol(reference_ks, setup["x"].shape[-1] + TEXT_LEN)
    torch.testing.assert_close(ksampler, reference_ks, rtol=0, atol=tol)
    torch.testing.assert_close(guided, reference_guided, rtol=0, atol=tol)


def test_context_window_slices_the_audio_windows_by_its_frame_indices(setup):
    """Under ComfyUI's context windows a call holds only the window's latent frames: frames 0 and 2 of the video
    must attend to windows 0 and 2, as in the full call."""

    class Window:
        index_list = [0, 2]

    keep = torch.cat([torch.arange(TOKENS_PER_FRAME), torch.arange(2 * TOKENS_PER_FRAME, 3 * TOKENS_PER_FRAME)])
    with torch.no_grad():
        full = native_call(setup, {"cond_or_uncond": [2, 2, 2], "grid_sizes": (FRAMES, 3, 3)})
        windowed = native_call(setup, {"cond_or_uncond": [2, 2, 2], "grid_sizes": (2, 3, 3), "context_window": Window()},
                               x=setup["x"][:, keep])
    torch.testing.assert_close(windowed, full[:, keep], rtol=0, atol=rounding_tol(full, setup["x"].shape[-1] + TEXT_LEN))


def test_a_causal_anchor_frame_gets_its_own_window(setup):
    """ComfyUI's causal_window_fix prepends the frame before the window (latent index_list[0] - 1)."""

    class Window:
        index_list = [2]
        causal_anchor_index = 1

    keep = torch.arange(TOKENS_PER_FRAME, 3 * TOKENS_PER_FRAME)
    with torch.no_grad():
        full = native_call(setup, {"cond_or_uncond": [2, 2, 2], "grid_sizes": (FRAMES, 3, 3)})
        windowed = native_call(setup, {"cond_or_uncond": [2, 2, 2], "grid_sizes": (2, 3, 3), "context_window": Window()},
                               x=setup["x"][:, keep])
    torch.testing.assert_close(windowed, full[:, keep], rtol=0, atol=rounding_tol(full, setup["x"].shape[-1] + TEXT_LEN))


def test_frame_count_mismatch_names_the_fix(setup):
    with pytest.raises(ValueError, match=r"latent has 2 latent frames .* made for 3 \(9 video frames\)"):
        native_call(setup, {"cond_or_uncond": [0], "grid_sizes": (2, 3, 3)}, x=setup["x"][:1, :18])


def test_a_shard_of_the_tokens_is_refused_not_grouped_into_other_frames(setup):
    # a sequence-parallel pack (Raylight's USP) gives the blocks half the tokens with grid_sizes of the whole latent:
    # 27 tokens of 3 frames x 9, halved to 18, split evenly into 3 "frames" of 6 and ran on the wrong windows
    from fantasytalking_core.model.adapter import TokenLayoutError

    with pytest.raises(TokenLayoutError, match="not 3 latent frames x 9 tokens per frame"):
        native_call(setup, {"cond_or_uncond": [2], "grid_sizes": (FRAMES, 3, 3)}, x=setup["x"][:1, :18])


def test_the_audio_pass_has_its_own_uuids_stable_over_the_run():
    # the no-audio and the audio pass shared the positive's uuid, and core EasyCache (keyed by uuid) returned the
    # audio pass's output for the no-audio pass on cached steps
    import uuid

    text = torch.zeros(1, 4)
    positive = [{"cross_attn": text, "uuid": uuid.uuid4()}, {"cross_attn": text, "uuid": uuid.uuid4()}]
    audio = audio_pass_conds(positive)
    assert [c["uuid"] for c in audio] == [c["uuid"] for c in audio_pass_conds(positive)]  # the same every step
    assert not {c["uuid"] for c in audio} & {c["uuid"] for c in positive} and len({c["uuid"] for c in audio}) == 2
    assert all(a["cross_attn"] is p["cross_attn"] for a, p in zip(audio, positive, strict=True))  # not copied
    assert all("uuid" in c for c in positive) and positive[0]["uuid"] != audio[0]["uuid"]  # the originals kept


def test_native_audio_projects_in_float32_and_cuts_the_engine_windows(setup, tiny_model):
    class Adapter:  # the projection of the loaded adapter, as the patch node passes it
        proj = tiny_model.audio_proj

    audio = native_audio(Adapter(), setup["features"].to(torch.bfloat16), setup["num_frames"], 0.5, (2,))
    expected = gather_audio_windows(tiny_model.audio_proj(setup["features"].to(torch.bfloat16)[None]),
                                    audio_windows_for_frames(setup["features"].shape[0], setup["num_frames"]))
    assert audio.windows.dtype == torch.float32 and torch.equal(audio.windows, expected)
    assert torch.equal(audio.k_lens, setup["k_lens"]) and audio.scale == 0.5 and audio.audio_chunks == (2,)


def test_chunk_scales_and_their_errors():
    assert torch.equal(chunk_scales([0, 1, 2], (2,), 6, 0.5), torch.tensor([0, 0, 0, 0, 0.5, 0.5]))
    assert torch.equal(chunk_scales([1, 0], (0,), 2, 1.0), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="does not split"):
        chunk_scales([0, 1], (0,), 3, 1.0)
    cond = conditioning_for_call(NativeAudio(torch.zeros(1, 2, 3, 4), torch.tensor([3, 3]), 1.0, (2,)),
                                 {"cond_or_uncond": [0, 1]}, 2, 2)
    assert cond.is_silent()  # no audio chunk in this call: the branch is skipped
