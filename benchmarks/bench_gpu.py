"""GPU speed and memory of the full-size FantasyTalking DiT (Wan2.1-I2V-14B 720P config + audio adapter, P = 2048).

The model is built with random weights straight on the GPU in bf16 (meta device, ``to_empty``, N(0, 0.02)): no
weight file is read. Inputs are a 512x512, 81-frame clip (latent [1, 16, 21, 64, 64]) with ~3.5 s of wav2vec2
tokens cut into per-frame windows by the library's own helpers, so the real code path runs. Sections, in order:

  environment, build, inputs
  a. dit_pass                    one DiT pass (audio on), bf16, default SDPA
     guidance_step_sequential    one sampling step: the three guidance passes one after another
     guidance_step_batched       the same three passes as one batch (``guided_velocity(batch_passes=True)``)
  b. attention_backends          the pass with FLASH / EFFICIENT / CUDNN preferred (``sdpa_kernel``)
     attention_dispatch          the pass on each installed library of ``--attention`` (xformers, flash, sage):
                                 time and error against SDPA
  c. fp8_matmul                  14B-shaped linears: bf16 vs ``torch._scaled_mm`` fp8 (per-tensor scales) vs the
                                 loader's ``FP8Linear`` (fp8 storage, bf16 compute): TFLOP/s and error
     dit_pass_fp8_storage        the pass with the block Linear weights stored in fp8 (``enable_fp8_storage``)
     dit_pass_fp8_matmul         the same weights computed with real fp8 matmuls (``runtime.fp8.fp8_matmuls``)
  f. dit_pass_720p               a 720x1280x81 pass (latent 90x160) with the fastest backend of (b)
  d. compiled_blocks             regional ``torch.compile`` of every block (``runtime.compile.compiled_blocks``):
                                 compile time, s per pass
     compiled_new_windows        compiled blocks meeting other audio window lengths: the second compile's cost
     compiled_step               one sampling step (3 passes) with compiled blocks
     fast_step                   one step with fp8 weights, fp8 matmuls and compiled blocks, and its error
     fast_step_batched           the same step with its three passes as one batch
     fast_step_cache_hit         the same step when the first-block cache hits for every pass
  e. streamed_fast_step          fp8 weights streamed from CPU memory block by block, fp8 matmuls, compiled blocks
  e. group_offload               diffusers' block-level group offloading (weights on the CPU, streamed)
  g. memory_budget               the placement ``--gpu-memory`` picks for 24, 12 and 8 GB cards at 512x512 and
                                 720x1280 (fp8 weights), one pass each with the process capped at the budget

``--precision`` picks how bf16 rounds (``fantasytalking_core.model.precision``): ``official`` (default, what the library
runs: float32 residual stream, modulation and head) or ``diffusers`` (``WanTransformer3DModel.forward`` as it is).
Under either policy the blocks are called as modules, so compiled blocks and offloading hooks apply to both.

Each timing is 1 warm-up + N timed runs (CUDA events), with the peak of ``torch.cuda.max_memory_allocated`` reset
per section. Every section is isolated (an error is recorded and the next one runs), results are printed as they
come and the JSON at ``--out`` is rewritten after each section; sections are skipped when the time budget
(``--budget-s``) runs low, and a watchdog ends the run shortly after it.

On one GPU (H100 80 GB), from the repository root; the package need not be installed, but diffusers (>= 0.41),
transformers, accelerate and safetensors must import (about 4 to 6 minutes with the default budget of 480 s):
    PYTHONPATH=. python3 benchmarks/bench_gpu.py --out bench_gpu.json
Check it anywhere with the tiny bundled config (every section; CPU is fine), or measure on a CPU at the mid size:
    PYTHONPATH=. python3 benchmarks/bench_gpu.py --tiny --out /tmp/gpu_tiny.json
    PYTHONPATH=. python3 benchmarks/bench_gpu.py --mid --sections guidance_step_sequential,guidance_step_batched
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

try:
    import resource  # peak host memory; not on Windows
except ImportError:
    resource = None

import diffusers
import torch
import torch.nn.functional as F
from diffusers.hooks import apply_group_offloading
from torch import nn
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel

from fantasytalking_core.audio.rules import crop_samples_for_frames, wav2vec2_num_tokens
from fantasytalking_core.audio.windows import (
    audio_windows_for_frames,
    gather_audio_windows,
    latent_frame_count,
)
from fantasytalking_core.loaders.keys import fp32_names
from fantasytalking_core.loaders.wan_dit import (
    FP8Linear,
    _target_dtype,
    enable_fp8_storage,
)
from fantasytalking_core.model.adapter import (
    TEXT_LEN,
    WAV2VEC2_DIM,
    AudioConditioning,
    AudioAdapter,
    attach_audio_adapter,
)
from fantasytalking_core.model.precision import OFFICIAL, PRECISION_POLICIES
from fantasytalking_core.model.transformer import (
    IMAGE_TOKENS,
    FantasyTalkingModel,
    build_transformer,
    resolve_config,
)
from fantasytalking_core.errors import SettingsError
from fantasytalking_core.runtime.attention import ATTENTION_BACKENDS, check_attention, using_attention
from fantasytalking_core.runtime.compile import compiled_blocks
from fantasytalking_core.runtime.fp8 import fp8_matmuls
from fantasytalking_core.runtime.memory import (
    InsufficientMemoryError,
    choose_placement,
    estimate_dit_memory,
    use_expandable_segments,
)
from fantasytalking_core.runtime.placement import PLACEMENTS, dit_on_device, streamed_blocks
from fantasytalking_core.sampling.euler import DiTConditions, guided_velocity
from fantasytalking_core.sampling.guidance import GuidanceConfig, passes_for_step
from fantasytalking_core.sampling.schedule import flow_match_sigmas, sigmas_to_timesteps
from fantasytalking_core.sampling.step_cache import FIRST_STEPS, MAX_THRESHOLD, StepCache
from fantasytalking_core.tiny import tiny_configs
from harness import GIB, Report, allocated_gib, free_memory, log, measure, start_watchdog, synchronize

DTYPE = torch.bfloat16
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
INIT_STD = 0.02
STEPS = 30  # the official step count; a video costs STEPS sampling steps
TEXT_POS_TOKENS = 24  # umT5 rows of a short prompt; the DiT sees them zero-padded to 512 either way
TEXT_NEG_TOKENS = 126  # about the default negative prompt's length
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
WATCHDOG_GRACE_S = 20.0


class SectionSkippedError(Exception):
    """A section that cannot run (what it needs was not built): recorded as skipped, not as an error."""


class SectionTimeoutError(Exception):
    """Raised by the alarm when a section outlives its cap."""


# ====================================================================================================================
# Sizes
# ====================================================================================================================


@dataclass(frozen=True)
class Scale:
    """Model and input sizes of one run.

    Attributes:
        dit_config: ``WanTransformer3DModel`` config (diffusers terms).
        audio_dim, proj_dim: wav2vec2 width and audio adapter width.
        num_frames: video frames (4n+1); latent_hw / large_latent_hw: latent height and width of the main and the
            720p-like input.
        time_factor: scales the full-size time estimates that decide whether a section still fits the budget.
    """

    name: str
    dit_config: dict[str, Any]
    audio_dim: int
    proj_dim: int
    num_frames: int
    latent_hw: tuple[int, int]
    large_latent_hw: tuple[int, int]
    time_factor: float

    @property
    def dim(self) -> int:
        return self.dit_config["num_attention_heads"] * self.dit_config["attention_head_dim"]

    def video_tokens(self, latent_hw: tuple[int, int], batch: int = 1) -> int:
        """DiT sequence length: latent frames times patches per frame."""
        _, p_h, p_w = self.dit_config["patch_size"]
        return batch * latent_frame_count(self.num_frames) * (latent_hw[0] // p_h) * (latent_hw[1] // p_w)

    def matmul_shapes(self) -> tuple[tuple[int, int, int], ...]:
        """(tokens, in, out) of the block linears that dominate: FFN up-projection and an attention projection."""
        tokens = self.video_tokens(self.latent_hw)
        return (tokens, self.dim, self.dit_config["ffn_dim"]), (tokens, self.dim, self.dim)


def full_scale() -> Scale:
    """Wan2.1-I2V-14B (bundled 720P config) with the released adapter width, 512x512x81 and 720x1280x81."""
    return Scale(
        "wan2.1_i2v_14b_720p", resolve_config("wan2.1_i2v_14b_720p"), WAV2VEC2_DIM, 2048, 81, (64, 64), (90, 160), 1.0
    )


def mid_scale() -> Scale:
    """Wan2.1-I2V-14B's block layout shrunk to run on a CPU in seconds: 12 blocks of 4 heads x 128 (dim 512, FFN
    2048), the real text, CLIP and audio widths, 21 frames of 128x128 (384 video tokens)."""
    config = resolve_config("wan2.1_i2v_14b_720p")
    config.update(num_attention_heads=4, num_layers=12, ffn_dim=2048, added_kv_proj_dim=512)
    return Scale("mid", config, WAV2VEC2_DIM, 256, 21, (16, 16), (24, 40), 0.0)


def tiny_scale() -> Scale:
    """The bundled tiny configs (``configs/tiny``) and small inputs: every section in seconds, on a CPU too."""
    configs = tiny_configs()
    return Scale(
        "tiny", resolve_config(configs["dit"]), configs["wav2vec2"]["hidden_size"], 32, 9, (16, 16), (24, 40), 0.0
    )


def audio_token_count(num_frames: int) -> int:
    """wav2vec2 tokens of the audio the official crop keeps for ``num_frames`` (about 50 per second)."""
    return wav2vec2_num_tokens(crop_samples_for_frames(num_frames))


def pass_flops(scale: Scale, latent_hw: tuple[int, int], audio_window: int, batch: int = 1) -> float:
    """Matrix FLOPs of one DiT forward (block linears and attention; embeddings and head left out)."""
    cfg, dim = scale.dit_config, scale.dim
    tokens = scale.video_tokens(latent_hw)
    linear_macs = 6 * dim * dim + 2 * dim * cfg["ffn_dim"]  # self q,k,v,o + cross q,o + FFN, per video token
    attention_macs = 2 * dim * (tokens + TEXT_LEN + IMAGE_TOKENS + audio_window)  # QK^T and PV, per video token
    return 2.0 * batch * cfg["num_layers"] * tokens * (linear_macs + attention_macs)


# ====================================================================================================================
# Model with random weights
# ====================================================================================================================


def set_param_dtypes_(model: FantasyTalkingModel, dtype: torch.dtype) -> None:
    """Give every (meta) parameter the dtype the loader gives it: ``dtype``, with diffusers' fp32 modules in fp32."""
    keep_fp32 = {f"transformer.{name}" for name in fp32_names(model.transformer)}
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if name in keep_fp32 else dtype)


def materialize_(module: nn.Module, device: torch.device) -> None:
    """Allocate every parameter on ``device`` uninitialised (``to_empty``), keeping the real buffers' values."""
    buffers = {name: buf for name, buf in module.named_buffers() if not buf.is_meta}
    module.to_empty(device=device)
    for name, value in buffers.items():
        module.get_buffer(name).copy_(value)


@torch.no_grad()
def init_random_(module: nn.Module, std: float = INIT_STD) -> None:
    """Random weights in place: norm scales 1 and shifts 0, every other parameter N(0, std)."""
    for sub in module.modules():
        is_norm = "norm" in type(sub).__name__.lower()
        for name, param in sub.named_parameters(recurse=False):
            if is_norm:
                param.fill_(1.0 if name == "weight" else 0.0)
            else:
                param.normal_(0.0, std)


def build_random_model(scale: Scale, device: torch.device, dtype: torch.dtype = DTYPE,
                       precision: str = OFFICIAL) -> FantasyTalkingModel:
    """The DiT with the audio adapter attached, random weights allocated directly on ``device``."""
    transformer = build_transformer(scale.dit_config, empty=True)  # parameters on meta, RoPE tables real
    with torch.device("meta"):
        adapter = AudioAdapter(len(transformer.blocks), transformer.config.num_attention_heads
                               * transformer.config.attention_head_dim, scale.proj_dim, scale.audio_dim)
    attach_audio_adapter(transformer, adapter)
    model = FantasyTalkingModel(transformer, adapter.proj, precision)
    set_param_dtypes_(model, dtype)
    materialize_(model, device)
    init_random_(model)
    return model.eval().requires_grad_(False)


# ====================================================================================================================
# Inputs
# ====================================================================================================================


@dataclass
class Inputs:
    """One DiT call's inputs, as the pipeline makes them (``generate_latents``)."""

    latents: torch.Tensor  # [1, 16, T, h, w] float32 z_t
    image_latents: torch.Tensor  # [1, 20, T, h, w] y
    timestep: torch.Tensor  # [1]
    text_pos: torch.Tensor  # [1, L, text_dim] (padded to 512 inside the model)
    text_neg: torch.Tensor
    image_tokens: torch.Tensor  # [1, 257, clip_dim]
    audio: AudioConditioning
    conditions: DiTConditions


def make_inputs(
    model: FantasyTalkingModel, scale: Scale, latent_hw: tuple[int, int], device: torch.device, seed: int = 0
) -> Inputs:
    """Random conditioning of the right shapes; the audio goes through ``project_audio`` and the window helpers."""
    gen = torch.Generator("cpu").manual_seed(seed)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    cfg = scale.dit_config
    frames = latent_frame_count(scale.num_frames)
    features = randn(1, audio_token_count(scale.num_frames), scale.audio_dim)  # wav2vec2 last hidden state
    windows = audio_windows_for_frames(features.shape[1], scale.num_frames)
    audio_tokens = gather_audio_windows(model.project_audio(features), windows)  # [1, F, W, P]
    k_lens = windows.k_lens_tensor().to(device)
    text_pos = randn(1, TEXT_POS_TOKENS, cfg["text_dim"], dtype=DTYPE)
    text_neg = randn(1, TEXT_NEG_TOKENS, cfg["text_dim"], dtype=DTYPE)
    image_tokens = randn(1, IMAGE_TOKENS, cfg["image_dim"], dtype=DTYPE)
    image_latents = randn(1, cfg["in_channels"] - cfg["out_channels"], frames, *latent_hw, dtype=DTYPE)
    return Inputs(
        latents=randn(1, cfg["out_channels"], frames, *latent_hw),
        image_latents=image_latents,
        timestep=sigmas_to_timesteps(flow_match_sigmas(STEPS)[:1]).to(device),
        text_pos=text_pos,
        text_neg=text_neg,
        image_tokens=image_tokens,
        audio=AudioConditioning(audio_tokens, k_lens, 1.0),
        conditions=DiTConditions(text_pos, text_neg, image_tokens, image_latents, audio_tokens, k_lens, 1.0),
    )


def dit_pass(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """One forward with the audio branch on (the positive+audio guidance pass)."""
    return model(
        inputs.latents, inputs.timestep, inputs.text_pos, inputs.image_tokens, inputs.image_latents, inputs.audio
    )


# ====================================================================================================================
# Timing
# ====================================================================================================================


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`SectionTimeoutError` in the main thread after ``seconds`` (SIGALRM; a no-op where unavailable)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable or seconds <= 0:
        yield
        return

    def on_alarm(_signum: int, _frame: object) -> None:
        raise SectionTimeoutError(f"section cap of {seconds:.0f} s reached")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def is_timeout(exc: BaseException | None) -> bool:
    """Whether the section's alarm caused ``exc`` (torch.compile wraps exceptions raised inside it)."""
    while exc is not None:
        if isinstance(exc, SectionTimeoutError) or "SectionTimeoutError" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def describe_error(exc: BaseException) -> dict[str, Any]:
    tail = traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:]
    return {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": "".join(tail)[-3000:]}


def guarded(fn: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Run one sub-measurement; an error becomes a recorded result instead of ending the section."""
    try:
        return {"status": "ok", **fn()}
    except SectionSkippedError as exc:
        return {"status": f"skipped: {exc}"}
    except Exception as exc:  # every failure is a result here
        if is_timeout(exc):
            raise
        free_memory(device)
        return {"status": "error", **describe_error(exc)}


# ====================================================================================================================
# Run state, report
# ====================================================================================================================


@dataclass
class Context:
    """What the sections share: settings, the model once built, the inputs, earlier results and the clock."""

    args: argparse.Namespace
    scale: Scale
    device: torch.device
    deadline: float
    model: FantasyTalkingModel | None = None
    inputs: Inputs | None = None
    results: dict[str, Any] = field(default_factory=dict)
    deferred: list[Callable[[], None]] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def need_model(self) -> tuple[FantasyTalkingModel, Inputs]:
        if self.model is None or self.inputs is None:
            raise SectionSkippedError("the model or its inputs were not built")
        return self.model, self.inputs

    def time(self, fn: Callable[[], Any], repeats: int | None = None, warmup: int | None = None) -> dict[str, Any]:
        warmup = self.args.warmup if warmup is None else warmup
        return measure(fn, self.device, warmup, self.args.repeats if repeats is None else repeats)[0]

    def defer(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` after the section, outside its time cap (restoring the model for the next sections)."""
        self.deferred.append(fn)

    def run_deferred(self) -> list[dict[str, Any]]:
        errors = []
        while self.deferred:
            try:
                self.deferred.pop()()
            except Exception as exc:  # noqa: BLE001 - a failed restore is recorded, later sections still run
                errors.append(describe_error(exc))
        return errors


# ====================================================================================================================
# Sections
# ====================================================================================================================


def section_environment(ctx: Context) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": str(ctx.device),
        "scale": ctx.scale.name,
        "cuda": torch.version.cuda,
    }
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        env.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            total_gib=props.total_memory / GIB,
            cudnn=torch.backends.cudnn.version(),
        )
    return env


def section_build(ctx: Context) -> dict[str, Any]:
    start = time.perf_counter()
    ctx.model = build_random_model(ctx.scale, ctx.device, precision=ctx.args.precision)
    synchronize(ctx.device)
    params = list(ctx.model.parameters())
    return {
        "seconds": time.perf_counter() - start,
        "parameters": sum(p.numel() for p in params),
        "weight_gib": sum(p.numel() * p.element_size() for p in params) / GIB,
        "fp32_parameters": sum(p.numel() for p in params if p.dtype == torch.float32),
        "allocated_gib": allocated_gib(ctx.device),
    }


def section_inputs(ctx: Context) -> dict[str, Any]:
    if ctx.model is None:
        raise SectionSkippedError("the model was not built")
    ctx.inputs = make_inputs(ctx.model, ctx.scale, ctx.scale.latent_hw, ctx.device, ctx.args.seed)
    audio = ctx.inputs.audio
    return {
        "latents": list(ctx.inputs.latents.shape),
        "image_latents": list(ctx.inputs.image_latents.shape),
        "text_pos": list(ctx.inputs.text_pos.shape),
        "image_tokens": list(ctx.inputs.image_tokens.shape),
        "audio_tokens": audio_token_count(ctx.scale.num_frames),
        "audio_windows": list(audio.windows.shape),
        "k_lens": audio.k_lens.tolist(),
        "video_tokens": ctx.scale.video_tokens(ctx.scale.latent_hw),
    }


DENSE_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16 peak of the GPUs measured so far (NVIDIA's data sheets, SXM parts), for the model FLOP utilisation."""


def with_throughput(result: dict[str, Any], flops: float, tokens: int) -> dict[str, Any]:
    """Add the estimated matrix FLOPs, the rate they were done at, the video tokens per second (``tokens``: those
    of the timed call, every pass of it) and, on a GPU of :data:`DENSE_BF16_TFLOPS`, the model FLOP utilisation."""
    tflops = flops / result["median_s"] / 1e12
    out = {**result, "est_tflop": flops / 1e12, "tflops": tflops, "tokens_per_s": tokens / result["median_s"]}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((tf for gpu, tf in DENSE_BF16_TFLOPS.items() if gpu in name), None)
        if peak is not None:
            out["mfu"] = tflops / peak
    return out


def main_tokens(ctx: Context, batch: int = 1) -> int:
    """Video tokens of ``batch`` passes at the main size."""
    return ctx.scale.video_tokens(ctx.scale.latent_hw, batch)


def main_pass_flops(ctx: Context, batch: int = 1) -> float:
    _, inputs = ctx.need_model()
    return pass_flops(ctx.scale, ctx.scale.latent_hw, inputs.audio.windows.shape[2], batch)


def section_dit_pass(ctx: Context) -> dict[str, Any]:
    model, inputs = ctx.need_model()
    return with_throughput(ctx.time(lambda: dit_pass(model, inputs)), main_pass_flops(ctx), main_tokens(ctx))


def guidance_step(ctx: Context, batch_passes: bool) -> dict[str, Any]:
    """One sampling step with cfg and audio cfg (the three passes of step 0) via the library's guided velocity."""
    model, inputs = ctx.need_model()
    guidance = GuidanceConfig()
    velocity = guided_velocity(model, inputs.conditions, guidance, STEPS, batch_passes=batch_passes)
    sigma = flow_match_sigmas(STEPS)[0]
    passes = len(passes_for_step(0, STEPS, guidance))
    result = ctx.time(lambda: velocity(inputs.latents, 0, sigma))
    return {
        **with_throughput(result, main_pass_flops(ctx, passes), main_tokens(ctx, passes)),
        "passes": passes,
        f"est_{STEPS}_steps_s": STEPS * result["median_s"],
    }


def section_guidance_sequential(ctx: Context) -> dict[str, Any]:
    return guidance_step(ctx, batch_passes=False)


def section_guidance_batched(ctx: Context) -> dict[str, Any]:
    return guidance_step(ctx, batch_passes=True)


def prefer_backend(name: str) -> AbstractContextManager[None]:
    """SDPA with backend ``name`` first; calls it cannot take fall back to memory-efficient attention, then math."""
    order = [getattr(SDPBackend, n) for n in dict.fromkeys((name, "EFFICIENT_ATTENTION", "MATH"))]
    return sdpa_kernel(order, set_priority=True)


def probe_backend(ctx: Context, name: str) -> dict[str, str]:
    """Whether backend ``name`` alone runs the self-attention shape and the audio-attention shape."""
    _, inputs = ctx.need_model()
    cfg = ctx.scale.dit_config
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    tokens = ctx.scale.video_tokens(ctx.scale.latent_hw)
    frames, width = inputs.audio.windows.shape[1:3]

    def qkv(batch: int, q_len: int, k_len: int) -> list[torch.Tensor]:
        shapes = ((batch, heads, q_len, head_dim), (batch, heads, k_len, head_dim), (batch, heads, k_len, head_dim))
        return [torch.randn(s, device=ctx.device, dtype=DTYPE) for s in shapes]

    cases = {
        "self_attention": qkv(1, tokens, tokens),
        "audio_window": qkv(frames, tokens // frames, width),  # a run of full windows, unmasked
    }
    found = {}
    for case, tensors in cases.items():
        try:
            with sdpa_kernel([getattr(SDPBackend, name)]):
                F.scaled_dot_product_attention(*tensors)
            synchronize(ctx.device)
            found[case] = "ok"
        except Exception as exc:  # noqa: BLE001 - "cannot run" is the answer here
            found[case] = f"{type(exc).__name__}: {str(exc)[:300]}"
        del tensors
    free_memory(ctx.device)
    return found


def backend_pass(ctx: Context, name: str) -> dict[str, Any]:
    model, inputs = ctx.need_model()
    probe = probe_backend(ctx, name)
    with prefer_backend(name):
        result = with_throughput(ctx.time(lambda: dit_pass(model, inputs)), main_pass_flops(ctx), main_tokens(ctx))
    return {**result, "strict_probe": probe, "used_for_self_attention": probe["self_attention"] == "ok"}


def best_backend(backends: dict[str, Any], default: dict[str, Any] | None) -> str:
    """The fastest backend that really ran the self-attention; "default" when none beat plain SDPA."""
    times = {n: r["median_s"] for n, r in backends.items() if r.get("status") == "ok" and r["used_for_self_attention"]}
    if default and default.get("status") == "ok":
        times["default"] = default["median_s"]
    return min(times, key=times.get) if times else "default"


def section_attention_backends(ctx: Context) -> dict[str, Any]:
    ctx.need_model()
    found: dict[str, Any] = {}
    for name in SDPA_BACKENDS:
        found[name] = guarded(lambda name=name: backend_pass(ctx, name), ctx.device)
    return {**found, "best": best_backend(found, ctx.results.get("dit_pass"))}


def section_attention_dispatch(ctx: Context) -> dict[str, Any]:
    """The ``--attention`` option: a pass on each fused library diffusers' dispatcher can use here (self-, text,
    image and audio attention all go through it), its time and its output's relative error against the pass on
    PyTorch's SDPA (the default). A library that is not installed is recorded as such."""
    model, inputs = ctx.need_model()
    reference = dit_pass(model, inputs).float()
    found: dict[str, Any] = {}
    for name in ATTENTION_BACKENDS:
        if name == "sdpa":
            continue
        try:
            check_attention(name, ctx.device)  # installed and able to run here
        except SettingsError as exc:
            found[name] = {"status": f"skipped: {exc}"}
            continue

        def run(name: str = name) -> dict[str, Any]:
            with using_attention(name):
                result = ctx.time(lambda: dit_pass(model, inputs))
                error = relative_error(dit_pass(model, inputs), reference)
            return {**with_throughput(result, main_pass_flops(ctx), main_tokens(ctx)), "rel_error_vs_sdpa": error}

        found[name] = guarded(run, ctx.device)
    return found


def quantize_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor fp8: (t / scale as e4m3, float32 scalar scale) with amax mapped to the largest e4m3 value."""
    scale = (t.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
    return (t.float() / scale).to(FP8), scale


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def fp8_linear_module(w8: torch.Tensor, scale: torch.Tensor) -> nn.Module:
    """The loader's fp8-storage Linear (``enable_fp8_storage``) around an fp8 weight and its scale."""
    holder = nn.Sequential(nn.Linear(w8.shape[1], w8.shape[0], bias=False, device="meta"))
    holder[0].weight = nn.Parameter(w8, requires_grad=False)
    enable_fp8_storage(holder, {"0.weight": scale})
    assert isinstance(holder[0], FP8Linear)
    return holder


def fp8_matmul_case(ctx: Context, tokens: int, k: int, n: int) -> dict[str, Any]:
    """bf16 linear vs fp8 ``_scaled_mm`` (pre-quantized, and with the activation quantized per call) vs FP8Linear."""
    gen = torch.Generator("cpu").manual_seed(2)
    x = torch.randn(tokens, k, generator=gen).to(ctx.device, DTYPE)
    w = (torch.randn(n, k, generator=gen) * INIT_STD).to(ctx.device, DTYPE)
    ref = x.float() @ w.float().t()
    x8, x_scale = quantize_fp8(x)
    w8, w_scale = quantize_fp8(w)
    flops = 2.0 * tokens * k * n

    def scaled_mm(a8: torch.Tensor, a_scale: torch.Tensor, fast: bool = False) -> torch.Tensor:
        return torch._scaled_mm(a8, w8.t(), scale_a=a_scale, scale_b=w_scale, out_dtype=DTYPE, use_fast_accum=fast)

    fp8_linear = fp8_linear_module(w8, w_scale)
    variants: dict[str, Callable[[], torch.Tensor]] = {
        "bf16_linear": lambda: F.linear(x, w),
        "fp8_scaled_mm": lambda: scaled_mm(x8, x_scale),
        "fp8_scaled_mm_fast_accum": lambda: scaled_mm(x8, x_scale, fast=True),
        "fp8_scaled_mm_quantize_x": lambda: scaled_mm(*quantize_fp8(x)),
        "fp8_storage_FP8Linear": lambda: fp8_linear(x),
    }
    repeats = max(10, ctx.args.repeats)
    found = {}
    for name, fn in variants.items():

        def run(fn: Callable[[], torch.Tensor] = fn) -> dict[str, Any]:
            result = ctx.time(fn, repeats=repeats, warmup=3)
            error = relative_error(fn(), ref)
            return {**result, "tflops": flops / result["median_s"] / 1e12, "rel_error_vs_fp32": error}

        found[name] = guarded(run, ctx.device)
    return found


def section_fp8_matmul(ctx: Context) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for tokens, k, n in ctx.scale.matmul_shapes():
        found[f"{tokens}x{k}->{n}"] = guarded(lambda t=tokens, k=k, n=n: fp8_matmul_case(ctx, t, k, n), ctx.device)
        free_memory(ctx.device)
    return found


def fp8_weight_names(transformer: nn.Module) -> list[str]:
    """Linear modules whose weight the loader stores in fp8 with ``fp8_storage`` (the DiT's block linears; the
    audio adapter's k/v projections are attached after loading and stay in the compute dtype)."""
    keep_fp32 = fp32_names(transformer)
    names = []
    for name, module in transformer.named_modules():
        if type(module) is not nn.Linear or ".processor." in name:
            continue
        weight = module.weight
        target = _target_dtype(
            f"{name}.weight",
            tuple(weight.shape),
            weight.dtype,
            dtype=None,
            store_fp8=True,
            compute_dtype=DTYPE,
            keep_fp32=keep_fp32,
        )
        if target == FP8:
            names.append(name)
    return names


@torch.no_grad()
def store_linears_fp8_(transformer: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Quantize the named Linear weights to per-tensor-scaled fp8 in place, one at a time; returns their scales."""
    scales = {}
    for name in names:
        module = transformer.get_submodule(name)
        w8, scales[f"{name}.weight"] = quantize_fp8(module.weight)
        module.weight = nn.Parameter(w8, requires_grad=False)
    return scales


@torch.no_grad()
def restore_linears_(transformer: nn.Module, scales: dict[str, torch.Tensor], dtype: torch.dtype = DTYPE) -> int:
    """Undo fp8 storage: every fp8 weight back to ``dtype`` (times its scale), FP8Linear back to nn.Linear."""
    restored = 0
    for name, module in list(transformer.named_modules()):
        if not isinstance(module, nn.Linear) or module.weight.dtype != FP8:
            continue
        scale = module.scale_weight if isinstance(module, FP8Linear) else scales.get(f"{name}.weight", 1.0)
        weight = nn.Parameter((module.weight.float() * scale).to(dtype), requires_grad=False)
        if isinstance(module, FP8Linear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            plain.weight, plain.bias = weight, module.bias
            parent, _, child = name.rpartition(".")
            setattr(transformer.get_submodule(parent), child, plain)
        else:
            module.weight = weight
        restored += 1
    return restored


def fp8_storage_(ctx: Context) -> tuple[int, float | None]:
    """Store the block Linear weights in per-tensor-scaled fp8 (as an fp8-scaled file loads with ``fp8_storage``),
    restored to bf16 after the section. Returns (fp8 layers, GiB allocated before)."""
    model, _ = ctx.need_model()
    transformer = model.transformer
    names = fp8_weight_names(transformer)
    scales: dict[str, torch.Tensor] = {}
    ctx.defer(lambda: restore_linears_(transformer, scales))
    before = allocated_gib(ctx.device)
    scales.update(store_linears_fp8_(transformer, names))
    enable_fp8_storage(transformer, scales)
    free_memory(ctx.device)
    return len(names), before


def section_dit_pass_fp8_storage(ctx: Context) -> dict[str, Any]:
    model, inputs = ctx.need_model()
    layers, before = fp8_storage_(ctx)
    result = with_throughput(ctx.time(lambda: dit_pass(model, inputs)), main_pass_flops(ctx), main_tokens(ctx))
    return {**result, "fp8_linears": layers, "resident_gib_bf16": before}


def enter_(ctx: Context, manager: AbstractContextManager[Any]) -> Any:
    """Enter ``manager`` for the rest of the section (left by the deferred restore, also on error)."""
    stack = ExitStack()
    ctx.defer(stack.close)
    return stack.enter_context(manager)


def section_dit_pass_fp8_matmul(ctx: Context) -> dict[str, Any]:
    """fp8 storage computed with real fp8 matmuls (``runtime.fp8.fp8_matmuls``: row-wise activation scales on
    Hopper), and the pass's relative error against the same fp8 weights upcast to bf16."""
    model, inputs = ctx.need_model()
    layers, _ = fp8_storage_(ctx)
    upcast = dit_pass(model, inputs).float()
    scaling = enter_(ctx, fp8_matmuls(model, ctx.device))
    result = with_throughput(ctx.time(lambda: dit_pass(model, inputs)), main_pass_flops(ctx), main_tokens(ctx))
    error = relative_error(dit_pass(model, inputs).float(), upcast)
    return {**result, "fp8_linears": layers, "scaling": scaling, "rel_error_vs_upcast": error}


def dynamo_stats() -> dict[str, Any]:
    return {
        "stats": dict(counters["stats"]),
        "graph_breaks": sum(counters["graph_break"].values()),
        "recompile_limit": getattr(torch._dynamo.config, "recompile_limit", None),
    }


def section_compiled_blocks(ctx: Context) -> dict[str, Any]:
    """Regional compilation through the library (``runtime.compile.compiled_blocks``); the first (warm-up) pass
    compiles, so ``warmup_s`` is compile time plus one pass."""
    model, inputs = ctx.need_model()
    torch._dynamo.reset()
    counters.clear()
    ctx.defer(torch._dynamo.reset)
    enter_(ctx, compiled_blocks(model.transformer))
    result = with_throughput(ctx.time(lambda: dit_pass(model, inputs)), main_pass_flops(ctx), main_tokens(ctx))
    return {
        **result,
        "compile_s_est": result["warmup_s"] - ctx.args.warmup * result["median_s"],
        "dynamo": dynamo_stats(),
    }


def section_compiled_new_windows(ctx: Context) -> dict[str, Any]:
    """What compiled blocks pay for a clip whose audio windows have other valid lengths (a long recording's last
    segment, whose audio runs out): the lengths are constants of the graph, so its first pass compiles again.
    ``recompile_s_est``: that first pass minus a warm one."""
    model, inputs = ctx.need_model()
    torch._dynamo.reset()
    counters.clear()
    ctx.defer(torch._dynamo.reset)
    enter_(ctx, compiled_blocks(model.transformer))
    first = ctx.time(lambda: dit_pass(model, inputs))
    graphs = counters["stats"]["unique_graphs"]
    k_lens = inputs.audio.k_lens.clone()
    k_lens[-3:] = (k_lens[-3:] // 2).clamp(min=1)  # the recording ends inside the last three windows
    other = replace(inputs, audio=replace(inputs.audio, k_lens=k_lens))
    again = ctx.time(lambda: dit_pass(model, other), warmup=0, repeats=1)
    warm = ctx.time(lambda: dit_pass(model, other), warmup=0)
    return {"first_windows": first, "other_windows_first_pass": again, "other_windows_warm": warm,
            "recompile_s_est": again["median_s"] - warm["median_s"],
            "new_graphs": counters["stats"]["unique_graphs"] - graphs, "dynamo": dynamo_stats()}


def section_compiled_step(ctx: Context) -> dict[str, Any]:
    """One sampling step (three passes, one after another) with the blocks compiled: the engine's fastest bf16."""
    model, _ = ctx.need_model()
    counters.clear()
    enter_(ctx, compiled_blocks(model.transformer))
    return {**guidance_step(ctx, batch_passes=False), "dynamo": dynamo_stats()}


def section_fast_step(ctx: Context, batch_passes: bool = False) -> dict[str, Any]:
    """One sampling step with fp8 weights, real fp8 matmuls and compiled blocks (``--fp8-matmul --compile``), and
    its guided velocity's relative error against the bf16 step on the same (bf16) weights."""
    model, inputs = ctx.need_model()
    velocity = guided_velocity(model, inputs.conditions, GuidanceConfig(), STEPS)
    sigma = flow_match_sigmas(STEPS)[0]
    reference = velocity(inputs.latents, 0, sigma).float()
    layers, _ = fp8_storage_(ctx)
    counters.clear()
    scaling = enter_(ctx, fp8_matmuls(model, ctx.device))
    enter_(ctx, compiled_blocks(model.transformer))
    result = guidance_step(ctx, batch_passes=batch_passes)
    error = relative_error(velocity(inputs.latents, 0, sigma).float(), reference)
    return {**result, "fp8_linears": layers, "scaling": scaling, "rel_error_vs_bf16": error,
            "dynamo": dynamo_stats()}


def section_fast_step_cache_hit(ctx: Context) -> dict[str, Any]:
    """The fast step (fp8 weights, fp8 matmuls, compiled blocks) when the first-block cache hits for every pass:
    block 0 runs, blocks 1..N-1 are skipped (``sampling/step_cache.py``). The warm-up call stores each pass's
    residuals (a miss); the timed calls of the same step then hit. A run's time per step is
    ``(1 - f) * fast_step + f * this`` for a fraction f of hits, which only real weights can tell."""
    model, inputs = ctx.need_model()
    layers, _ = fp8_storage_(ctx)
    enter_(ctx, fp8_matmuls(model, ctx.device))
    enter_(ctx, compiled_blocks(model.transformer))
    cache = StepCache(MAX_THRESHOLD, STEPS)
    step = FIRST_STEPS  # the first step the cache may skip
    velocity = guided_velocity(model, inputs.conditions, GuidanceConfig(), STEPS, step_cache=cache)
    sigma = flow_match_sigmas(STEPS)[step]
    result = ctx.time(lambda: velocity(inputs.latents, step, sigma))
    return {**result, "fp8_linears": layers, "step": step,
            "skipped_fraction": cache.skipped_fraction(len(model.transformer.blocks))}


def section_dit_pass_720p(ctx: Context) -> dict[str, Any]:
    model, _ = ctx.need_model()
    latent_hw = ctx.scale.large_latent_hw
    inputs = make_inputs(model, ctx.scale, latent_hw, ctx.device, ctx.args.seed)
    backend = (ctx.results.get("attention_backends") or {}).get("best", "default")
    with nullcontext() if backend == "default" else prefer_backend(backend):
        result = ctx.time(lambda: dit_pass(model, inputs), repeats=ctx.args.repeats_large)
    flops = pass_flops(ctx.scale, latent_hw, inputs.audio.windows.shape[2])
    return {
        **with_throughput(result, flops, ctx.scale.video_tokens(latent_hw)),
        "backend": backend,
        "latents": list(inputs.latents.shape),
        "video_tokens": ctx.scale.video_tokens(latent_hw),
    }


def section_group_offload(ctx: Context) -> dict[str, Any]:
    """Weights on the CPU, each block onloaded for its turn (prefetched on a side stream where CUDA has one)."""
    model, inputs = ctx.need_model()
    start = time.perf_counter()
    model.to("cpu")
    free_memory(ctx.device)
    apply_group_offloading(
        model.transformer,
        onload_device=ctx.device,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=ctx.cuda,
    )
    setup_s = time.perf_counter() - start
    result = with_throughput(ctx.time(lambda: dit_pass(model, inputs)), main_pass_flops(ctx), main_tokens(ctx))
    return {**result, "setup_s": setup_s, "use_stream": ctx.cuda}


def section_streamed_fast_step(ctx: Context) -> dict[str, Any]:
    """The 24 GB-card route: fp8 weights waiting in CPU memory, streamed block by block with prefetch
    (``runtime.placement.streamed_blocks``), fp8 matmuls and compiled blocks; one sampling step. Last: it leaves
    the model on the CPU."""
    model, inputs = ctx.need_model()
    layers, _ = fp8_storage_(ctx)
    start = time.perf_counter()
    enter_(ctx, streamed_blocks(model, ctx.device))
    setup_s = time.perf_counter() - start
    free_memory(ctx.device)
    enter_(ctx, fp8_matmuls(model, ctx.device))
    enter_(ctx, compiled_blocks(model.transformer))
    return {**guidance_step(ctx, batch_passes=False), "fp8_linears": layers, "setup_s": setup_s}


def budget_cases(ctx: Context) -> list[tuple[float, tuple[int, int]]]:
    """(GPU memory budget in GiB, latent height and width) of :func:`section_memory_budget`: consumer cards (24, 12
    and 8 GB) at 512x512 and 720x1280. The tiny model has too few blocks for streaming to save memory, so its
    budgets sit just above its resident estimates."""
    main, large = ctx.scale.latent_hw, ctx.scale.large_latent_hw
    if ctx.scale.time_factor:
        return [(24.0, main), (24.0, large), (12.0, large), (12.0, main), (8.0, main)]
    model, _ = ctx.need_model()
    return [(1.01 * estimate_dit_memory(model.transformer, ctx.scale.num_frames, 8 * h, 8 * w).total / GIB, (h, w))
            for h, w in (main, large)]


@contextmanager
def memory_cap(device: torch.device, budget_gib: float, how: str = "fraction") -> Iterator[dict[str, float]]:
    """Let this process allocate at most ``budget_gib`` GiB on a CUDA ``device``, as a card of that size would;
    nothing elsewhere. ``how``: ``fraction``, PyTorch's per-process cap (its caching allocator refuses beyond it;
    ``cudaMallocAsync``'s pool is not bounded by it), or ``filler``, every byte of the GPU beyond the budget taken
    by a raw ``cudaMalloc`` outside PyTorch (as another program or a desktop would hold it), so any allocator meets
    the real limit. Yields ``{"filler_gib": ...}``."""
    if device.type != "cuda":
        yield {"filler_gib": 0.0}
        return
    index = torch.cuda.current_device() if device.index is None else device.index  # the calls want an index
    free_memory(device)
    if how == "filler":
        free, _ = torch.cuda.mem_get_info(index)
        # this process's tensors already on the GPU count against the card, the CUDA context does not (as above)
        take = max(0, free - max(0, int(budget_gib * GIB) - torch.cuda.memory_allocated(index)))
        try:
            with torch.cuda.device(index), raw_cuda_allocation(take):
                yield {"filler_gib": take / GIB}
        finally:
            free_memory(device)
        return
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * GIB / total), index)
    try:
        yield {"filler_gib": 0.0}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
        free_memory(device)


@contextmanager
def raw_cuda_allocation(nbytes: int) -> Iterator[None]:
    """``nbytes`` of the current GPU held by ``cudaMalloc`` through the CUDA runtime PyTorch loaded, outside
    PyTorch's allocators (their statistics do not count it), freed with ``cudaFree`` at the end."""
    import ctypes

    maps = Path("/proc/self/maps").read_text().splitlines()
    paths = [line[line.index("/"):] for line in maps if "/" in line and "libcudart" in line.rsplit("/", 1)[-1]
             and not line.endswith("(deleted)")]
    if not paths:
        raise RuntimeError("the CUDA runtime library PyTorch uses is not in /proc/self/maps (linked statically?).")
    runtime = ctypes.CDLL(paths[0])
    pointer = ctypes.c_void_p()
    status = runtime.cudaMalloc(ctypes.byref(pointer), ctypes.c_size_t(nbytes)) if nbytes else 0
    if status:
        raise RuntimeError(f"cudaMalloc of {nbytes / GIB:.2f} GiB for the filler failed (CUDA error {status}).")
    try:
        yield
    finally:
        if nbytes and runtime.cudaFree(pointer):
            raise RuntimeError("cudaFree of the filler failed: later cases would run on a smaller card.")


def section_memory_budget(ctx: Context) -> dict[str, Any]:
    """The memory budget option (``--gpu-memory`` / the sampler's ``gpu_memory``) on smaller cards: fp8 weights (as
    an fp8 file loads by default), the placement ``runtime.memory.choose_placement`` picks for each budget, and one
    DiT pass (audio on) run inside ``runtime.placement.dit_on_device`` with the process capped at the budget
    (``--cap``: :func:`memory_cap`). Records the estimate, the measured peak and whether the pass
    ran. A guided step runs its passes one after another, so its peak is a pass's. Last: it leaves the model on
    the CPU."""
    model, inputs = ctx.need_model()
    layers, _ = fp8_storage_(ctx)
    cases = budget_cases(ctx)
    results: dict[str, Any] = {"fp8_linears": layers, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    for placement in PLACEMENTS:  # resident cases first: the streamed ones leave the weights on the CPU
        chosen = []
        for budget, hw in cases:
            try:
                picked, estimate = choose_placement(model.transformer, ctx.scale.num_frames, 8 * hw[0], 8 * hw[1],
                                                    budget)
            except InsufficientMemoryError as exc:
                results[f"{budget:.4g}GiB_{8 * hw[0]}x{8 * hw[1]}"] = {"status": "refused", "message": str(exc)}
                continue
            if picked == placement:
                chosen.append((budget, hw, estimate))
        if not chosen:
            continue
        with dit_on_device(model, ctx.device, placement):
            for budget, hw, estimate in chosen:
                case_inputs = inputs if hw == ctx.scale.latent_hw else make_inputs(
                    model, ctx.scale, hw, ctx.device, ctx.args.seed)
                def capped_pass(i: Inputs = case_inputs, budget: float = budget) -> dict[str, Any]:
                    # inside the guard: a cap that cannot be set up (a filler the allocator refuses) is this
                    # case's recorded error, not the section's
                    with memory_cap(ctx.device, budget, ctx.args.cap) as cap:
                        return {**ctx.time(lambda: dit_pass(model, i), warmup=0, repeats=1), **cap}

                entry = guarded(capped_pass, ctx.device)
                entry.update(placement=placement, budget_gib=budget, estimate_gib=estimate.total / GIB,
                             video_tokens=ctx.scale.video_tokens(hw), cap=ctx.args.cap)
                if ctx.cuda:  # the allocator's reserve, fragmentation included (a raw filler is not in it)
                    entry["peak_reserved_gib"] = torch.cuda.max_memory_reserved(ctx.device) / GIB
                results[f"{budget:.4g}GiB_{8 * hw[0]}x{8 * hw[1]}"] = entry
                del case_inputs
    return results


@dataclass(frozen=True)
class Section:
    """One measurement. ``min_s``: full-size seconds it needs to be worth starting; ``cap_s``: its hard time cap;
    ``reserved``: earlier sections leave its ``min_s`` free."""

    name: str
    fn: Callable[[Context], dict[str, Any]]
    min_s: float
    cap_s: float
    reserved: bool = False


def sections(args: argparse.Namespace) -> list[Section]:
    return [
        Section("environment", section_environment, 0, 60),
        Section("build", section_build, 20, 180),
        Section("inputs", section_inputs, 5, 60),
        Section("dit_pass", section_dit_pass, 15, 120),
        Section("guidance_step_sequential", section_guidance_sequential, 30, 150),
        Section("guidance_step_batched", section_guidance_batched, 30, 150),
        Section("attention_backends", section_attention_backends, 30, 150),
        Section("attention_dispatch", section_attention_dispatch, 30, 150),
        Section("fp8_matmul", section_fp8_matmul, 10, 90),
        Section("dit_pass_fp8_storage", section_dit_pass_fp8_storage, 20, 120),
        Section("dit_pass_720p", section_dit_pass_720p, 45, 150),
        Section("dit_pass_fp8_matmul", section_dit_pass_fp8_matmul, 20, 120),
        Section("compiled_blocks", section_compiled_blocks, 120, args.compile_cap_s),
        Section("compiled_new_windows", section_compiled_new_windows, 90, args.compile_cap_s),
        Section("compiled_step", section_compiled_step, 60, args.compile_cap_s),
        Section("fast_step", section_fast_step, 120, args.compile_cap_s),
        Section("fast_step_batched", lambda ctx: section_fast_step(ctx, batch_passes=True), 120, args.compile_cap_s),
        Section("fast_step_cache_hit", section_fast_step_cache_hit, 60, args.compile_cap_s),
        Section("group_offload", section_group_offload, 60, 180, reserved=True),
        Section("streamed_fast_step", section_streamed_fast_step, 90, 240),
        Section("memory_budget", section_memory_budget, 90, 240),
    ]


# ====================================================================================================================
# Runner
# ====================================================================================================================


def run_section(ctx: Context, section: Section, reserve_s: float) -> dict[str, Any]:
    """Run one section inside its time cap, with the model restored afterwards; never raises."""
    factor = ctx.scale.time_factor
    left = ctx.remaining() - reserve_s * factor
    if left < section.min_s * factor:
        return {
            "status": f"skipped: budget ({ctx.remaining():.0f} s left, needs {section.min_s * factor:.0f} s "
            f"plus {reserve_s * factor:.0f} s kept for later sections)"
        }
    start = time.perf_counter()
    try:
        with time_limit(min(section.cap_s, left)), torch.no_grad():
            result = {"status": "ok", **section.fn(ctx)}
    except SectionSkippedError as exc:
        result = {"status": f"skipped: {exc}"}
    except Exception as exc:  # noqa: BLE001 - record and go on to the next section
        result = {"status": "timeout" if is_timeout(exc) else "error", **describe_error(exc)}
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    restore_errors = ctx.run_deferred()
    if restore_errors:
        result["restore_errors"] = restore_errors
    free_memory(ctx.device)
    result["section_wall_s"] = time.perf_counter() - start
    if resource is not None:  # the process's peak so far, not this section's alone (KiB; bytes on macOS)
        result["host_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
            2**30 if sys.platform == "darwin" else 2**20)
    return result


def summary_rows(name: str, result: dict[str, Any]) -> Iterator[tuple[str, str, Any, Any]]:
    """(name, status, median s, peak GiB) for a section and for each timed entry nested one or two levels down."""
    if "median_s" in result or not any(isinstance(v, dict) for v in result.values()):
        yield name, result.get("status", "ok"), result.get("median_s"), result.get("peak_gib")
        return
    for key, value in result.items():
        if isinstance(value, dict):
            yield from summary_rows(f"{name}.{key}", value)


def print_summary(report: Report) -> None:
    log("\n" + f"{'section':58} {'status':16} {'median s':>10} {'peak GiB':>9}")
    for name, result in report.data["sections"].items():
        for row, status, median, peak in summary_rows(name, result):
            med = f"{median:10.4f}" if isinstance(median, float) else f"{'-':>10}"
            mem = f"{peak:9.2f}" if isinstance(peak, float) else f"{'-':>9}"
            log(f"{row[:58]:58} {str(status)[:16]:16} {med} {mem}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_gpu.json"), help="JSON file for all results")
    parser.add_argument("--budget-s", type=float, default=480.0, help="time budget of the whole run in seconds")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="bundled tiny configs and sizes (runs on a CPU)")
    size.add_argument("--mid", action="store_true", help="the 14B block layout shrunk to 12 blocks of width 512, "
                                                         "384 video tokens (CPU figures in seconds)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up calls per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per measurement")
    parser.add_argument("--repeats-large", type=int, default=1, help="timed calls of the 720x1280 pass")
    parser.add_argument("--compile-cap-s", type=float, default=240.0, help="time cap of the compile section")
    parser.add_argument("--sections", default="", help="comma-separated subset of sections to run (default: all)")
    parser.add_argument("--expandable-segments", action="store_true",
                        help="turn on the CUDA allocator's expandable segments as the command line does "
                             "(runtime.memory.use_expandable_segments); default: PyTorch's allocator as configured")
    parser.add_argument("--cap", choices=("fraction", "filler"), default="fraction",
                        help="how memory_budget emulates a smaller card: PyTorch's per-process fraction, or a raw "
                             "cudaMalloc holding the rest of the GPU (bounds any allocator, cudaMallocAsync's too)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=PRECISION_POLICIES, default=OFFICIAL,
                        help="bf16 rounding policy of the DiT (official: float32 islands; diffusers: as diffusers)")
    return parser.parse_args(argv)


def select_sections(args: argparse.Namespace) -> list[Section]:
    """All sections, or the named ones plus what they depend on (build, inputs), in the fixed order."""
    every = sections(args)
    if not args.sections:
        return every
    wanted = {s.strip() for s in args.sections.split(",") if s.strip()} | {"environment", "build", "inputs"}
    unknown = wanted - {s.name for s in every}
    if unknown:
        raise SystemExit(f"unknown sections: {', '.join(sorted(unknown))}; known: {', '.join(s.name for s in every)}")
    return [s for s in every if s.name in wanted]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scale = tiny_scale() if args.tiny else mid_scale() if args.mid else full_scale()
    report = Report(
        args.out,
        {
            "argv": sys.argv,
            "scale": scale.name,
            "device": str(device),
            "budget_s": args.budget_s,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "precision": args.precision,
        },
    )
    if device.type != "cuda" and not (args.tiny or args.mid):
        report.note("error", "the full-size run needs CUDA; use --tiny to check the script on a CPU")
        log("no CUDA: the 14B model needs a GPU; run with --tiny to check the script on a CPU")
        return 2
    if args.expandable_segments:
        report.note("expandable_segments", use_expandable_segments(device))  # before the first allocation
    ctx = Context(args, scale, device, deadline=started + args.budget_s)
    current = {"name": "start"}
    watchdog = start_watchdog(report, current, args.budget_s + WATCHDOG_GRACE_S)
    plan = select_sections(args)
    for i, section in enumerate(plan):
        current["name"] = section.name
        reserve = sum(s.min_s for s in plan[i + 1 :] if s.reserved)
        log(f"== {section.name} ({ctx.remaining():.0f} s of budget left)")
        result = run_section(ctx, section, reserve)
        ctx.results[section.name] = result
        report.record(section.name, result)
        log(f"-> {section.name}: {json.dumps(result, default=str)[:1500]}")
    watchdog.cancel()
    report.note("total_s", time.monotonic() - started)
    print_summary(report)
    log(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
