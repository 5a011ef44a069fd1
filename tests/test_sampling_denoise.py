"""fantasytalking_core.sampling.denoise: the whole denoising run from explicit arguments, against the official run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fantasytalking_core.sampling.denoise import generate_latents
from fantasytalking_core.sampling.guidance import GuidanceConfig
from fantasytalking_core.sampling.schedule import flow_match_sigmas


@pytest.fixture(scope="module")
def official(official_inputs, official_dir):
    settings = json.loads((official_dir / "sampling.json").read_text())
    return settings, official_inputs, load_file(official_dir / "sampling.safetensors")


def run(model, settings, x, **overrides):
    args = dict(guidance=GuidanceConfig(cfg=settings["cfg_scale"], audio_cfg=settings["audio_cfg_scale"]),
                sigmas=flow_match_sigmas(settings["num_inference_steps"], 5.0), seed=settings["seed"],
                audio_scale=settings["audio_scale"])
    args.update(overrides)
    return generate_latents(model, x["context_pos"], x["context_neg"], x["clip_feature"], x["y"], x["audio_features"][0],
                            settings["num_frames"], **args)


def test_explicit_arguments_reproduce_the_official_run(tiny_model, official):
    settings, x, ref = official
    seen = []
    final = run(tiny_model, settings, x, progress=lambda i, n: seen.append((i, n)))
    steps = settings["num_inference_steps"]
    assert seen == [(i + 1, steps) for i in range(steps)]  # the step count comes from the sigmas
    assert (final - ref["final_latent"]).abs().max() <= 1e-4 * ref["final_latent"].abs().max()


def test_seed_and_audio_strength_are_used(tiny_model, official):
    settings, x, ref = official
    two_steps = flow_match_sigmas(2, 5.0)
    base = run(tiny_model, settings, x, sigmas=two_steps)
    assert not torch.equal(base, run(tiny_model, settings, x, sigmas=two_steps, seed=settings["seed"] + 1))
    assert not torch.equal(base, run(tiny_model, settings, x, sigmas=two_steps, audio_scale=0.0))


def test_latent_frames_must_fit_the_video_frames(tiny_model, official):
    settings, x, _ = official
    with pytest.raises(ValueError, match="latent frames"):
        generate_latents(tiny_model, x["context_pos"], x["context_neg"], x["clip_feature"], x["y"], x["audio_features"][0],
                         settings["num_frames"] + 4, guidance=GuidanceConfig(), sigmas=flow_match_sigmas(1), seed=0)


def test_a_run_that_reaches_nan_or_infinity_stops_at_that_step(tiny_model, official):
    # cfg 1e308 once gave an all-black video and exit status 0; fp16 overflow does the same on a GPU
    from fantasytalking_core.errors import NonFiniteError

    settings, x, _ = official
    seen = []
    with pytest.raises(NonFiniteError, match="sampling step 1 of 3 gave NaN or infinite values, so the video would "
                                             "be black; keep cfg, audio_cfg, shift and audio_scale near"):
        run(tiny_model, settings, x, sigmas=flow_match_sigmas(3, 5.0), guidance=GuidanceConfig(cfg=1e308),
            progress=lambda i, n: seen.append(i))
    assert seen == []  # stopped before the progress of the broken step
