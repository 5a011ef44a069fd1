"""Long recordings in segments: tiny models end to end, chaining modes, progress/interrupt, colour match, crossfade."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from fantasytalking_core.audio.timeline import plan_segments
from fantasytalking_core.loaders.model_paths import load_models
from fantasytalking_core.media.color import lab_stats, match_color, rgb_to_lab
from fantasytalking_core.pipeline import FantasyTalkingPipeline, GenerationSettings
from fantasytalking_core.sampling.segments import SegmentOptions, crossfade, generate_segments
from fantasytalking_core.tiny import make_tiny_models


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    files = make_tiny_models(tmp_path_factory.mktemp("models"))
    return FantasyTalkingPipeline(load_models(files, compute_dtype=torch.float32))


def voice(seconds, sr=16000):
    t = torch.arange(int(seconds * sr)) / sr
    wave = 0.3 * torch.sin(2 * torch.pi * 220 * t) * (0.5 + 0.5 * torch.sin(2 * torch.pi * 3 * t))
    return {"waveform": wave.view(1, 1, -1), "sample_rate": sr}


@pytest.fixture(scope="module")
def face():
    return Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 64, 3), dtype=np.uint8))


SETTINGS = GenerationSettings(steps=2, image_size=32, seed=5)


def collect(stream):
    return torch.cat(list(stream.frames))


def test_a_recording_that_fits_one_segment_is_todays_video_bit_for_bit(pipe, face):
    audio = voice(0.4)  # 13 frames at 23 fps
    today = pipe(face, audio, SETTINGS)
    for options in (SegmentOptions(), SegmentOptions(segment_frames=13, motion_frames=5, chaining="motion_frames"),
                    SegmentOptions(segment_frames=13, motion_frames=5, chaining="pinned_latents")):
        stream = pipe.stream(face, audio, SETTINGS, options)
        assert len(stream.plan) == 1
        assert torch.equal(collect(stream), today.frames)
        assert torch.equal(stream.audio, today.audio) and stream.fps == today.fps


@pytest.mark.parametrize("chaining", ["last_frame", "motion_frames", "pinned_latents"])
def test_long_recording_in_segments_frames_progress_and_chaining(pipe, face, chaining):
    audio = voice(1.2)  # 4*floor(27.6/4)+5 = 29 frames -> 3 segments of 13 frames
    options = SegmentOptions(segment_frames=13, motion_frames=5, chaining=chaining)
    calls = []
    stream = pipe.stream(face, audio, SETTINGS, options, progress=lambda i, n: calls.append((i, n)))
    assert calls == []  # nothing runs before the frames are consumed
    chunks = list(stream.frames)
    frames = torch.cat(chunks)
    plan = stream.plan
    assert len(plan) == 3 and frames.shape == (plan.num_frames, 32, 32, 3) == (29, 32, 32, 3)
    assert calls == [(i, 6) for i in range(1, 7)]  # 2 steps x 3 segments, counted across segments
    assert frames.isfinite().all() and 0 <= frames.min() and frames.max() <= 1
    assert stream.audio.shape == (1, 19200)  # the whole recording (the video is up to 5 frames longer)
    # deterministic
    again = torch.cat(list(pipe.stream(face, audio, SETTINGS, options).frames))
    assert torch.equal(frames, again)


def test_chaining_modes_give_the_next_segment_its_known_frames(pipe, face):
    """Spy on the stages: segment 0 starts from the portrait; later ones get the previous segment's frames."""
    audio = voice(1.2)
    seen = {}
    for chaining, known_count in (("last_frame", 1), ("motion_frames", 5)):
        options = SegmentOptions(segment_frames=13, motion_frames=5, chaining=chaining)
        stream = pipe.stream(face, audio, SETTINGS, options)
        plan = stream.plan
        gen = stream.frames.gi_frame.f_locals  # generate_segments' arguments
        knowns, decoded = [], []
        condition, decode = gen["condition"], gen["decode"]
        frames = torch.cat(list(generate_segments(
            plan, gen["features"], gen["reference"], options,
            condition=lambda known, n: knowns.append(known) or condition(known, n), sample=gen["sample"],
            decode=lambda lat: decoded.append(decode(lat)) or decoded[-1], steps=SETTINGS.steps)))
        assert [k.shape[1] for k in knowns] == [1, known_count, known_count]
        assert torch.equal(knowns[0][:, 0], gen["reference"])
        for seg, known in zip(plan.segments[1:], knowns[1:]):  # the output frames at the segment's start
            assert torch.allclose((known.permute(1, 2, 3, 0) + 1) / 2, frames[seg.start: seg.start + known_count],
                                  atol=1e-6)
        if chaining == "last_frame":  # ... which is the previous segment's last frame, except at the end-aligned
            assert torch.equal(frames[plan.segments[1].start], decoded[0][-1])  # last segment
        seen[chaining] = frames
    assert not torch.equal(seen["last_frame"], seen["motion_frames"])


def spy_on_sampler(monkeypatch) -> list[dict]:
    """Record every denoising run of the pipeline: the starting noise, the pinned latents, the latent each model
    call sees, the latent after each step (through the sampler's callback) and the result."""
    from fantasytalking_core.sampling import denoise

    real, runs = denoise.sample_flow_euler, []

    def spy(velocity_fn, x, sigmas, callback=None, pinned=None):
        run = dict(noise=x.clone(), sigmas=sigmas, pinned=pinned, seen=[], after=[])

        def velocity(x, i, sigma):
            run["seen"].append(x.clone())
            return velocity_fn(x, i, sigma)

        def on_step(d):
            run["after"].append(d["x"].clone())
            if callback is not None:
                callback(d)

        run["out"] = real(velocity, x, sigmas, on_step, pinned)
        runs.append(run)
        return run["out"]

    monkeypatch.setattr(denoise, "sample_flow_euler", spy)
    return runs


def test_pinned_latents_follow_the_forward_process_and_end_on_the_known_latents(pipe, face, monkeypatch):
    import fantasytalking_core.pipeline as pipeline_module

    conditions = []
    real_condition = pipeline_module.known_frames_condition
    monkeypatch.setattr(pipeline_module, "known_frames_condition",
                        lambda *a, **k: conditions.append(real_condition(*a, **k)) or conditions[-1])
    runs = spy_on_sampler(monkeypatch)
    options = SegmentOptions(segment_frames=13, motion_frames=5, chaining="pinned_latents")
    collect(pipe.stream(face, voice(1.2), SETTINGS, options))
    assert len(runs) == len(conditions) == 3
    assert runs[0]["pinned"] is None  # the first segment is the single clip: nothing to pin
    for run, y in zip(runs[1:], conditions[1:]):
        known = y[:, 4:, :2]  # 5 motion frames = latent frames 0 and 1 of the segment's conditioning
        noise = run["noise"][:, :, :2]  # the segment's own seeded noise
        assert torch.equal(run["pinned"].latents, known) and torch.equal(run["pinned"].noise, noise)
        sigmas = run["sigmas"]
        assert len(run["seen"]) == len(run["after"]) == SETTINGS.steps
        for i in range(SETTINGS.steps):  # the model sees them at its step's sigma, they leave at the next one's
            assert torch.equal(run["seen"][i][:, :, :2], sigmas[i] * noise + (1 - sigmas[i]) * known)
            assert torch.equal(run["after"][i][:, :, :2], sigmas[i + 1] * noise + (1 - sigmas[i + 1]) * known)
        assert sigmas[0] > 0.9 and sigmas[-1] == 0
        assert torch.equal(run["out"][:, :, :2], known)  # exactly the known latents at the end
        assert not torch.equal(run["out"][:, :, 2:3], y[:, 4:, 2:3])  # the rest is sampled, not copied


def test_pinned_latents_change_the_sampled_frames_only_after_the_first_segment(pipe, face, monkeypatch):
    audio = voice(1.2)
    runs = spy_on_sampler(monkeypatch)
    frames = {c: collect(pipe.stream(face, audio, SETTINGS, SegmentOptions(13, 5, chaining=c)))
              for c in ("last_frame", "motion_frames", "pinned_latents")}
    latents = {c: [runs[i]["out"] for i in range(3 * k, 3 * k + 3)] for k, c in enumerate(frames)}
    first = plan_segments(29, 23, 60, 13, 5).segments[1].start  # 8: segment 0's own frames
    for chaining in ("last_frame", "motion_frames"):
        assert torch.equal(frames["pinned_latents"][:first], frames[chaining][:first])
        # the frames segments 1 and 2 sample (past the 5 pinned ones) differ
        assert (frames["pinned_latents"][first + 5:] - frames[chaining][first + 5:]).abs().amax() > 1e-3
    # same conditioning y as motion_frames: the difference is the pinning, on the non-pinned latent frames too
    assert torch.equal(latents["pinned_latents"][0], latents["motion_frames"][0])
    for pinned, free in zip(latents["pinned_latents"][1:], latents["motion_frames"][1:]):
        assert (pinned[:, :, 2:] - free[:, :, 2:]).abs().amax() > 1e-4


@pytest.mark.parametrize("stop_at", [1, 2, 3, 4, 6])
def test_interrupt_between_any_two_steps(pipe, face, stop_at):
    options = SegmentOptions(segment_frames=13, motion_frames=5)
    steps = []

    def stop(i, n):
        steps.append(i)
        if i == stop_at:
            raise KeyboardInterrupt

    stream = pipe.stream(face, voice(1.2), SETTINGS, options, progress=stop)
    got = []
    with pytest.raises(KeyboardInterrupt):
        for chunk in stream.frames:
            got.append(chunk)
    assert steps == list(range(1, stop_at + 1))  # no step after the interrupt
    assert sum(len(c) for c in got) < stream.plan.num_frames


def test_plan_and_options_must_agree():
    plan = plan_segments(29, 23, 60, 13, 5)
    with pytest.raises(ValueError, match="overlaps"):
        list(generate_segments(plan, torch.zeros(60, 4), torch.zeros(3, 8, 8), SegmentOptions(13, 5),
                               condition=None, sample=None, decode=None, steps=1))
    for bad in (dict(segment_frames=12), dict(motion_frames=4), dict(motion_frames=81, chaining="motion_frames"),
                dict(chaining="x"), dict(color_match=1.5)):
        with pytest.raises(ValueError):
            SegmentOptions(**bad)


# ---- colour match and crossfade on synthetic frames ----

def test_color_match_moves_a_tinted_segment_to_the_reference_statistics():
    g = torch.Generator().manual_seed(0)
    reference = 0.25 + 0.5 * torch.rand(24, 24, 3, generator=g)
    tinted = (reference[None].repeat(5, 1, 1, 1) * torch.tensor([1.15, 0.9, 0.75]) + 0.05).clamp(0, 1)
    ref_mean, ref_std = lab_stats(reference)
    before_mean, before_std = lab_stats(tinted)
    after_mean, after_std = lab_stats(match_color(tinted, reference, 1.0))
    assert (before_mean - ref_mean).abs().max() > 5  # clearly tinted
    assert (after_mean - ref_mean).abs().max() < 0.5 and (after_std - ref_std).abs().max() < 0.5
    half_mean, _ = lab_stats(match_color(tinted, reference, 0.5))
    assert torch.allclose(half_mean, (before_mean + ref_mean) / 2, atol=0.5)  # strength blends linearly
    assert match_color(tinted, reference, 0.0) is tinted  # off is off
    # a segment that already has the reference's statistics is left alone
    assert torch.allclose(match_color(reference[None], reference, 1.0), reference[None], atol=1e-5)


def test_lab_conversion_round_trips_and_hits_known_values():
    x = torch.rand(2, 7, 5, 3, generator=torch.Generator().manual_seed(1))
    from fantasytalking_core.media.color import lab_to_rgb
    assert torch.allclose(lab_to_rgb(rgb_to_lab(x)).float(), x, atol=1e-6)
    assert torch.allclose(rgb_to_lab(torch.tensor([1.0, 1.0, 1.0])).float(), torch.tensor([100.0, 0, 0]), atol=1e-3)
    assert torch.allclose(rgb_to_lab(torch.tensor([1.0, 0, 0])).float(), torch.tensor([53.24, 80.09, 67.20]),
                          atol=0.01)


def test_crossfade_is_a_monotone_blend_over_exactly_the_overlap():
    earlier, later = torch.zeros(4, 2, 2, 3), torch.ones(4, 2, 2, 3)
    out = crossfade(earlier, later)
    weights = out[:, 0, 0, 0]
    assert torch.allclose(weights, torch.tensor([0.2, 0.4, 0.6, 0.8]))  # rising, strictly inside (0, 1)
    assert out.shape == earlier.shape and torch.equal(out, out[:, :1, :1, :1].expand_as(out))
    with pytest.raises(ValueError):
        crossfade(earlier, later[:3])


def test_crossfade_and_color_match_in_a_run(pipe, face):
    audio = voice(1.2)
    base = SegmentOptions(segment_frames=13, motion_frames=5)
    plain = collect(pipe.stream(face, audio, SETTINGS, base))
    faded = collect(pipe.stream(face, audio, SETTINGS, SegmentOptions(13, 5, crossfade=True)))
    plan = plan_segments(29, 23, 60, 13, 1)
    seams = {f for s in plan.segments[1:] for f in range(s.start, s.start + s.keep_from)}
    changed = {int(f) for f in torch.nonzero((plain != faded).flatten(1).any(1))}
    assert changed and changed <= seams  # only the shared frames are blended (later frames follow the same chain)
    matched = collect(pipe.stream(face, audio, SETTINGS, SegmentOptions(13, 5, color_match=1.0)))
    assert matched.shape == plain.shape and not torch.equal(matched, plain)


# ---- the file: streamed, atomic; the command line ----

def test_write_long_video_streams_to_an_mp4_and_an_interrupt_leaves_no_file(pipe, face, tmp_path):
    import av

    from fantasytalking_core.face.workflow import prepare_job
    from fantasytalking_core.long_video import write_long_video

    options = SegmentOptions(segment_frames=13, motion_frames=5)
    job = prepare_job(face, SETTINGS)
    report = write_long_video(pipe, job, voice(1.2), options, tmp_path / "long.mp4", sample_frames=4)
    assert len(report.segment_seconds) == len(report.plan) == 3 and report.samples.shape[0] == 4
    with av.open(str(tmp_path / "long.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 29
        assert abs(float(c.streams.audio[0].duration * c.streams.audio[0].time_base) - 29 / 23) < 0.07
    expected = collect(pipe.stream(face, voice(1.2), SETTINGS, options))
    assert torch.equal(report.samples, expected[::8])

    def stop(i, n):
        if i == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_long_video(pipe, job, voice(1.2), options, tmp_path / "cut.mp4", progress=stop)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4"]  # no partial file, no temp file


def test_command_line_segments_by_default_and_max_frames_keeps_the_single_clip(tmp_path):
    import wave

    import av
    from cli_runs import run_here

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "f.png")
    samples = (voice(1.2)["waveform"].flatten().numpy() * 32767).astype(np.int16)
    with wave.open(str(tmp_path / "v.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(samples.tobytes())

    def generate(out, *extra):
        return run_here(["generate", "--tiny", "--steps", "1", "--image-size", "32", "--image", str(tmp_path / "f.png"),
                         "--audio", str(tmp_path / "v.wav"), "--out", str(tmp_path / out), *extra])

    proc = generate("long.mp4", "--segment-frames", "13", "--motion-frames", "5", "--chaining", "motion_frames",
                    "--crossfade", "--color-match", "0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "29 frames" in proc.stdout and "3 segment(s)" in proc.stdout
    proc = generate("clip.mp4", "--max-frames", "13")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with av.open(str(tmp_path / "long.mp4")) as a, av.open(str(tmp_path / "clip.mp4")) as b:
        assert sum(1 for _ in a.decode(video=0)) == 29 and sum(1 for _ in b.decode(video=0)) == 13
    proc = generate("bad.mp4", "--segment-frames", "12")
    assert proc.returncode == 2 and "--segment-frames must be 4n+1" in proc.stderr and "Traceback" not in proc.stderr


def test_segment_seeds_wrap_at_64_bits(pipe, face, monkeypatch):
    """Segment i is seeded ``seed + i`` modulo 2**64: the top seed ComfyUI's widget offers runs past segment 0."""
    from fantasytalking_core.sampling import denoise
    from fantasytalking_core.sampling.segments import MAX_SEED

    seeds = []
    real = denoise.initial_noise
    monkeypatch.setattr(denoise, "initial_noise", lambda shape, seed: seeds.append(seed) or real(shape, seed))
    options = SegmentOptions(segment_frames=13, motion_frames=5)
    stream = pipe.stream(face, voice(0.8), replace(SETTINGS, seed=MAX_SEED, steps=1), options)
    assert len(stream.plan) == 2
    assert len(list(stream.frames)) == 2 and seeds == [MAX_SEED, 0]


def test_a_negative_seed_is_the_generators_same_seed_counted_from_2_to_the_64():
    """torch's generators take -2**63..2**64-1, a negative seed s giving the noise of s + 2**64: kept as that."""
    from fantasytalking_core.errors import SettingsError
    from fantasytalking_core.sampling.segments import MAX_SEED

    assert GenerationSettings(seed=-1).seed == MAX_SEED and GenerationSettings(seed=7).seed == 7
    for bad in (1.5, -(2**63) - 1, 2**64):
        with pytest.raises(SettingsError, match="seed must be a whole number"):
            GenerationSettings(seed=bad)


def test_short_segments_with_last_frame_chaining_need_no_motion_frames_value():
    # segment_frames 9 was refused for the default motion_frames 9, which last_frame chaining never uses
    from fantasytalking_core.sampling.segments import SegmentOptions

    assert SegmentOptions(segment_frames=9, motion_frames=9, chaining="last_frame").overlap == 1
    assert SegmentOptions(segment_frames=5).overlap == 1
    with pytest.raises(ValueError, match=r"less than segment_frames \(9\) with chaining pinned_latents, got 9"):
        SegmentOptions(segment_frames=9, motion_frames=9, chaining="pinned_latents")
    with pytest.raises(ValueError, match=r"motion_frames must be 4m\+1"):  # its form is still checked
        SegmentOptions(segment_frames=81, motion_frames=8)
