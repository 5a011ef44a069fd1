import pytest
import torch

from fantasytalking_core.sampling.guidance import (
    NEG,
    POS,
    POS_AUDIO,
    GuidanceConfig,
    combine_guidance,
    passes_for_step,
    passes_in_run,
)


def preds():
    return {NEG: torch.tensor([1.0]), POS: torch.tensor([3.0]), POS_AUDIO: torch.tensor([10.0])}


def test_three_pass_combine_is_the_official_formula():
    # u + s_p (p - u) + s_a (pa - p) = 1 + 4.5*2 + 3*7
    assert combine_guidance(preds(), GuidanceConfig(cfg=4.5, audio_cfg=3.0)).item() == 1 + 4.5 * 2 + 3.0 * 7


def test_cfg_one_uses_two_passes_and_keeps_audio_guidance():
    cfg = GuidanceConfig(cfg=1.0, audio_cfg=2.0)
    assert passes_for_step(0, 10, cfg) == (POS, POS_AUDIO)
    p = {k: v for k, v in preds().items() if k != NEG}
    assert combine_guidance(p, cfg).item() == 3 + 2.0 * 7


def test_audio_guidance_step_range():
    cfg = GuidanceConfig(cfg=5.0, audio_cfg=4.0, audio_start=0.2, audio_end=0.6)
    active = [POS in passes_for_step(i, 10, cfg) for i in range(10)]
    assert active == [False, False, True, True, True, True, False, False, False, False]
    # outside the range: plain CFG with audio on in the positive pass
    p = {NEG: torch.tensor([1.0]), POS_AUDIO: torch.tensor([10.0])}
    assert combine_guidance(p, cfg).item() == 1 + 5.0 * 9


def test_default_range_is_every_step():
    assert all(passes_for_step(i, 30, GuidanceConfig()) == (NEG, POS, POS_AUDIO) for i in range(30))


def test_bad_range_is_refused():
    with pytest.raises(ValueError, match="audio guidance range"):
        GuidanceConfig(audio_start=0.8, audio_end=0.2)


def test_step_of_sigma_finds_the_step_a_sampler_is_at():
    """ComfyUI's guiders only see the current sigma; the audio-guidance range needs the step index."""
    from fantasytalking_core.sampling.guidance import step_of_sigma
    from fantasytalking_core.sampling.schedule import flow_match_sigmas

    sigmas = flow_match_sigmas(6, 5.0)
    assert [step_of_sigma(sigmas, s) for s in sigmas[:-1]] == list(range(6))
    assert step_of_sigma(sigmas, torch.tensor([float(sigmas[3]) + 1e-7])) == 3  # a sampler's rounding
    config = GuidanceConfig(audio_start=0.0, audio_end=0.5)
    assert [POS in passes_for_step(step_of_sigma(sigmas, s), 6, config) for s in sigmas[:-1]] == [True] * 3 + [False] * 3


def test_max_passes_counts_the_busiest_step():
    from fantasytalking_core.sampling.guidance import max_passes

    assert max_passes(4, GuidanceConfig(cfg=5.0, audio_cfg=3.0)) == 3
    assert max_passes(4, GuidanceConfig(cfg=1.0, audio_cfg=3.0)) == 2  # no negative pass
    assert max_passes(4, GuidanceConfig(cfg=5.0, audio_cfg=3.0, audio_start=0.5, audio_end=0.5)) == 2  # no audio step
    assert max_passes(4, GuidanceConfig(cfg=1.0, audio_cfg=3.0, audio_start=1.0, audio_end=1.0)) == 1


@pytest.mark.parametrize("config", [GuidanceConfig(), GuidanceConfig(audio_start=0.2, audio_end=0.6),
                                    GuidanceConfig(cfg=1.0, audio_end=0.5), GuidanceConfig(cfg=1.0)])
def test_two_groups_share_every_two_pass_step(config):
    # a parallel run deals the run's passes to its cfg groups once (each pass keeps its rank, and with it its step
    # cache); a step of two passes must still use both of two groups, whichever two passes it runs
    run = passes_in_run(10, config)
    assert set(run) == {p for step in range(10) for p in passes_for_step(step, 10, config)}
    for step in range(10):
        passes = passes_for_step(step, 10, config)
        if len(passes) == 2:
            assert {run.index(p) % 2 for p in passes} == {0, 1}, (config, step, passes)
