"""Step caching (issue 18): the error each first-block-cache threshold adds, and the block computations it skips.

For each model a full sampling run (three guidance passes per step, cfg 5, audio cfg 5, shift 5, fixed seed) is
made without the cache and with each threshold (``sampling/step_cache.py``: one cache per guidance pass, the first
3 and last 2 steps always computed). Reported per threshold: the relative RMS error of the final latent against the
uncached run, the fraction of block computations skipped (one per block, pass and step), the pass-forwards that
skipped (and, in the JSON, the CPU time of the run: process time, all threads; noisy on a shared machine). A
never-skipping run records the step-to-step relative change of each pass's block-0 residual, the quantity the
threshold is compared with (and checks that a cache that never skips changes no bit).

Models, both with **random weights** (the residual changes of trained weights behave differently: thresholds that
skip here are not the thresholds that suit the real model):

  tiny  the official fixture's DiT (tests/fixtures/official: 2 blocks, dim 64), float32: diffusers' forward calls
        the blocks; 48x48 px, 17 frames (45 tokens).
  mid   Wan2.1-I2V-14B's block layout shrunk to 12 blocks of 4 heads x 128 (dim 512, FFN 2048, text 4096, CLIP 1280,
        adapter width 256), N(0, 0.02) weights, bf16 under the official precision policy (the float32-island
        forward calls the blocks); latent 16x16, 21 frames (384 tokens).

Usage (from the repository root; about 10 minutes on 2 CPU cores):
    PYTHONPATH=. python3 benchmarks/bench_step_cache.py [--models tiny mid] [--steps 12] [--batch-passes] [--json]
What a hit saves, per step (three passes uncached, all missing, all hitting; ``full`` = the 14B DiT at
512x512x81 with random weights, for a GPU):
    PYTHONPATH=. python3 benchmarks/bench_step_cache.py --step-timing full --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fantasytalking_core.sampling.euler import (DiTConditions, guided_velocity, initial_noise,  # noqa: E402
                                                sample_flow_euler)
from fantasytalking_core.sampling.guidance import GuidanceConfig  # noqa: E402
from fantasytalking_core.sampling.schedule import flow_match_sigmas  # noqa: E402
from fantasytalking_core.sampling.step_cache import FIRST_STEPS, LAST_STEPS, StepCache  # noqa: E402

SEED = 1111
GUIDANCE = GuidanceConfig(cfg=5.0, audio_cfg=5.0)
THRESHOLDS = (0.025, 0.03, 0.035, 0.04, 0.05, 0.08, 0.1, 0.2, 0.3, 0.4, 0.5)


def tiny_model() -> tuple[torch.nn.Module, DiTConditions, tuple[int, ...]]:
    from safetensors.torch import load_file

    from fantasytalking_core.audio.windows import audio_windows_for_frames, gather_audio_windows
    from fantasytalking_core.parity import load_fixture_model

    root = ROOT / "tests" / "fixtures" / "official"
    model = load_fixture_model(root, "dit.safetensors", "fantasytalking.ckpt")
    x = load_file(root / "inputs.safetensors")
    num_frames = json.loads((root / "sampling.json").read_text())["num_frames"]
    windows = audio_windows_for_frames(x["audio_features"].shape[1], num_frames)
    with torch.no_grad():
        audio = gather_audio_windows(model.project_audio(x["audio_features"]), windows)
    cond = DiTConditions(x["context_pos"], x["context_neg"], x["clip_feature"], x["y"], audio,
                         windows.k_lens_tensor(), 1.0)
    return model, cond, tuple(x["x"].shape)


def mid_model() -> tuple[torch.nn.Module, DiTConditions, tuple[int, ...]]:
    from bench_gpu import build_random_model, make_inputs, mid_scale

    scale = mid_scale()
    torch.manual_seed(0)
    model = build_random_model(scale, torch.device("cpu"), torch.bfloat16)  # official precision policy
    inputs = make_inputs(model, scale, scale.latent_hw, torch.device("cpu"))
    return model, inputs.conditions, tuple(inputs.latents.shape)


def full_model(device: torch.device) -> tuple[torch.nn.Module, DiTConditions, tuple[int, ...]]:
    """The 14B DiT (720P config, adapter width 2048), random bf16 weights on ``device``, 512x512x81 inputs."""
    from bench_gpu import build_random_model, full_scale, make_inputs

    scale = full_scale()
    torch.manual_seed(0)
    model = build_random_model(scale, device, torch.bfloat16)
    inputs = make_inputs(model, scale, scale.latent_hw, device)
    return model, inputs.conditions, tuple(inputs.latents.shape)


MODELS = {"tiny": tiny_model, "mid": mid_model}


def run(model, cond, shape, steps: int, cache: StepCache | None, batch_passes: bool) -> tuple[torch.Tensor, float]:
    velocity = guided_velocity(model, cond, GUIDANCE, steps, batch_passes=batch_passes, step_cache=cache)
    start = time.process_time()  # CPU seconds of this process: steadier than wall time on a shared machine
    out = sample_flow_euler(velocity, initial_noise(shape, SEED), flow_match_sigmas(steps, 5.0))
    return out, time.process_time() - start


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def measure(name: str, steps: int, thresholds: tuple[float, ...], batch_passes: bool) -> dict:
    model, cond, shape = MODELS[name]()
    num_blocks = len(model.transformer.blocks)
    reference, seconds = run(model, cond, shape, steps, None, batch_passes)
    probe = StepCache(1.0, steps, first_steps=steps, last_steps=0)  # records the changes, never skips
    if not torch.equal(run(model, cond, shape, steps, probe, batch_passes)[0], reference):
        raise AssertionError("a cache that never skips changed the output")
    changes = [c for _, call in probe.calls for c in (call.changes or [])]
    forwards = sum(len(call.keys) for _, call in probe.calls)
    rows = [{"threshold": 0.0, "rel_rms_error": 0.0, "skipped_blocks": 0.0, "skipped_pass_forwards": f"0/{forwards}",
             "s": seconds}]
    for threshold in thresholds:
        cache = StepCache(threshold, steps)
        out, seconds = run(model, cond, shape, steps, cache, batch_passes)
        forwards = sum(len(call.keys) for _, call in cache.calls)
        skipped = sum(len(call.keys) for _, call in cache.calls if call.skipped)
        rows.append({"threshold": threshold, "rel_rms_error": rel_rms(out, reference),
                     "skipped_blocks": cache.skipped_fraction(num_blocks),
                     "skipped_pass_forwards": f"{skipped}/{forwards}", "s": seconds})
        print(f"{name} {threshold}: {rows[-1]}", file=sys.stderr, flush=True)
    return {"model": name, "blocks": num_blocks, "dtype": str(model.dtype).removeprefix("torch."),
            "policy": "diffusers' forward" if model.dtype == torch.float32 else f"{model.precision} policy",
            "tokens": shape[2] * shape[3] * shape[4] // 4, "steps": steps,
            "batch_passes": batch_passes,
            "change_quantiles": [float(q) for q in torch.tensor(changes).quantile(torch.tensor([0.1, 0.5, 0.9]))],
            "rows": rows}


def time_passes(name: str, device: torch.device, repeats: int = 3) -> dict:
    """Seconds of one sampling step (three passes, one by one) without the cache, with every pass missing (it
    runs every block and stores its residuals) and with every pass hitting (block 0, embeddings and head only);
    with the peak device memory of each on a GPU."""
    model, cond, shape = full_model(device) if name == "full" else MODELS[name]()
    model = model.to(device)
    cond = DiTConditions(*(v.to(device) if isinstance(v, torch.Tensor) else v for v in cond.__dict__.values()))
    x, sigma = initial_noise(shape, SEED).to(device), flow_match_sigmas(30, 5.0)[10]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    results = {}
    for mode in ("uncached", "miss", "hit"):
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            cache = None if mode == "uncached" else StepCache(1.0, 30, first_steps=1, last_steps=0)
            velocity = guided_velocity(model, cond, GUIDANCE, 30, step_cache=cache)
            if mode == "hit":
                velocity(x, 0, sigma)  # stores; the timed step then sees the same input and hits
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            start = time.perf_counter()
            velocity(x, 1 if mode == "hit" else 0, sigma)
            sync()
            times.append(time.perf_counter() - start)
            if mode == "hit":
                assert all(call.skipped for step, call in cache.calls if step == 1)
        results[mode] = {"s": min(times[1:]), "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30
                         if device.type == "cuda" else None}
        print(f"{name} {mode}: {results[mode]}", file=sys.stderr, flush=True)
    return {"model": name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "blocks": len(model.transformer.blocks), "step": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--thresholds", type=float, nargs="+", default=THRESHOLDS)
    parser.add_argument("--batch-passes", action="store_true", help="run each step's passes as one batch")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    parser.add_argument("--step-timing", choices=["tiny", "mid", "full"],
                        help="instead: time one step uncached / all passes missing / all hitting (full = the 14B "
                             "DiT at 512x512x81, for a GPU)")
    parser.add_argument("--device", default="cpu", help="where --step-timing runs")
    args = parser.parse_args()
    if args.step_timing:
        print(json.dumps(time_passes(args.step_timing, torch.device(args.device))))
        return
    results = [measure(name, args.steps, tuple(args.thresholds), args.batch_passes) for name in args.models]
    if args.json:
        print(json.dumps(results))
        return
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads; seed {SEED}, cfg 5, audio cfg 5, shift 5; protected steps: first {FIRST_STEPS}, last {LAST_STEPS}")
    for r in results:
        q10, q50, q90 = r["change_quantiles"]
        print(f"\n{r['model']}: {r['blocks']} blocks, {r['dtype']} ({r['policy']}), {r['tokens']} tokens, "
              f"{r['steps']} steps, passes {'batched' if r['batch_passes'] else 'one by one'}; block-0 residual "
              f"change per step without skipping: 10% {q10:.3f}, median {q50:.3f}, 90% {q90:.3f}")
        print("| threshold | final latent rel RMS error | block computations skipped | pass-forwards skipped |")
        print("|---|---|---|---|")
        for row in r["rows"]:  # CPU seconds are in the JSON: on a shared machine they say little
            print(f"| {row['threshold']:g} | {row['rel_rms_error']:.2e} | {100 * row['skipped_blocks']:.1f}% | "
                  f"{row['skipped_pass_forwards']} |")


if __name__ == "__main__":
    main()
