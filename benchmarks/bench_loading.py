"""Peak resident memory while loading a synthetic ~2 GB DiT checkpoint in each format.

Usage: python benchmarks/bench_loading.py [--size-gb 2] [--workdir /tmp/ft-bench]

For each format a file of about ``--size-gb`` is written (a Wan2.1-I2V-shaped DiT with dim 1536 and as many
blocks as the size needs, random weights), then a fresh Python process loads it with ``load_wan_dit`` and reports
its RSS just before loading (imports done), its peak RSS (VmHWM) right after loading and after touching every
weight (memory-mapped weights become resident only when read). The ratio is (peak - before) / file size, with
every weight touched; the target is at most 1.3.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from fantasytalking_core.model.transformer import build_transformer, resolve_config  # noqa: E402
from model_files import random_wan_state, to_fp8_scaled, wan_keys, write_gguf, write_shards  # noqa: E402

BASE = dict(model_type="i2v", patch_size=[1, 2, 2], text_len=512, in_dim=36, dim=1536, ffn_dim=8960, freq_dim=256,
            text_dim=4096, out_dim=16, num_heads=12, window_size=[-1, -1], qk_norm=True, cross_attn_norm=True, eps=1e-6)

CHILD = r"""
import json, sys, time, torch
from fantasytalking_core.loaders.wan_dit import load_wan_dit

def hwm_kb():  # this process's own peak RSS (VmHWM; ru_maxrss would include the parent's peak across exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

path, config, kw = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
kw = {k: getattr(torch, v) if isinstance(v, str) else v for k, v in kw.items()}
before = hwm_kb()
t = time.perf_counter()
model = load_wan_dit(path, config=config, **kw)
seconds = time.perf_counter() - t
load_peak = hwm_kb()
# weights read lazily from a memory-mapped file only become resident when used: touch every one
for t in list(model.parameters()) + list(model.buffers()):
    t = t.as_tensor() if hasattr(t, "as_tensor") else t  # GGUF parameters: plain view of the stored bytes
    t.detach().reshape(-1)[:: max(1, 4096 // t.element_size())].float().sum()
peak = hwm_kb()
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"before_kb": before, "load_peak_kb": load_peak, "peak_kb": peak, "seconds": seconds, "model_bytes": params}))
"""


def blocks_for(size_bytes: float, bytes_per_param: float) -> int:
    per_block = sum(p.numel() for p in build_transformer(resolve_config({**BASE, "num_layers": 1}), empty=True).blocks.parameters())
    return max(1, round(size_bytes / bytes_per_param / per_block))


def state_for(config: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # cheap random weights: build block by block in the target dtype to keep the writer's memory low
    state = random_wan_state({**config, "num_layers": 1}, seed=0)
    out = {}
    for key in wan_keys(config["num_layers"]):
        template = state[key if not key.startswith("blocks.") else "blocks.0." + key.split(".", 2)[2]]
        out[key] = torch.randn(template.shape, dtype=torch.float32).mul_(0.02).to(dtype)
    return out


def size_of(path: Path) -> int:
    if path.name.endswith(".index.json"):  # a shard set: all its shards
        return sum(f.stat().st_size for f in path.parent.glob("*.safetensors"))
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--workdir", default="/tmp/ft-bench")
    parser.add_argument("--only", nargs="*", help="format names to run")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    size = args.size_gb * 1e9

    formats = {  # name: (bytes per param in file, writer, load kwargs)
        "safetensors bf16 (original Wan keys)": (2, lambda s, p: save_file(s, str(p)), {}),
        "safetensors bf16, ComfyUI prefix": (2, lambda s, p: save_file({"model.diffusion_model." + k: v for k, v in s.items()}, str(p)), {}),
        "7-shard set bf16 (index json)": (2, None, {}),
        "safetensors fp16": (2, lambda s, p: save_file(s, str(p)), {}),
        "safetensors fp32": (4, lambda s, p: save_file(s, str(p)), {}),
        "fp8_e4m3fn, fp8 storage": (1, lambda s, p: save_file(s, str(p)), {"fp8_storage": True}),
        "fp8 scaled, fp8 storage": (1, lambda s, p: save_file(to_fp8_scaled(s), str(p)), {"fp8_storage": True}),
        "fp8 scaled, dequantized to bf16": (1, lambda s, p: save_file(to_fp8_scaled(s), str(p)), {}),
        "torch pickle .pth bf16": (2, lambda s, p: torch.save(s, p), {}),
        "GGUF Q8_0": (1.0625, lambda s, p: write_gguf(s, p), {"compute_dtype": "bfloat16"}),
    }
    dtypes = {"fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float32, "GGUF": torch.float32}
    rows = []
    for name, (bpp, writer, kwargs) in formats.items():
        if args.only and not any(o in name for o in args.only):
            continue
        config = {**BASE, "num_layers": blocks_for(size, bpp)}
        dtype = next((d for k, d in dtypes.items() if k in name), torch.bfloat16)
        state = state_for(config, dtype)
        if "fp8_e4m3fn" in name:
            state = {k: v.to(torch.float8_e4m3fn) if k.startswith("blocks.") and v.ndim == 2 else v.to(torch.bfloat16)
                     for k, v in state.items()}
        suffix = ".gguf" if "GGUF" in name else ".pth" if "pth" in name else ".safetensors"
        folder = work / name.split(" ")[0].replace("/", "_")
        folder.mkdir(exist_ok=True)
        if writer is None:
            path = write_shards(state, folder, 7)
        else:
            path = folder / f"model{suffix}"
            writer(state, path)
        del state
        file_bytes = size_of(path)
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), json.dumps(config), json.dumps(kwargs)],
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            print(f"{name}: FAILED\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        delta = (r["peak_kb"] - r["before_kb"]) * 1024
        rows.append((name, file_bytes / 1e9, r["model_bytes"] / 1e9, r["before_kb"] / 1e6, r["load_peak_kb"] / 1e6,
                     r["peak_kb"] / 1e6, delta / file_bytes, r["seconds"]))
        print("|", " | ".join(f"{v:.2f}" if isinstance(v, float) else v for v in rows[-1]), "|", flush=True)
        shutil.rmtree(folder)
    print("\n| format | file GB | loaded weights GB | RSS before load GB | peak RSS after load GB "
          "| peak RSS, every weight touched, GB | (peak - before) / file | load s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("|", " | ".join(f"{v:.2f}" if isinstance(v, float) else v for v in r), "|")


if __name__ == "__main__":
    main()
