"""The attention-kernel option: refused up front when unknown or not installed, active during every DiT forward."""

import pytest
import torch

from fantasytalking_core.errors import SettingsError
from fantasytalking_core.model import adapter
from fantasytalking_core.pipeline import GenerationSettings, sample_latents
from fantasytalking_core.runtime.attention import ATTENTION_BACKENDS, check_attention


def test_unknown_or_uninstalled_kernels_are_refused_before_any_work(monkeypatch):
    with pytest.raises(SettingsError, match="attention must be one of sdpa, flash, sage, xformers"):
        GenerationSettings(attention="fastest")

    from diffusers.models import attention_dispatch

    def missing(name):
        raise RuntimeError(f"backend {name} is not usable")

    monkeypatch.setattr(attention_dispatch, "attention_backend", missing)  # as diffusers reports a missing package
    with pytest.raises(SettingsError, match="needs the flash-attn package .* or use sdpa"):
        check_attention("flash")


def test_the_chosen_kernels_run_every_dit_forward(tiny_model, official_inputs, monkeypatch):
    """A second backend usable on a CPU (diffusers' math SDPA) stands in for flash/sage: the text and image
    attention of every forward run on it, and the result stays the same maths."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    monkeypatch.setitem(ATTENTION_BACKENDS, "math", ("_native_math", "nothing"))
    seen = []
    dispatch = adapter.dispatch_attention_fn

    def spy(*args, **kwargs):
        seen.append(_AttentionBackendRegistry._active_backend.value)
        return dispatch(*args, **kwargs)

    monkeypatch.setattr(adapter, "dispatch_attention_fn", spy)
    x = official_inputs
    frames = x["x"].shape[2]
    run = lambda name: sample_latents(tiny_model, x["context_pos"], x["context_neg"], x["clip_feature"], x["y"],
                                      x["audio_features"][0], 4 * frames - 3, GenerationSettings(steps=2, attention=name))
    with torch.no_grad():
        math, sdpa = run("math"), run("sdpa")
    calls = len(seen) // 2
    assert calls > 0 and set(seen[:calls]) == {"_native_math"} and set(seen[calls:]) == {"native"}
    torch.testing.assert_close(math, sdpa, rtol=1e-4, atol=1e-4 * float(sdpa.abs().max()))


def test_an_install_that_cannot_run_its_kernels_is_refused_before_any_work(tiny_model, official_inputs,
                                                                           monkeypatch):
    # seen on an H200: an xformers wheel built for another PyTorch imports (so diffusers offers it) and fails only at
    # its first attention call, minutes into a run, with a traceback
    from diffusers.models import attention_dispatch

    from fantasytalking_core.runtime import attention

    math_backend = attention_dispatch.AttentionBackendName._NATIVE_MATH

    def no_kernels(*args, **kwargs):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n"
                                  "     query       : shape=(1, 16, 2, 64) (torch.bfloat16)\n"
                                  "`cutlassF-pt` is not supported because:\n    xFormers wasn't build with CUDA support")

    monkeypatch.setitem(ATTENTION_BACKENDS, "math", ("_native_math", "nothing"))
    monkeypatch.setitem(attention_dispatch._AttentionBackendRegistry._backends, math_backend, no_kernels)
    monkeypatch.setattr(attention, "_RUNS_ON", set())  # what earlier runs in this process found is not this install
    refusal = (r"^attention 'math' is installed but cannot run on cpu \(No operator found .* \.\.\. xFormers wasn't "
               r"build with CUDA support\): install a build for this PyTorch .* and GPU, or use sdpa \(the default\)\.$")
    with pytest.raises(SettingsError, match=refusal):
        check_attention("math", "cpu")
    settings = GenerationSettings(steps=2, attention="math")  # installed: the settings alone cannot know more
    x = official_inputs
    with pytest.raises(SettingsError, match=refusal):  # a library caller: refused before the first step
        sample_latents(tiny_model, x["context_pos"], x["context_neg"], x["clip_feature"], x["y"],
                       x["audio_features"][0], 4 * x["x"].shape[2] - 3, settings,
                       progress=lambda *a: pytest.fail("no step may run"))


def test_the_audio_branch_runs_on_its_processors_own_backend(tiny_model, monkeypatch):
    # diffusers' set_attention_backend and enable_parallelism set each processor's backend: the audio branch of
    # the cross-attention must follow it like the text and image attention do
    from fantasytalking_core.model.adapter import TEXT_LEN, AudioConditioning

    seen = []
    dispatch = adapter.dispatch_attention_fn

    def spy(query, key, value, attn_mask=None, backend=None, **kwargs):
        seen.append((key.shape[1], backend))
        return dispatch(query, key, value, attn_mask=attn_mask, backend=backend, **kwargs)

    monkeypatch.setattr(adapter, "dispatch_attention_fn", spy)
    attn = tiny_model.transformer.blocks[0].attn2
    processor = attn.processor
    dim, width = attn.to_q.in_features, processor.audio.k_proj.in_features
    frames, per_frame = 3, 4
    # in the instance's own dict, removed again afterwards: left behind, block 0 alone would differ from the other
    # blocks and compiled blocks would make it graphs of its own
    monkeypatch.setitem(processor.__dict__, "_attention_backend", "_native_math")
    monkeypatch.setattr(processor, "conditioning", AudioConditioning(
        torch.randn(1, frames, 7, width), torch.tensor([5, 7, 7]), 1.0, tokens_per_frame=per_frame))
    with torch.no_grad():
        attn(torch.randn(1, frames * per_frame, dim), torch.randn(1, 257 + TEXT_LEN, dim))
    assert seen == [(TEXT_LEN, "_native_math"), (257, "_native_math"), (5, "_native_math"), (7, "_native_math")]
