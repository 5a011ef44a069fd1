"""bf16 error of our DiT against float32, relative to the official bf16 run's, per pass.

Fixture: a precision set (default ``tests/fixtures/official_bf16``, see its README): a DiT with the 14B model's
head size (2 heads of 128) on a non-square 16x24 latent, with the official float32 passes and the official bf16
run's relative RMS error against them (``stats.json``). Our bf16 passes are computed from the same bf16 weights
with each precision policy (``fantasytalking_core.model.precision``):

  * ``official``: float32 residual stream, modulation, head, LayerNorms and audio projection (the default),
  * ``diffusers``: diffusers' own ``WanTransformer3DModel.forward`` (residual stream, modulation, head in bf16),

and each is reported as ratio = our relative RMS error vs ``fp32_*`` / the official bf16 error (1.0 = rounds as
much as the official run; the parity bound is 1.2). Passes: u (negative prompt, no audio), p (positive, no
audio), pa (positive, audio), guided = u + cfg (p - u) + audio_cfg (pa - p), audio_term = pa - p.

Usage:  python benchmarks/bench_bf16_error.py [--set DIR] [--device cuda] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fantasytalking_core.model.precision import PRECISION_POLICIES  # noqa: E402
from fantasytalking_core.model.transformer import FantasyTalkingModel  # noqa: E402
from fantasytalking_core.parity import (BF16_RATIO_LIMIT, BF16_STATS_KEY, load_precision_set_model,  # noqa: E402
                                        precision_set_passes, reference_passes, rel_rms)

DEFAULT_SET = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "official_bf16"


def measure(root: Path, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Rows of relative RMS errors against float32 (official bf16, ours per policy) and ratios ours / official, each
    {pass: value}. ``device``: where our bf16 passes run (the references are CPU numbers)."""
    stats = json.loads((root / "stats.json").read_text())
    inputs = {k: v.to(device) for k, v in load_file(root / "inputs.safetensors").items()}
    ref = reference_passes(load_file(root / "outputs.safetensors", device=device))
    official = stats[BF16_STATS_KEY]
    model = load_precision_set_model(root, torch.bfloat16).to(device)
    table: dict[str, dict[str, float]] = {"official bf16 rel RMS": dict(official)}
    for policy in PRECISION_POLICIES:
        ours = precision_set_passes(FantasyTalkingModel(model.transformer, model.audio_proj, policy), inputs, stats)
        table[f"ours ({policy}) rel RMS"] = {k: rel_rms(ours[k], ref[k]) for k in official}
        table[f"ratio ({policy})"] = {k: table[f"ours ({policy}) rel RMS"][k] / official[k] for k in official}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", type=Path, default=DEFAULT_SET, help="precision set directory")
    parser.add_argument("--device", default="cpu", help="where our passes run (cpu, cuda)")
    parser.add_argument("--json", action="store_true", help="print the table as one JSON object")
    args = parser.parse_args()
    table = measure(args.set, args.device)
    if args.json:
        print(json.dumps(table))
        return
    names = list(next(iter(table.values())))
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"set: {args.set}  torch {torch.__version__}  {where}  bound: ratio <= {BF16_RATIO_LIMIT}")
    print("| row | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for row, values in table.items():
        fmt = "{:.2f}" if row.startswith("ratio") else "{:.2e}"
        print(f"| {row} | " + " | ".join(fmt.format(values[n]) for n in names) + " |")


if __name__ == "__main__":
    main()
