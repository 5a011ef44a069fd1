"""Seconds per step and GPU memory of one video spread over several GPUs, measured: the run that the scaling
ESTIMATE in docs/benchmarks.md (``estimate_parallel.py``) stands in for until a multi-GPU machine has run this.

Started by torchrun, one process per GPU; every process builds the same random-weight model (same seed), joins
the layout's mesh (``runtime/parallel.py``: NCCL on GPUs, gloo on the CPU) and samples a few steps through the
library's own entry point (``pipeline.sample_latents`` with the passes shared over the ranks), as
``generate --parallel`` does. Rank 0 writes one JSON row: seconds of every step, the median, peak GPU memory of
every rank (``torch.cuda.max_memory_allocated``) and, at the tiny scale, the largest difference from the same
run in one process (computed by rank 0 afterwards).

    # the 14B architecture at 512x512x81, 4 GPUs, each layout in its own launch:
    torchrun --nproc-per-node 4 benchmarks/bench_parallel.py --layout ulysses=4 --out ulysses4.json
    torchrun --nproc-per-node 4 benchmarks/bench_parallel.py --layout cfg=2,ulysses=2,fsdp --out c2u2f.json
    # smoke test on a CPU (tiny model, gloo; ring/ulysses need GPUs):
    torchrun --nproc-per-node 2 benchmarks/bench_parallel.py --scale tiny --device cpu --layout cfg=2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from bench_gpu import audio_token_count, build_random_model, full_scale, tiny_scale  # noqa: E402
from harness import GIB  # noqa: E402

from fantasytalking_core.pipeline import GenerationSettings, sample_latents  # noqa: E402
from fantasytalking_core.runtime.parallel import (ParallelRun, check_offload_fits_layout,  # noqa: E402
                                                  init_process_group_from_env, parse_parallel)
from fantasytalking_core.runtime.placement import dit_on_device, on_device  # noqa: E402


def run_inputs(scale, device: torch.device) -> tuple:
    """Seeded sampler inputs of ``scale``'s shapes, the same on every rank (text, negative text, CLIP tokens,
    image latents y, wav2vec2 features, frames)."""
    g = torch.Generator().manual_seed(5)
    config, frames = scale.dit_config, (scale.num_frames - 1) // 4 + 1
    y = torch.randn(1, config["in_channels"] - config["out_channels"], frames, *scale.latent_hw, generator=g)
    return (torch.randn(1, 24, config["text_dim"], generator=g), torch.randn(1, 96, config["text_dim"], generator=g),
            torch.randn(1, 257, config["image_dim"], generator=g), y,
            torch.randn(audio_token_count(scale.num_frames), scale.audio_dim, generator=g), scale.num_frames)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", required=True, help="e.g. cfg=3, ulysses=4, cfg=2,ulysses=2,fsdp")
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps timed (the first includes warm-up)")
    parser.add_argument("--attention", default="sdpa", help="runtime/attention.py kernel (ring needs flash/sage)")
    parser.add_argument("--offload-blocks", action="store_true", help="each rank streams its blocks from the CPU")
    parser.add_argument("--out", type=Path, default=Path("bench_parallel.json"))
    args = parser.parse_args()

    layout = parse_parallel(args.layout)
    check_offload_fits_layout(layout, args.offload_blocks)
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    init_process_group_from_env(args.device)
    run = ParallelRun(layout, args.device)
    device = run.device
    scale = full_scale() if args.scale == "full" else tiny_scale()
    dtype = torch.bfloat16 if args.scale == "full" else torch.float32
    torch.manual_seed(0)  # the same weights on every rank
    model = build_random_model(scale, torch.device("cpu") if args.offload_blocks else device, dtype)
    run.prepare(model.transformer)
    inputs = run_inputs(scale, device)
    settings = GenerationSettings(steps=args.steps, seed=1, attention=args.attention)
    stamps: list[float] = []

    def progress(step: int, total: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    placement = "streamed" if args.offload_blocks else "resident"
    placed = on_device(model.audio_proj, device) if run.weights_sharded else dit_on_device(model, device, placement)
    dist.barrier()
    start = time.perf_counter()
    with placed:
        latent = sample_latents(model, *inputs, settings, progress, map_passes=run.map_passes).float().cpu()
    steps = [b - a for a, b in zip([start, *stamps], stamps)]
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak)
    row = {"layout": str(layout), "placement": "sharded" if run.weights_sharded else placement, "scale": scale.name,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "world_size": dist.get_world_size(), "steps_s": steps,
           "median_step_s": statistics.median(steps[1:] or steps), "peak_gib_per_rank": peaks,
           "video": f"{scale.num_frames} frames, latent {scale.latent_hw}", "torch": torch.__version__}
    if run.is_main and args.scale == "tiny" and not run.weights_sharded and layout.sequence == 1:  # any placement
        with dit_on_device(model, device):  # the same model and inputs in this one process
            alone = sample_latents(model, *inputs, settings).float().cpu()
        row["max_abs_diff_vs_one_process"] = float((latent - alone).abs().max())
    if run.is_main:
        args.out.write_text(json.dumps(row, indent=1))
        print(json.dumps(row), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
