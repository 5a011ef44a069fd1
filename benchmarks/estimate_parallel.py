"""An ESTIMATE (not a measurement) of seconds per sampling step of the 14B model on 1, 2, 4 and 8 GPUs.

Model of one step under ``--parallel cfg=C,ulysses=U`` (ring left out: Ulysses is the cheaper split while the 40
heads divide by U):

    t_step = ceil(P / C) * (t_pass(S) / U + t_a2a(S, U)) + t_gather

    t_pass(S) = FLOPs(S) / R                      one DiT pass on one GPU
    FLOPs(S)  = L * (S * (12 D^2 + 4 D F) + 4 S^2 D + 4 S C_ctx D)
                 (q/k/v/o and the cross-attention q/o: 12 S D^2; FFN: 4 S D F; self-attention QK^T and AV:
                  4 S^2 D; cross-attention over the 769 context tokens: 4 S C_ctx D; the audio branch and the
                  context k/v are below 1%)
    R         = FLOPs(21,504) / t_measured        the rate measured on one H200 at 512x512x81
    t_a2a     = L * 4 * (U - 1) / U^2 * S * D * 2 bytes / B
                 (Ulysses: 4 all-to-alls per block, q, k, v in and the output back; each rank holds S/U tokens and
                  sends (U - 1)/U of them, bf16)
    t_gather  = the cfg all-gather of C velocities of 16 x 21 x h x w float32 (a few MB): ignored

P = 3 guidance passes per step; L = 40 blocks, D = 5120, F = 13,824, C_ctx = 769 (257 CLIP + 512 text tokens).
Measured inputs (docs/benchmarks.md, issue 18, one H200): 1.95 s per bf16 pass eager, 1.54 s compiled.
Assumed: B = 350 GB/s all-to-all bandwidth per GPU (NVLink/NVSwitch class; a PCIe box is about 10x slower), no
overlap of communication and compute, the per-GPU rate R unchanged at S/U tokens (GEMMs of >= 2,688 rows), and
no cost for the sequence split itself. For each GPU count the layout with the lowest estimate is listed.

Memory per GPU comes from the estimate the runtime checks before a run (``runtime/memory.py``, calibrated on the
H100 measurements): for each layout, the GiB one process needs with the whole model on its GPU, with its blocks
streamed (``offload_blocks``), or with ``fsdp`` its weights split over its sequence group (bf16 weights, passes
one after another).

Usage:  python benchmarks/estimate_parallel.py [--bandwidth-gbs 350]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the memory table imports the library

LAYERS, DIM, FFN, CONTEXT, HEADS = 40, 5120, 13824, 769, 40
PASSES = 3
MEASURED_TOKENS = 21_504  # 512x512x81: 21 latent frames x 32 x 32 patches
MEASURED_PASS_S = {"eager": 1.95, "compiled": 1.54}  # one H200, bf16
SIZES = {"512x512x81": 21 * 32 * 32, "720x1280x81": 21 * 45 * 80}


def pass_flops(tokens: int) -> float:
    """FLOPs of one DiT pass at ``tokens`` video tokens (the formula in the module docstring)."""
    per_block = tokens * (12 * DIM**2 + 4 * DIM * FFN) + 4 * tokens**2 * DIM + 4 * tokens * CONTEXT * DIM
    return LAYERS * per_block


def all_to_all_s(tokens: int, ulysses: int, bandwidth: float) -> float:
    """Seconds of Ulysses all-to-all per pass per rank (bf16, 4 per block) at ``bandwidth`` bytes/s."""
    return LAYERS * 4 * (ulysses - 1) / ulysses**2 * tokens * DIM * 2 / bandwidth


def step_s(tokens: int, cfg: int, ulysses: int, pass_s: float, bandwidth: float) -> float:
    """Estimated seconds per step: the busiest cfg group's passes, each on 1/ulysses of the tokens."""
    return math.ceil(PASSES / cfg) * (pass_s / ulysses + all_to_all_s(tokens, ulysses, bandwidth))


def best_layout(gpus: int, tokens: int, pass_s: float, bandwidth: float) -> tuple[float, str]:
    """(seconds per step, layout) of the fastest cfg x ulysses layout on ``gpus`` GPUs."""
    options = [(step_s(tokens, c, gpus // c, pass_s, bandwidth), f"cfg={c},ulysses={gpus // c}")
               for c in range(1, PASSES + 1) if gpus % c == 0 and HEADS % (gpus // c) == 0]
    return min(options)


MEMORY_LAYOUTS = ("cfg=1", "cfg=3", "ulysses=2", "ulysses=4", "ulysses=8", "ulysses=2,fsdp", "ulysses=4,fsdp",
                  "ulysses=8,fsdp", "cfg=2,ulysses=4,fsdp")


def memory_table() -> None:
    """GiB per GPU of each layout in :data:`MEMORY_LAYOUTS` at each size: the runtime's own estimate."""
    import torch

    from fantasytalking_core.model.adapter import AudioAdapter, attach_audio_adapter
    from fantasytalking_core.model.transformer import build_transformer, resolve_config
    from fantasytalking_core.runtime.memory import GIB, estimate_dit_memory
    from fantasytalking_core.runtime.parallel import parse_parallel

    with torch.device("meta"):  # the 14B DiT with the audio adapter's k/v in its blocks, weights without memory
        dit = build_transformer(resolve_config("wan2.1_i2v_14b_720p")).to(torch.bfloat16)
        attach_audio_adapter(dit, AudioAdapter(LAYERS, DIM, 2048).to(torch.bfloat16))
    frames = {"512x512x81": (81, 512, 512), "720x1280x81": (81, 720, 1280)}
    print("| layout | GPUs | " + " | ".join(f"{name} | {name} with offload_blocks" for name in frames) + " |")
    print("|---|---|" + "---|---|" * len(frames))
    for text in MEMORY_LAYOUTS:
        layout = parse_parallel(text)
        cells = []
        for shape in frames.values():
            for placement in ("sharded",) if layout.fsdp else ("resident", "streamed"):
                estimate = estimate_dit_memory(dit, *shape, placement=placement, sequence=layout.sequence)
                cells.append(f"{estimate.total / GIB:.1f}")
            cells += ["-"] if layout.fsdp else []  # fsdp keeps its shards on the GPU: no streaming
        print(f"| {text} | {layout.world_size} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bandwidth-gbs", type=float, default=350.0, help="all-to-all GB/s per GPU")
    args = parser.parse_args()
    bandwidth = args.bandwidth_gbs * 1e9
    rate = {mode: pass_flops(MEASURED_TOKENS) / s for mode, s in MEASURED_PASS_S.items()}
    print(f"FLOPs per pass at {MEASURED_TOKENS} tokens: {pass_flops(MEASURED_TOKENS):.3g}; "
          + ", ".join(f"{mode} rate {r / 1e12:.0f} TFLOP/s" for mode, r in rate.items()))
    print("| size | tokens | FLOPs/pass | mode | 1 GPU | 2 GPUs | 4 GPUs | 8 GPUs |")
    print("|---|---|---|---|---|---|---|---|")
    for name, tokens in SIZES.items():
        for mode in MEASURED_PASS_S:
            pass_s = pass_flops(tokens) / rate[mode]
            cells = []
            for gpus in (1, 2, 4, 8):
                seconds, layout = best_layout(gpus, tokens, pass_s, bandwidth)
                cells.append(f"{seconds:.2f} ({layout})" if gpus > 1 else f"{seconds:.2f}")
            print(f"| {name} | {tokens:,} | {pass_flops(tokens):.2e} | {mode} | " + " | ".join(cells) + " |")
    print()
    memory_table()


if __name__ == "__main__":
    main()
