"""sampling.step_cache: the opt-in first-block cache, one cache per guidance pass, for one generation.

Models: the official fixture's tiny DiT in float32 (diffusers' forward calls the blocks) and the bf16 precision
set's DiT (2 heads of 128, 4 blocks) under both precision policies (the official one runs the float32-island
forward, which calls the blocks itself), so both block loops are covered.
"""

import json
import math

import pytest
import torch

from fantasytalking_core.audio.windows import audio_windows_for_frames, gather_audio_windows
from fantasytalking_core.errors import SettingsError
from fantasytalking_core.model.transformer import FantasyTalkingModel
from fantasytalking_core.parity import load_precision_set_model
from fantasytalking_core.pipeline import GenerationSettings
from fantasytalking_core.sampling.denoise import generate_latents
from fantasytalking_core.sampling.euler import DiTConditions, guided_velocity, initial_noise, sample_flow_euler
from fantasytalking_core.sampling.guidance import NEG, POS, POS_AUDIO, GuidanceConfig
from fantasytalking_core.sampling.schedule import flow_match_sigmas
from fantasytalking_core.sampling.step_cache import FIRST_STEPS, LAST_STEPS, StepCache, check_step_cache

SEED = 1111


def conditions(model, x, num_frames, audio_scale=1.0) -> DiTConditions:
    windows = audio_windows_for_frames(x["audio_features"].shape[1], num_frames)
    with torch.no_grad():
        audio = gather_audio_windows(model.project_audio(x["audio_features"]), windows)
    return DiTConditions(x["context_pos"], x["context_neg"], x["clip_feature"], x["y"], audio, windows.k_lens_tensor(),
                         audio_scale)


@pytest.fixture(scope="module")
def tiny(tiny_model, official_inputs, official_dir):
    num_frames = json.loads((official_dir / "sampling.json").read_text())["num_frames"]
    return tiny_model, conditions(tiny_model, official_inputs, num_frames), tuple(official_inputs["x"].shape)


@pytest.fixture(scope="module")
def bf16_set(official_bf16_dir):
    from safetensors.torch import load_file

    inputs = load_file(official_bf16_dir / "inputs.safetensors")
    num_frames = json.loads((official_bf16_dir / "stats.json").read_text())["num_frames"]
    model = load_precision_set_model(official_bf16_dir, torch.bfloat16)
    return model, conditions(model, inputs, num_frames), tuple(inputs["x"].shape)


@pytest.fixture(params=["float32", "bf16 official", "bf16 diffusers"])
def case(request, tiny, bf16_set):
    """(model, conditions, latent shape) for each way the blocks are called."""
    if request.param == "float32":
        return tiny
    model, cond, shape = bf16_set
    policy = request.param.split()[1]
    return FantasyTalkingModel(model.transformer, model.audio_proj, policy), cond, shape


def sample(model, cond, shape, steps, cache=None, batch_passes=False, guidance=GuidanceConfig(5.0, 5.0)):
    velocity = guided_velocity(model, cond, guidance, steps, batch_passes=batch_passes, step_cache=cache)
    return sample_flow_euler(velocity, initial_noise(shape, SEED), flow_match_sigmas(steps, 5.0))


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def test_threshold_zero_is_todays_run_bit_for_bit(tiny_model, official_inputs, official_dir):
    settings = json.loads((official_dir / "sampling.json").read_text())
    x = official_inputs
    args = (tiny_model, x["context_pos"], x["context_neg"], x["clip_feature"], x["y"], x["audio_features"][0],
            settings["num_frames"])
    kwargs = dict(guidance=GuidanceConfig(5.0, 5.0), sigmas=flow_match_sigmas(8, 5.0), seed=SEED)
    today = generate_latents(*args, **kwargs)
    assert torch.equal(generate_latents(*args, **kwargs, step_cache=0.0), today)
    assert not torch.equal(generate_latents(*args, **kwargs, step_cache=0.5), today)  # the knob reaches the sampler


@pytest.mark.parametrize("batch_passes", [False, True])
def test_a_cache_that_never_skips_changes_no_bit(case, batch_passes):
    # every forward goes through the cache (decides, stores) but no step may skip: the numbers must not move
    model, cond, shape = case
    steps = 4
    cache = StepCache(1.0, steps, first_steps=steps, last_steps=0)
    cached = sample(model, cond, shape, steps, cache, batch_passes)
    assert torch.equal(cached, sample(model, cond, shape, steps, None, batch_passes))
    assert len(cache.calls) == steps * (1 if batch_passes else 3) and not any(c.skipped for _, c in cache.calls)
    assert all(b.block_cache is None for b in model.transformer.blocks)


@pytest.mark.parametrize("batch_passes", [False, True])
def test_a_hit_gives_each_pass_its_own_residual(case, batch_passes):
    # Step 1 sees exactly step 0's input: every pass hits (change 0). A hit must rebuild each pass's own step-0
    # output; had the negative pass been handed the audio pass's residual it would be off by their difference.
    model, cond, shape = case
    cond = DiTConditions(**{**cond.__dict__, "audio_scale": 4.0})  # make the passes differ strongly
    cache = StepCache(0.01, 4, first_steps=1, last_steps=0)
    seen = {}
    velocity = guided_velocity(model, cond, GuidanceConfig(5.0, 5.0), 4, batch_passes=batch_passes,
                               on_passes=lambda step, preds: seen.update({step: preds}), step_cache=cache)
    x, sigma = initial_noise(shape, SEED), flow_match_sigmas(4, 5.0)[1]
    velocity(x, 0, sigma)
    velocity(x, 1, sigma)
    assert [c.skipped for step, c in cache.calls if step == 1] == [True] * (1 if batch_passes else 3)

    tails = {p: cache.residuals[p].tail for p in (NEG, POS, POS_AUDIO)}
    assert rel_rms(tails[POS_AUDIO], tails[NEG]) > 0.05  # the residuals differ: a mix-up would show
    gap = (seen[0][POS_AUDIO] - seen[0][NEG]).abs().max()
    for p in (NEG, POS, POS_AUDIO):
        own = seen[0][p]
        tol = 1e-5 * own.abs().max() if own.dtype == torch.float32 and model.dtype == torch.float32 else \
            2e-2 * own.abs().max()  # bf16 stream (diffusers' policy) rounds block 0 + stored tail
        assert (seen[1][p] - own).abs().max() <= tol, p
        assert (seen[1][p] - own).abs().max() < gap / 10, p


def count_block_computations(model):
    """A spy: counts every block computation (each computed block runs its FFN once per forward)."""
    counter = {"n": 0}

    def hook(*_):
        counter["n"] += 1

    handles = [b.ffn.register_forward_hook(hook) for b in model.transformer.blocks]
    return counter, handles


@pytest.mark.parametrize("batch_passes", [False, True])
def test_the_skip_decision_follows_the_threshold(tiny, batch_passes):
    model, cond, shape = tiny
    steps, n = 12, len(model.transformer.blocks)
    counter, handles = count_block_computations(model)
    try:
        cache = StepCache(0.4, steps)  # the tiny model's changes here: 0.24-0.48
        sample(model, cond, shape, steps, cache, batch_passes)
    finally:
        for h in handles:
            h.remove()
    expected = 0
    for step, call in cache.calls:
        protected = step < FIRST_STEPS or step >= steps - LAST_STEPS
        if protected or call.changes is None:
            assert not call.skipped
        else:
            assert call.skipped == (max(call.changes) < 0.4), (step, call.changes)
        expected += 1 if call.skipped else n  # one FFN call per computed block and forward, whatever the batch
    assert counter["n"] == expected
    decisions = [c.skipped for s, c in cache.calls if FIRST_STEPS <= s < steps - LAST_STEPS]
    assert any(decisions) and not all(decisions)  # the threshold sits inside the measured changes
    assert 0 < cache.skipped_fraction(n) < 1


def test_a_batch_skips_only_when_every_pass_may(tiny):
    # audio guidance from half way: the positive pass without audio first appears at step 6 with nothing stored,
    # so that batch must run every block although its other passes changed little
    model, cond, shape = tiny
    steps = 12
    cache = StepCache(1.0, steps, first_steps=1, last_steps=0)
    sample(model, cond, shape, steps, cache, batch_passes=True, guidance=GuidanceConfig(5.0, 5.0, 0.5, 1.0))
    calls = dict(cache.calls)
    assert calls[6].keys == (NEG, POS, POS_AUDIO) and calls[6].changes is None and not calls[6].skipped
    assert calls[5].skipped and calls[7].skipped  # threshold 1: every other step after the first hits


def test_no_state_survives_a_run(tiny_model, official_inputs, official_dir):
    settings = json.loads((official_dir / "sampling.json").read_text())
    x = official_inputs

    def run():
        return generate_latents(tiny_model, x["context_pos"], x["context_neg"], x["clip_feature"], x["y"],
                                x["audio_features"][0], settings["num_frames"], guidance=GuidanceConfig(5.0, 5.0),
                                sigmas=flow_match_sigmas(10, 5.0), seed=SEED, step_cache=0.3)

    first = run()
    assert torch.equal(run(), first)  # a second run starts as fresh as the first
    assert all("block_cache" not in b.__dict__ for b in tiny_model.transformer.blocks)


def test_the_error_grows_with_the_threshold(tiny):
    # fixed seed, CPU, deterministic: more skipping, more error (random weights: see docs/benchmarks.md)
    model, cond, shape = tiny
    steps = 16
    reference = sample(model, cond, shape, steps)
    rows = []
    for threshold in (0.1, 0.25, 0.35, 0.5):
        cache = StepCache(threshold, steps)
        rows.append((cache, rel_rms(sample(model, cond, shape, steps, cache), reference)))
    fractions = [cache.skipped_fraction(2) for cache, _ in rows]
    errors = [error for _, error in rows]
    assert fractions == sorted(fractions) and fractions[-1] > fractions[0]
    assert errors == sorted(errors) and errors[-1] > 0
    assert all((e == 0) == (f == 0) for e, f in zip(errors, fractions))  # error only where blocks were skipped


@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf, 1.5, "abc", None])
def test_bad_thresholds_are_refused_in_one_line(value):
    with pytest.raises(SettingsError, match="step_cache must be a number from 0 .off. to 1") as info:
        check_step_cache(value)
    assert "\n" not in str(info.value)
    with pytest.raises(SettingsError, match="step_cache"):
        GenerationSettings(step_cache=value)


def test_a_step_cache_needs_a_positive_threshold():
    assert check_step_cache(0) == 0.0 and check_step_cache("0.08") == 0.08
    with pytest.raises(SettingsError, match="above 0"):
        StepCache(0.0, 30)
    cache = StepCache(0.1, 30)
    assert [s for s in range(30) if not cache.may_skip(s)] == [0, 1, 2, 28, 29]


@pytest.mark.parametrize("steps", [1, 4, FIRST_STEPS + LAST_STEPS])
def test_a_step_cache_in_a_run_too_short_to_skip_is_refused(steps):
    # the 4-step distilled preset with a step cache: every step protected, residuals stored, nothing said
    with pytest.raises(SettingsError, match=f"step_cache skips nothing in a {steps}-step run"):
        GenerationSettings(steps=steps, step_cache=0.1)
    GenerationSettings(steps=steps, step_cache=0.0)  # off: fine
    GenerationSettings(steps=FIRST_STEPS + LAST_STEPS + 1, step_cache=0.1)  # one step may skip
