"""One sampling step of the OFFICIAL FantasyTalking code and of OUR engine, side by side, same weights, same inputs.

What it measures, in one process on one GPU: the three DiT passes of one sampling step (negative prompt; positive
prompt; positive prompt + audio) and their two-scale guidance combination, as the official ``infer.py`` run makes
them per step, for

1. the official implementation (Fantasy-AMAP/fantasy-talking: ``diffsynth/models/wan_video_dit.py`` ``WanModel``
   + ``model.py`` ``FantasyTalkingAudioConditionModel``), called exactly as the loop body of
   ``WanVideoPipeline.__call__`` calls it: ``self.dit(latents, timestep, context=[..], clip_fea, y=[y], seq_len,
   audio_proj, audio_context_lens, latents_num_frames, audio_scale)`` under ``torch.amp.autocast(bfloat16)``,
   bf16 weights (``ModelManager(torch_dtype=bfloat16)``), the DiT wrapped by the pipeline's
   ``enable_vram_management(num_persistent_param_in_dit=None)`` and onloaded as ``load_models_to_device(["dit"])``
   does. The two passes without audio get ``audio_scale=0`` and still compute the audio attention (ours skips it).
   Timed twice: with the weights where ``infer.py`` leaves them (the blocks' and the head's ``modulation``
   parameters are not wrapped, so they stay on the CPU and are copied to the GPU, a blocking copy, in every block
   call), and with every weight on the GPU;
2. our engine: the same random weights converted by OUR loaders (``load_wan_dit`` + ``load_audio_adapter``, strict
   key checks and dtype policy; fed from memory, tensors moved, not copied), ``FantasyTalkingModel`` with its
   default (official) precision policy, one step of ``sampling.euler.guided_velocity`` (passes one after another).

Weights: random N(0, std) (norm scales 1, shifts 0), seeded, allocated straight on the device (meta device +
``to_empty``). Inputs (512x512x81): latent [1, 16, 21, 64, 64], I2V conditioning y [1, 20, 21, 64, 64] (the
official mask in channels 0..3), umT5 rows padded to 512 x 4096 by the DiT, CLIP tokens 257 x 1280, and ~3.5 s of
wav2vec2 features [1, 175, 768] projected and cut into per-latent-frame windows by each side's own code (the
official ``get_proj_fea`` / ``split_audio_sequence`` / ``split_tensor_with_padding``, ours ``project_audio`` /
``audio_windows_for_frames`` / ``gather_audio_windows``). Timestep: step 0 of the official 30-step scheduler.

Order (one copy of the 32 GB weights at a time): build the official model, time it, convert its weights into ours,
free it, time ours. Each timing: 1 warm-up + 2 timed steps (CUDA events), peak ``torch.cuda.max_memory_allocated``
per side. The check: relative L2 error of our guided velocity (and of each pass) against the official one; it
must be < 5e-2 in bf16 and < 1e-4 in float32, which proves that weights and inputs are the same.

Attention of the official side (``--official-attention``): ``native`` runs the official functions as they are.
Without flash-attn (the usual case here) those fall back to ``scaled_dot_product_attention`` and IGNORE the audio
windows' ``audio_context_lens``: the zero-padded window slots are attended. The check then runs our model with
``k_lens=None`` (the same semantics; our default masks the padding, as flash-attn varlen does), and also reports
the error against our default. ``masked`` / ``unmasked`` replace the official attention functions with an exact
SDPA in the input dtype with flash-attn varlen semantics / with the no-flash semantics (needed on a CPU, where the
official ``flash_attention`` asserts CUDA, and for an exact float32 check, since the official kernels cast to bf16).
``auto``: native on CUDA in bf16, else masked.

The official code is NOT part of this repository and is never committed: export it into the git-ignored folder
``benchmarks/official_code/`` (git-ignored), e.g. from a clone at commit 8c2d0c9:
    git -C fantasy-talking archive HEAD | tar -x -C benchmarks/official_code
It is imported from there at run time. Only these of its files are loaded: ``diffsynth/models/wan_video_dit.py``,
``diffsynth/vram_management/layers.py`` with ``diffsynth/models/utils.py``, ``diffsynth/schedulers/flow_match.py``
and ``model.py``; the ``diffsynth`` and ``diffsynth.models`` / ``diffsynth.schedulers`` packages are entered as empty
package shells in ``sys.modules``, because their ``__init__`` files import all of DiffSynth (VAE, text and image
encoders, prompters needing ftfy/regex, pipelines needing torchvision, the modelscope downloader), none of which
one DiT step uses. Nothing else is stubbed (``tqdm``, imported by ``wan_video_dit.py``, comes with transformers).

Full size, one GPU (H200 or H100; needs torch, diffusers >= 0.41, accelerate, safetensors; about 2 minutes):
    PYTHONPATH=. python3 benchmarks/bench_official.py --out official.json
Smoke test on a CPU (tiny DiT, float32, exact check, < 1 minute):
    PYTHONPATH=. python3 benchmarks/bench_official.py --tiny --out /tmp/official_tiny.json
``--tiny --dtype bf16`` runs on a CPU as well: the official float32 islands are CUDA-autocast contexts, which a CPU
ignores, so there they are emulated (:class:`AutocastOn`); on CUDA the official code runs untouched.
The whole run ends within ``--budget-s`` (optional phases are skipped when time runs low; a watchdog ends the process
shortly after the budget); the JSON at ``--out`` is rewritten after every phase. Exit status 0 when every phase ran
and the check passed, 1 otherwise, 2 when something needed is missing, 3 from the watchdog.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import platform
import sys
import tempfile
import time
import traceback
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from harness import GIB, Report, allocated_gib, free_memory, log, measure, start_watchdog, synchronize

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OFFICIAL_DIR = REPO / "benchmarks" / "official_code"
OFFICIAL_COMMIT = "8c2d0c9ce2441eb02b5cf1c10d23dbab5ce06677"  # the commit this script was written against
STEPS = 30  # infer.py: num_inference_steps=30; the timed step is step 0
CFG, AUDIO_CFG, AUDIO_SCALE = 5.0, 5.0, 1.0  # infer.py defaults (prompt_cfg_scale, audio_cfg_scale, audio_scale)
EXPAND = 4  # infer.py: split_tensor_with_padding(..., expand_length=4)
TOLERANCE = {torch.bfloat16: 5e-2, torch.float32: 1e-4}  # relative L2 of the guided velocity
WATCHDOG_GRACE_S = 15.0
PASSES = ("u", "p", "pa")  # negative prompt; positive prompt; positive prompt + audio


# ====================================================================================================================
# Sizes
# ====================================================================================================================


@dataclass(frozen=True)
class Scale:
    """Model and input sizes. ``wan_config``: the official ``WanModel`` constructor arguments (Wan terms)."""

    name: str
    wan_config: dict[str, Any]
    proj_dim: int  # adapter width (FantasyTalkingAudioConditionModel audio_proj_dim)
    audio_dim: int  # wav2vec2 width
    num_frames: int
    latent_hw: tuple[int, int]
    text_tokens: tuple[int, int]  # umT5 rows of the positive and the negative prompt (zero-padded to 512 by the DiT)
    init_std: float
    est_step_s: float  # rough seconds of one step, to decide whether optional phases still fit the budget


def full_scale() -> Scale:
    """Wan2.1-I2V-14B (the config the official ``WanModelStateDictConverter`` gives the I2V 14B checkpoint) with the
    released adapter (768 -> 2048), 512x512x81; text rows as a short prompt / the default negative prompt."""
    wan = {"model_type": "i2v", "patch_size": (1, 2, 2), "text_len": 512, "in_dim": 36, "dim": 5120,
           "ffn_dim": 13824, "freq_dim": 256, "text_dim": 4096, "out_dim": 16, "num_heads": 40, "num_layers": 40,
           "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}
    return Scale("wan2.1_i2v_14b", wan, 2048, 768, 81, (64, 64), (24, 126), 0.02, 8.0)


def tiny_scale() -> Scale:
    """The tiny official-layout DiT of the golden fixtures (dim 64, 2 heads of 32, 2 blocks; CLIP width 1280 is
    hard-wired in the official ``img_emb``), 17 frames on an 8x8 latent. A larger std than the full run makes every
    branch (text, image, audio) weigh in the output, so a mapping error cannot hide."""
    wan = {"model_type": "i2v", "patch_size": (1, 2, 2), "text_len": 512, "in_dim": 36, "dim": 64, "ffn_dim": 128,
           "freq_dim": 256, "text_dim": 32, "out_dim": 16, "num_heads": 2, "num_layers": 2, "window_size": (-1, -1),
           "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}
    return Scale("tiny", wan, 32, 768, 17, (8, 8), (11, 23), 0.1, 0.0)


# ====================================================================================================================
# The official code, imported from benchmarks/official_code
# ====================================================================================================================


@dataclass
class Official:
    """The official modules this benchmark uses."""

    root: Path
    dit: types.ModuleType  # diffsynth.models.wan_video_dit
    utils: types.ModuleType  # diffsynth.models.utils
    vram: types.ModuleType  # diffsynth.vram_management (layers)
    flow_match: types.ModuleType  # diffsynth.schedulers.flow_match
    adapter: types.ModuleType  # model.py
    attention_mode: str = "native"
    audio_mask: str = "masked"  # how the official audio attention treats the windows' padding: masked / unmasked


def _package_shell(name: str, path: Path) -> None:
    """Enter package ``name`` in ``sys.modules`` with its folder as ``__path__`` and without running its
    ``__init__.py`` (see the module docstring: those import all of DiffSynth)."""
    shell = types.ModuleType(name)
    shell.__path__ = [str(path)]
    shell.__package__ = name
    sys.modules[name] = shell
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, shell)


def import_official(root: Path) -> Official:
    """Import the official DiT, adapter, vram-management wrappers and scheduler from ``root``."""
    if not (root / "diffsynth" / "models" / "wan_video_dit.py").is_file() or not (root / "model.py").is_file():
        raise FileNotFoundError(
            f"The official code is not in {root}. Export it (never commit it; the folder is git-ignored), e.g.\n"
            f"  mkdir -p {root} && git --git-dir=<fantasy-talking clone>/.git archive HEAD | tar -x -C {root}")
    for name in ("diffsynth", "diffsynth.models", "diffsynth.schedulers"):
        _package_shell(name, root.joinpath(*name.split(".")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CPU-only torch warns about the cuda autocast decorators at import
        dit = importlib.import_module("diffsynth.models.wan_video_dit")
        utils = importlib.import_module("diffsynth.models.utils")
        vram = importlib.import_module("diffsynth.vram_management")  # its __init__ imports layers only
        flow_match = importlib.import_module("diffsynth.schedulers.flow_match")
        # model.py under a unique name ("model" is too common a module name to put on sys.path)
        spec = importlib.util.spec_from_file_location("fantasytalking_official_model", root / "model.py")
        adapter = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = adapter
        spec.loader.exec_module(adapter)
    return Official(root, dit, utils, vram, flow_match, adapter)


def flash_attn_available(official: Official) -> dict[str, bool]:
    return {"flash_attn_3": official.dit.FLASH_ATTN_3_AVAILABLE, "flash_attn_2": official.dit.FLASH_ATTN_2_AVAILABLE,
            "sageattention": official.dit.SAGE_ATTN_AVAILABLE}


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lens: torch.Tensor | None = None,
                        k_lens: torch.Tensor | None = None, *, masked: bool, half: torch.dtype | None,
                        out_as_query: bool, **options: Any) -> torch.Tensor:
    """Exact SDPA stand-in for the official ``flash_attention`` / ``attention`` ([B, L, N, D] in and out).

    ``masked``: flash-attn varlen semantics (keys at positions >= k_lens[b] excluded); else ``k_lens`` is ignored, as
    the official fallback without flash-attn does. ``half``: the dtype the official kernels cast to (bf16 runs), or
    None to keep the input dtype (float32 check). Output dtype: the query's (``flash_attention``) or the compute
    dtype (``attention``'s SDPA fallback), as the official functions return.
    """
    if q_lens is not None or options.get("causal") or tuple(options.get("window_size", (-1, -1))) != (-1, -1):
        raise NotImplementedError("the official DiT step never passes q_lens, causal or a window")
    out_dtype = q.dtype
    work = half or v.dtype
    q, k, v = (t.to(work).transpose(1, 2) for t in (q, k, v))  # [B, N, L, D]
    mask = None
    if masked and k_lens is not None:
        lens = k_lens.to(q.device).view(-1, 1, 1, 1)
        mask = torch.arange(k.shape[2], device=q.device).view(1, 1, 1, -1) < lens
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).contiguous()
    return out.to(out_dtype) if out_as_query else out


class _CudaAutocastOnCpu(torch.overrides.TorchFunctionMode):
    """What CUDA autocast does and CPU autocast does not: ``layer_norm`` in float32 (CUDA's float32 op list), and
    inside a float32 island (``linear_fp32``) every ``linear`` in float32. CPU-only emulation (:class:`AutocastOn`)."""

    def __init__(self, linear_fp32: bool) -> None:
        super().__init__()
        self.cast = (F.layer_norm, F.linear) if linear_fp32 else (F.layer_norm,)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self.cast:
            args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
            kwargs = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                      for k, v in kwargs.items()}
        return func(*args, **kwargs)


class AutocastOn:
    """Stand-in for ``torch.amp`` inside ``wan_video_dit.py`` for a reduced-precision run on a CPU only (never on
    CUDA). The official float32 islands are ``amp.autocast(dtype=float32, device_type="cuda")`` contexts, which do
    nothing on a CPU, and CPU autocast cannot target float32; so an island becomes: the bf16 autocast off, linears
    and LayerNorms in float32. Other autocast calls act on ``device_type`` instead of CUDA."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type

    def autocast(self, dtype: torch.dtype | None = None, device_type: str = "cuda", enabled: bool = True,
                 **kwargs: Any) -> AbstractContextManager:
        if enabled and dtype == torch.float32:
            return cpu_autocast(self.device_type, None)
        return torch.amp.autocast(device_type=self.device_type, dtype=dtype, enabled=enabled, **kwargs)


@contextmanager
def cpu_autocast(device_type: str, dtype: torch.dtype | None) -> Iterator[None]:
    """CUDA-like autocast on a CPU: to ``dtype`` with LayerNorms in float32, or (None) a float32 island."""
    if dtype is None:
        with torch.amp.autocast(device_type, enabled=False), _CudaAutocastOnCpu(linear_fp32=True):
            yield
    else:
        with torch.amp.autocast(device_type, dtype=dtype), _CudaAutocastOnCpu(linear_fp32=False):
            yield


def install_official_attention(official: Official, mode: str, dtype: torch.dtype) -> None:
    """Keep the official attention functions (``native``) or replace them in both modules that call them."""
    official.attention_mode = mode
    if mode == "native":
        flash = official.dit.FLASH_ATTN_2_AVAILABLE or official.dit.FLASH_ATTN_3_AVAILABLE
        official.audio_mask = "masked" if flash else "unmasked"
        return
    half = dtype if dtype in (torch.bfloat16, torch.float16) else None

    def make(out_as_query: bool) -> Callable[..., torch.Tensor]:
        def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lens: torch.Tensor | None = None,
               k_lens: torch.Tensor | None = None, **options: Any) -> torch.Tensor:
            return reference_attention(q, k, v, q_lens, k_lens, masked=mode == "masked", half=half,
                                       out_as_query=out_as_query, **options)
        return fn

    for module in (official.dit, official.adapter):  # model.py imported both names from wan_video_dit
        module.flash_attention = make(out_as_query=True)
        module.attention = make(out_as_query=False)
    official.audio_mask = mode


# ====================================================================================================================
# Random weights
# ====================================================================================================================


@torch.no_grad()
def init_random_(module: nn.Module, std: float, gen: torch.Generator) -> None:
    """Norm scales 1 and shifts 0; every other parameter N(0, std)."""
    for sub in module.modules():
        is_norm = "norm" in type(sub).__name__.lower()
        for name, param in sub.named_parameters(recurse=False):
            if is_norm:
                param.fill_(1.0 if name == "weight" else 0.0)
            else:
                param.normal_(0.0, std, generator=gen)


def build_official(official: Official, scale: Scale, dtype: torch.dtype, device: torch.device,
                   seed: int) -> tuple[nn.Module, nn.Module]:
    """The official DiT with the adapter's processors installed, and the adapter (its ``proj_model``), random.

    dtypes as in ``infer.py``: every DiT weight in ``dtype`` (``ModelManager(torch_dtype=bfloat16)``; the processors'
    k/v become bf16 when the vram-management wrappers onload them), ``proj_model`` float32 (``.to("cuda")`` only).
    """
    with official.utils.init_weights_on_device():  # parameters on meta (what ModelManager does); RoPE table real
        dit = official.dit.WanModel(**scale.wan_config)
        adapter = official.adapter.FantasyTalkingAudioConditionModel(dit, scale.audio_dim, scale.proj_dim)
    dit = dit.to(dtype).eval().requires_grad_(False)
    adapter = adapter.float().eval().requires_grad_(False)
    dit.to_empty(device=device)  # allocate on the device, uninitialised (no host copy)
    adapter.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    init_random_(dit, scale.init_std, gen)
    init_random_(adapter, scale.init_std, gen)
    return dit, adapter


def official_vram_management(official: Official, dit: nn.Module, device: str, dtype: torch.dtype) -> None:
    """``WanVideoPipeline.enable_vram_management(num_persistent_param_in_dit=None)`` for the DiT (the same module map
    and configs), then ``load_models_to_device(["dit"])`` (every wrapper onloaded). With no parameter limit every
    wrapper computes with its weights in place (onload device and dtype = computation device and dtype)."""
    vram, wan = official.vram, official.dit
    config = {"offload_dtype": dtype, "offload_device": "cpu", "onload_dtype": dtype, "onload_device": device,
              "computation_dtype": dtype, "computation_device": device}
    vram.enable_vram_management(
        dit,
        module_map={nn.Linear: vram.AutoWrappedLinear, nn.Conv3d: vram.AutoWrappedModule,
                    nn.LayerNorm: vram.AutoWrappedModule, wan.WanLayerNorm: vram.AutoWrappedModule,
                    wan.WanRMSNorm: vram.AutoWrappedModule},
        module_config=config,
        max_num_param=None,
        overflow_module_config={**config, "onload_device": "cpu"},
    )
    for module in dit.modules():
        if hasattr(module, "onload"):
            module.onload()


def unwrapped_parameters(official: Official, dit: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters outside every vram-management wrapper: ``load_models_to_device`` never moves them, so in
    ``infer.py`` they stay where ``ModelManager(device="cpu")`` loaded the DiT (the ``modulation`` tables)."""
    wrappers = (official.vram.AutoWrappedModule, official.vram.AutoWrappedLinear)
    wrapped = {id(p) for m in dit.modules() if isinstance(m, wrappers) for p in m.parameters()}
    return [(n, p) for n, p in dit.named_parameters() if id(p) not in wrapped]


def place_unwrapped(params: list[tuple[str, nn.Parameter]], device: torch.device | str) -> None:
    for _, param in params:
        param.data = param.data.to(device)


# ====================================================================================================================
# Inputs
# ====================================================================================================================


@dataclass
class Inputs:
    """What both sides see (the official tensors in the layouts the pipeline passes)."""

    latents: torch.Tensor  # [1, 16, T, h, w] float32 z_t
    y: torch.Tensor  # [1, 20, T, h, w] float32: the I2V mask (4 channels) + the first-frame latent
    text_pos: torch.Tensor  # [L_pos, text_dim] (umT5 output at its real length)
    text_neg: torch.Tensor  # [L_neg, text_dim]
    clip: torch.Tensor  # [1, 257, 1280]
    features: torch.Tensor  # [1, L, 768] float32 wav2vec2 last hidden state
    sigma: torch.Tensor  # scalar, step 0 of our schedule
    timestep: torch.Tensor  # [1] official step-0 timestep
    official_audio: dict[str, Any] = field(default_factory=dict)  # audio_proj, audio_context_lens, latents_num_frames


def audio_token_count(num_frames: int) -> int:
    from fantasytalking_core.audio.rules import crop_samples_for_frames, wav2vec2_num_tokens

    return wav2vec2_num_tokens(crop_samples_for_frames(num_frames))


def make_inputs(official: Official, adapter: nn.Module, scale: Scale, dtype: torch.dtype, device: torch.device,
                seed: int) -> Inputs:
    """Random inputs of the official shapes and dtypes; the official audio windows from the official functions."""
    from fantasytalking_core.audio.windows import latent_frame_count
    from fantasytalking_core.sampling.euler import initial_noise
    from fantasytalking_core.sampling.schedule import flow_match_sigmas

    cfg = scale.wan_config
    gen = torch.Generator("cpu").manual_seed(seed + 1)
    frames = latent_frame_count(scale.num_frames)
    h, w = scale.latent_hw

    def randn(*shape: int, dt: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device=device, dtype=dt)

    # y as WanVideoPipeline.encode_image builds it: mask (first latent frame 1) concatenated with the VAE latent
    mask = torch.zeros(1, 4, frames, h, w)
    mask[:, :, 0] = 1.0
    y = torch.cat([mask.to(device), randn(1, cfg["in_dim"] - cfg["out_dim"] - 4, frames, h, w)], dim=1)
    features = randn(1, audio_token_count(scale.num_frames), scale.audio_dim)

    # the official step-0 timestep (FlowMatchScheduler as WanVideoPipeline sets it) and our sigma
    scheduler = official.flow_match.FlowMatchScheduler(shift=5, sigma_min=0.0, extra_one_step=True)
    scheduler.set_timesteps(STEPS, 1.0, shift=5.0)
    timestep = scheduler.timesteps[0].unsqueeze(0).to(dtype=torch.float32, device=device)

    inputs = Inputs(
        latents=initial_noise((1, cfg["out_dim"], frames, h, w), seed).to(device),  # = official generate_noise
        y=y,
        text_pos=randn(scale.text_tokens[0], cfg["text_dim"], dt=dtype),
        text_neg=randn(scale.text_tokens[1], cfg["text_dim"], dt=dtype),
        clip=randn(1, 257, 1280, dt=dtype),
        features=features,
        sigma=flow_match_sigmas(STEPS)[0],
        timestep=timestep,
    )
    # infer.py: get_proj_fea (float32, outside autocast), split_audio_sequence, split_tensor_with_padding
    with torch.no_grad():
        proj = adapter.get_proj_fea(features)
        ranges = adapter.split_audio_sequence(proj.size(1), num_frames=scale.num_frames)
        windows, k_lens = adapter.split_tensor_with_padding(proj, ranges, expand_length=EXPAND)
    inputs.official_audio = {"audio_proj": windows, "audio_context_lens": k_lens, "latents_num_frames": frames,
                             "audio_scale": AUDIO_SCALE}
    return inputs


# ====================================================================================================================
# The two steps
# ====================================================================================================================


def autocast_for(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """The pipeline's ``torch.amp.autocast(dtype=torch_dtype, device_type=...)`` (a float32 run: none)."""
    if dtype == torch.float32:
        return nullcontext()
    if device.type != "cuda":  # CPU smoke test only: CUDA autocast's float32 LayerNorms emulated
        return cpu_autocast(device.type, dtype)
    return torch.amp.autocast(dtype=dtype, device_type=device.type)


def official_step(dit: nn.Module, inputs: Inputs, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step of the loop in ``WanVideoPipeline.__call__`` with ``audio_cfg_scale`` set and ``cfg_scale != 1``:
    (zt, audio, prompt), then (zt, 0, prompt) and (zt, 0, 0) with ``audio_scale = 0`` (the audio windows are still
    passed), combined as the pipeline does. Returns the guided velocity and the three passes."""
    latents = inputs.latents
    kwargs = dict(inputs.official_audio)
    common = {"clip_fea": inputs.clip, "y": [inputs.y[0]],  # image_emb; seq_len as prepare_extra_input
              "seq_len": latents.shape[2] * latents.shape[3] * latents.shape[4] // 4}
    with torch.no_grad(), autocast_for(latents.device, dtype):
        posi = dit(latents, timestep=inputs.timestep, context=[inputs.text_pos], **common, **kwargs)
        kwargs["audio_scale"] = 0.0
        noaudio = dit(latents, timestep=inputs.timestep, context=[inputs.text_pos], **common, **kwargs)
        no_cond = dit(latents, timestep=inputs.timestep, context=[inputs.text_neg], **common, **kwargs)
        guided = no_cond + CFG * (noaudio - no_cond) + AUDIO_CFG * (posi - noaudio)
    return guided, {"u": no_cond, "p": noaudio, "pa": posi}


@dataclass
class InMemoryFile:
    """A name our loaders are handed, and the state dict ``open_checkpoint`` returns for it."""

    name: str
    tensors: dict[str, torch.Tensor]


@contextmanager
def loaders_read_memory(files: list[InMemoryFile]) -> Iterator[dict[str, Path]]:
    """Make OUR loaders read state dicts from memory: ``open_checkpoint`` (as the DiT and the adapter loader see
    it) returns a ``Checkpoint`` over the given tensors, like the one it builds for a torch pickle. Yields the
    placeholder paths to pass to the loaders (empty files: ``load_wan_dit`` checks that its path exists)."""
    from fantasytalking_core.loaders import adapter as adapter_loader
    from fantasytalking_core.loaders import wan_dit as dit_loader
    from fantasytalking_core.loaders.state_dict import Checkpoint

    by_name = {f.name: f for f in files}

    def open_from_memory(path: str | Path) -> Checkpoint:
        f = by_name[Path(path).name]
        return Checkpoint(Path(path), {k: tuple(t.shape) for k, t in f.tensors.items()},
                          {k: t.dtype for k, t in f.tensors.items()}, {}, _pickle=f.tensors)

    with tempfile.TemporaryDirectory() as tmp:
        paths = {f.name: Path(tmp) / f.name for f in files}
        for path in paths.values():
            path.touch()
        with mock.patch.object(dit_loader, "open_checkpoint", open_from_memory), \
                mock.patch.object(adapter_loader, "open_checkpoint", open_from_memory):
            yield paths


def official_state_files(dit: nn.Module, adapter: nn.Module) -> tuple[InMemoryFile, InMemoryFile]:
    """The official model as the two released files hold it: the Wan DiT checkpoint (original key names) and
    ``fantasytalking_model.ckpt`` flattened (``proj_model.*``, ``audio_processor.blocks.{i}.cross_attn.processor.*``).
    The vram-management wrappers' ``.module`` level is dropped from the names; tensors are shared, not copied."""
    dit_state: dict[str, torch.Tensor] = {}
    adapter_state = {f"proj_model.{k}": t for k, t in adapter.proj_model.state_dict().items()}
    for key, tensor in dit.state_dict().items():
        key = key.replace(".module.", ".")
        if ".processor." in key:
            adapter_state[f"audio_processor.{key}"] = tensor
        else:
            dit_state[key] = tensor
    return (InMemoryFile("official_dit.safetensors", dit_state),
            InMemoryFile("official_fantasytalking.safetensors", adapter_state))


def convert_to_ours(dit: nn.Module, adapter: nn.Module, scale: Scale, device: torch.device) -> nn.Module:
    """Our ``FantasyTalkingModel`` from the official weights, through our strict loaders (keys, shapes, dtypes)."""
    from fantasytalking_core.loaders.adapter import load_audio_adapter
    from fantasytalking_core.loaders.wan_dit import load_wan_dit
    from fantasytalking_core.model.transformer import resolve_config

    dit_file, adapter_file = official_state_files(dit, adapter)
    with loaders_read_memory([dit_file, adapter_file]) as paths:
        transformer = load_wan_dit(paths[dit_file.name], config=resolve_config(scale.wan_config), device=device)
        model = load_audio_adapter(paths[adapter_file.name], transformer)
    # the loaders assign the weights where they are; the RoPE tables (buffers) were built on the CPU
    return model.to(device).eval().requires_grad_(False)


@dataclass
class OurStep:
    """Our step: ``guided_velocity`` over the library's conditions; ``passes`` keeps the last step's passes."""

    velocity: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
    passes: dict[str, torch.Tensor]


def our_step(model: nn.Module, inputs: Inputs, audio_windows: torch.Tensor, k_lens: torch.Tensor | None) -> OurStep:
    from fantasytalking_core.sampling.euler import DiTConditions, guided_velocity
    from fantasytalking_core.sampling.guidance import NEG, POS, POS_AUDIO, GuidanceConfig

    names = {NEG: "u", POS: "p", POS_AUDIO: "pa"}
    passes: dict[str, torch.Tensor] = {}

    def keep(_step: int, preds: dict) -> None:
        passes.update({names[k]: v for k, v in preds.items()})

    cond = DiTConditions(inputs.text_pos[None], inputs.text_neg[None], inputs.clip, inputs.y, audio_windows, k_lens,
                         AUDIO_SCALE)
    guidance = GuidanceConfig(cfg=CFG, audio_cfg=AUDIO_CFG)
    return OurStep(guided_velocity(model, cond, guidance, STEPS, on_passes=keep), passes)


# ====================================================================================================================
# Timing, comparison
# ====================================================================================================================


def measure_step(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int
                 ) -> tuple[dict[str, Any], Any]:
    """:func:`harness.measure` of one sampling step, with the per-pass and 30-step figures derived from it."""
    result, out = measure(fn, device, warmup, repeats)
    result["per_pass_s"] = result["median_s"] / len(PASSES)
    result[f"est_{STEPS}_steps_s"] = STEPS * result["median_s"]
    return result, out


def relative_l2(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    return float((ours - ref).norm() / ref.norm())


def compare(ours_guided: torch.Tensor, ours_passes: dict[str, torch.Tensor], ref_guided: torch.Tensor,
            ref_passes: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Relative L2 (and max abs) error of our guided velocity and of each pass against the official ones."""
    diff = ours_guided.cpu().double() - ref_guided.cpu().double()
    found: dict[str, Any] = {"guided_rel_l2": relative_l2(ours_guided, ref_guided),
                             "guided_max_abs": float(diff.abs().max())}
    for name in PASSES:
        found[f"{name}_rel_l2"] = relative_l2(ours_passes[name], ref_passes[name])
    return found


def to_cpu(guided: torch.Tensor, passes: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return guided.detach().float().cpu(), {k: v.detach().float().cpu().reshape(guided.shape) for k, v in passes.items()}


# ====================================================================================================================
# Run
# ====================================================================================================================


@dataclass
class Run:
    """State shared by the phases."""

    args: argparse.Namespace
    scale: Scale
    device: torch.device
    dtype: torch.dtype
    deadline: float
    report: Report
    official: Official | None = None
    off_dit: nn.Module | None = None
    off_adapter: nn.Module | None = None
    unwrapped: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    inputs: Inputs | None = None
    model: nn.Module | None = None
    official_out: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
    ours_out: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
    ours_windows: torch.Tensor | None = None
    ours_k_lens: torch.Tensor | None = None
    failed: list[str] = field(default_factory=list)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def step_cost(self) -> float:
        """Seconds one timed measurement (warm-up + repeats) should take: the official one measured, else a guess."""
        step = self.report.data["phases"].get("official_infer_placement", {}).get("median_s", self.scale.est_step_s)
        return (self.args.warmup + self.args.repeats) * step


def phase(run: Run, name: str, fn: Callable[[], dict[str, Any]]) -> bool:
    """Run one phase, record its result or its error; True when it ran."""
    log(f"== {name} ({run.remaining():.0f} s of budget left)")
    start = time.perf_counter()
    try:
        result = {"status": "ok", **fn()}
    except SkipPhase as exc:
        result = {"status": f"skipped: {exc}"}
    except Exception as exc:  # noqa: BLE001 - record and go on where the next phases can
        run.failed.append(name)
        tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": tail[-3000:]}
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    result["phase_wall_s"] = time.perf_counter() - start
    run.report.record(name, result)
    log(f"-> {name}: {json.dumps({k: v for k, v in result.items() if k != 'traceback'}, default=str)[:1200]}")
    return result["status"] == "ok"


class SkipPhase(Exception):
    """A phase that cannot or need not run (recorded as skipped)."""


def phase_environment(run: Run) -> dict[str, Any]:
    import diffusers

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "diffusers": diffusers.__version__, "cuda": torch.version.cuda, "device": str(run.device)}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    if run.device.type == "cuda":
        props = torch.cuda.get_device_properties(run.device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", total_gib=props.total_memory / GIB,
                   cudnn=torch.backends.cudnn.version())
    return env


def phase_official_import(run: Run) -> dict[str, Any]:
    run.official = import_official(run.args.official_dir)
    mode = run.args.official_attention
    if mode == "auto":
        mode = "native" if run.device.type == "cuda" and run.dtype != torch.float32 else "masked"
    if mode == "native" and run.device.type != "cuda":
        raise ValueError("--official-attention native needs CUDA (the official flash_attention asserts it)")
    install_official_attention(run.official, mode, run.dtype)
    islands = "cuda autocast (as official)"
    if run.device.type != "cuda" and run.dtype != torch.float32:
        run.official.dit.amp = AutocastOn(run.device.type)
        islands = f"emulated on {run.device.type} (AutocastOn: float32 linears and LayerNorms)"
    return {"dir": str(run.official.root), "written_against_commit": OFFICIAL_COMMIT, "attention": mode,
            **flash_attn_available(run.official), "audio_padding": run.official.audio_mask,
            "float32_islands": islands,
            "shells": ["diffsynth", "diffsynth.models", "diffsynth.schedulers"]}


def phase_build(run: Run) -> dict[str, Any]:
    start = time.perf_counter()
    run.off_dit, run.off_adapter = build_official(run.official, run.scale, run.dtype, run.device, run.args.seed)
    official_vram_management(run.official, run.off_dit, str(run.device), run.dtype)
    run.unwrapped = unwrapped_parameters(run.official, run.off_dit)
    synchronize(run.device)
    params = list(run.off_dit.parameters()) + list(run.off_adapter.parameters())
    return {
        "seconds": time.perf_counter() - start,
        "parameters": sum(p.numel() for p in params),
        "weight_gib": sum(p.numel() * p.element_size() for p in params) / GIB,
        "unwrapped_parameters": len(run.unwrapped),
        "unwrapped_examples": [n for n, _ in run.unwrapped[:3]],
        "unwrapped_mib": sum(p.numel() * p.element_size() for _, p in run.unwrapped) / 2**20,
        "allocated_gib": allocated_gib(run.device),
    }


def phase_inputs(run: Run) -> dict[str, Any]:
    from fantasytalking_core.sampling.schedule import sigmas_to_timesteps

    if run.off_adapter is None:
        raise SkipPhase("the official model was not built")
    run.inputs = make_inputs(run.official, run.off_adapter, run.scale, run.dtype, run.device, run.args.seed)
    i, audio = run.inputs, run.inputs.official_audio
    return {"latents": list(i.latents.shape), "y": list(i.y.shape), "text_pos": list(i.text_pos.shape),
            "text_neg": list(i.text_neg.shape), "clip": list(i.clip.shape), "audio_features": list(i.features.shape),
            "audio_windows": list(audio["audio_proj"].shape),
            "audio_context_lens": audio["audio_context_lens"].tolist(),
            "timestep": float(i.timestep[0]), "sigma": float(i.sigma),
            "timestep_equals_ours": bool(torch.equal(i.timestep.cpu(), sigmas_to_timesteps(i.sigma).reshape(1))),
            "video_tokens": i.latents.shape[2] * i.latents.shape[3] * i.latents.shape[4] // 4}


def time_official(run: Run, placement: str) -> dict[str, Any]:
    if run.off_dit is None or run.inputs is None:
        raise SkipPhase("the official model or the inputs were not built")
    needed = 2 * run.step_cost() + run.step_cost() / (run.args.warmup + run.args.repeats) + run.scale.est_step_s * 3
    if placement == "gpu" and run.remaining() < run.step_cost() + needed:
        raise SkipPhase(f"budget: {run.remaining():.0f} s left; ours and the check still need about {needed:.0f} s")
    place_unwrapped(run.unwrapped, "cpu" if placement == "infer" else run.device)
    free_memory(run.device)
    result, (guided, passes) = measure_step(lambda: official_step(run.off_dit, run.inputs, run.dtype), run.device,
                                       run.args.warmup, run.args.repeats)
    if placement == "infer":
        run.official_out = to_cpu(guided, passes)
    else:
        result["max_abs_vs_infer_placement"] = float((guided.float().cpu() - run.official_out[0]).abs().max()) \
            if run.official_out else None
    placed = "cpu" if placement == "infer" else str(run.device)
    return {**result, "unwrapped_on": placed, "finite": bool(torch.isfinite(guided).all())}


def phase_convert(run: Run) -> dict[str, Any]:
    if run.off_dit is None or run.inputs is None:
        raise SkipPhase("the official model was not built")
    start = time.perf_counter()
    before = allocated_gib(run.device)
    run.model = convert_to_ours(run.off_dit, run.off_adapter, run.scale, run.device)
    # the same projection weights, our window code: the windows must equal the official ones
    from fantasytalking_core.audio.windows import audio_windows_for_frames, gather_audio_windows
    from fantasytalking_core.model.transformer import resolve_config

    windows = audio_windows_for_frames(run.inputs.features.shape[1], run.scale.num_frames, expand=EXPAND)
    with torch.no_grad():
        run.ours_windows = gather_audio_windows(run.model.project_audio(run.inputs.features), windows)
    run.ours_k_lens = windows.k_lens_tensor().to(run.device)
    official = run.inputs.official_audio
    window_diff = float((run.ours_windows - official["audio_proj"].to(run.ours_windows.dtype)).abs().max())
    k_lens_equal = windows.k_lens == tuple(official["audio_context_lens"].tolist())
    # free the official model: our model holds the (shared) weight tensors now
    run.off_dit = run.off_adapter = None
    run.unwrapped = []
    free_memory(run.device)
    params = list(run.model.parameters())
    return {"seconds": time.perf_counter() - start, "allocated_gib_before": before,
            "allocated_gib_after_freeing_official": allocated_gib(run.device),
            "parameters": sum(p.numel() for p in params),
            "fp32_parameters": sum(p.numel() for p in params if p.dtype == torch.float32),
            "precision_policy": run.model.precision,
            "config": resolve_config(run.scale.wan_config),
            "config_is_bundled_720p": resolve_config(run.scale.wan_config) == resolve_config("wan2.1_i2v_14b_720p"),
            "audio_windows_max_abs_diff": window_diff, "k_lens_equal": k_lens_equal}


def phase_ours(run: Run) -> dict[str, Any]:
    if run.model is None:
        raise SkipPhase("our model was not built")
    step = our_step(run.model, run.inputs, run.ours_windows, run.ours_k_lens)  # our default: padding masked
    free_memory(run.device)
    result, guided = measure_step(lambda: step.velocity(run.inputs.latents, 0, run.inputs.sigma), run.device,
                             run.args.warmup, run.args.repeats)
    run.ours_out = to_cpu(guided, step.passes)
    return {**result, "audio_padding": "masked", "finite": bool(torch.isfinite(guided).all())}


def phase_check(run: Run) -> dict[str, Any]:
    if run.official_out is None or run.ours_out is None:
        raise SkipPhase("an official or our step did not run")
    ref_guided, ref_passes = run.official_out
    found: dict[str, Any] = {"official_audio_padding": run.official.audio_mask}
    if run.official.audio_mask == "masked":
        ours = run.ours_out
    else:  # the official run attended the padded window slots: our model the same way (k_lens=None), untimed
        found["vs_ours_default_masked"] = compare(*run.ours_out, ref_guided, ref_passes)
        step = our_step(run.model, run.inputs, run.ours_windows, None)
        with torch.no_grad():
            ours = to_cpu(step.velocity(run.inputs.latents, 0, run.inputs.sigma), step.passes)
    found.update(compare(*ours, ref_guided, ref_passes))
    tolerance = TOLERANCE.get(run.dtype, 5e-2)
    found["tolerance"] = tolerance
    found["passed"] = found["guided_rel_l2"] < tolerance
    # how much each guidance term weighs (a mapping error in a branch that weighs nothing would go unseen)
    u, p, pa = (ref_passes[n].double() for n in PASSES)
    found["official_text_term_rel"] = float((p - u).norm() / pa.norm())
    found["official_audio_term_rel"] = float((pa - p).norm() / pa.norm())
    if not found["passed"]:
        run.failed.append("check")
    return found


def print_summary(run: Run) -> None:
    phases = run.report.data["phases"]
    rows = [("official, weights as infer.py places them", "official_infer_placement"),
            ("official, every weight on the device", "official_all_on_device"),
            ("ours (guided_velocity, official precision)", "ours")]
    log("\n" + f"{'one sampling step (3 DiT passes)':46} {'median s':>9} {'per pass':>9} {'peak GiB':>9} "
        f"{'speed-up':>11}")
    base = phases.get("official_infer_placement", {}).get("median_s")
    for label, key in rows:
        r = phases.get(key, {})
        if "median_s" not in r:
            log(f"{label:46} {r.get('status', 'not run')[:40]}")
            continue
        peak = f"{r['peak_gib']:9.2f}" if isinstance(r.get("peak_gib"), float) else f"{'-':>9}"
        ratio = f"{base / r['median_s']:10.2f}x" if base else f"{'-':>11}"
        log(f"{label:46} {r['median_s']:9.3f} {r['per_pass_s']:9.3f} {peak} {ratio}")
    check = phases.get("check", {})
    if "guided_rel_l2" in check:
        log(f"check (ours vs official, {run.dtype}, official audio padding {check['official_audio_padding']}): "
            f"guided rel L2 {check['guided_rel_l2']:.3e} (tolerance {check['tolerance']:.0e}, "
            f"{'PASS' if check['passed'] else 'FAIL'}); passes u {check['u_rel_l2']:.3e}, p {check['p_rel_l2']:.3e}, "
            f"pa {check['pa_rel_l2']:.3e}")
        if "vs_ours_default_masked" in check:
            log(f"  against our default (padding masked): guided rel L2 "
                f"{check['vs_ours_default_masked']['guided_rel_l2']:.3e}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_official.json"), help="JSON file for all results")
    parser.add_argument("--budget-s", type=float, default=300.0, help="time budget of the whole run in seconds")
    parser.add_argument("--tiny", action="store_true", help="tiny DiT and inputs (runs on a CPU in seconds)")
    parser.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="weights and compute (default: bf16 as the official run; fp32 with --tiny)")
    parser.add_argument("--official-dir", type=Path, default=DEFAULT_OFFICIAL_DIR,
                        help="the exported official code (git-ignored, never committed)")
    parser.add_argument("--official-attention", choices=("auto", "native", "masked", "unmasked"), default="auto",
                        help="official attention functions as they are, or exact SDPA with/without the audio mask")
    parser.add_argument("--init-std", type=float, default=None, help="std of the random weights (default per scale)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps per side")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per side")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("fp32" if args.tiny else "bf16")]
    scale = tiny_scale() if args.tiny else full_scale()
    if args.init_std is not None:
        scale = dataclasses.replace(scale, init_std=args.init_std)
    report = Report(args.out, {"argv": sys.argv, "scale": scale.name, "device": str(device), "dtype": str(dtype),
                               "budget_s": args.budget_s, "warmup": args.warmup, "repeats": args.repeats,
                               "seed": args.seed, "init_std": scale.init_std, "wan_config": scale.wan_config,
                               "proj_dim": scale.proj_dim, "num_frames": scale.num_frames, "steps": STEPS,
                               "cfg": CFG, "audio_cfg": AUDIO_CFG, "audio_scale": AUDIO_SCALE}, group="phases")
    if device.type != "cuda" and not args.tiny:
        report.note("error", "the full-size run needs CUDA; use --tiny to check the script on a CPU")
        log("no CUDA: the 14B model needs a GPU; run with --tiny to check the script on a CPU")
        return 2
    if not (args.official_dir / "model.py").is_file():
        log(f"the official code is missing: export it into {args.official_dir} (see the module docstring)")
        report.note("error", f"official code missing in {args.official_dir}")
        return 2
    if device.type == "cpu":
        warnings.filterwarnings("ignore", message=".*CUDA is not available.*")  # the official cuda autocast contexts
        torch.set_num_threads(1)  # a smoke test: one thread is steadier than oversubscribed cores on a shared machine
    run = Run(args, scale, device, dtype, started + args.budget_s, report)
    current = {"name": "start"}
    watchdog = start_watchdog(report, current, args.budget_s + WATCHDOG_GRACE_S, part="phase")
    plan: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("environment", lambda: phase_environment(run)),
        ("official_import", lambda: phase_official_import(run)),
        ("build", lambda: phase_build(run)),
        ("inputs", lambda: phase_inputs(run)),
        ("official_infer_placement", lambda: time_official(run, "infer")),
        ("official_all_on_device", lambda: time_official(run, "gpu")),
        ("convert", lambda: phase_convert(run)),
        ("ours", lambda: phase_ours(run)),
        ("check", lambda: phase_check(run)),
    ]
    for name, fn in plan:
        current["name"] = name
        ok = phase(run, name, fn)
        if not ok and name == "official_import":
            break
    watchdog.cancel()
    report.note("total_s", time.monotonic() - started)
    report.note("failed", run.failed)
    print_summary(run)
    if device.type != "cuda":
        log("(CPU timings of a smoke test say nothing about GPU speed)")
    log(f"results: {args.out}")
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
