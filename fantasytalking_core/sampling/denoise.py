"""The denoising run shared by the pipeline and the ComfyUI sampler node: conditions in, a denoised latent out.

Every choice arrives as an explicit argument (guidance scales, the sigma schedule, the seed, the audio strength);
``pipeline.sample_latents`` is the one place a user's ``GenerationSettings`` become these arguments.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import NonFiniteError
from ..audio.windows import audio_windows_for_frames, gather_audio_windows, latent_frame_count
from ..model.transformer import FantasyTalkingModel
from .euler import DiTConditions, PassMap, PinnedLatents, guided_velocity, initial_noise, sample_flow_euler
from .guidance import GuidanceConfig
from .step_cache import StepCache, check_step_cache

ProgressFn = Callable[[int, int], None]


def check_finite(latents: torch.Tensor, step: int, steps: int, dtype: torch.dtype) -> None:
    """Stop at the step (0-based ``step`` of ``steps``) whose result holds NaN or infinity: every later step would
    keep it, and the decoded video would be black. ``dtype``: the DiT's compute dtype, named in the advice."""
    if bool(torch.isfinite(latents).all()):
        return
    advice = ("fp16 overflows in this model: use bf16, " if dtype == torch.float16 else "") + \
        "keep cfg, audio_cfg, shift and audio_scale near their defaults"
    raise NonFiniteError(f"sampling step {step + 1} of {steps} gave NaN or infinite values, so the video would be "
                         f"black; {advice}.")


@torch.no_grad()
def generate_latents(
    dit: FantasyTalkingModel,
    text_pos: torch.Tensor,
    text_neg: torch.Tensor | None,
    clip_tokens: torch.Tensor,
    image_latents: torch.Tensor,
    audio_features: torch.Tensor,
    num_frames: int,
    *,
    guidance: GuidanceConfig,
    sigmas: torch.Tensor,
    seed: int,
    audio_scale: float | torch.Tensor = 1.0,
    batch_passes: bool = False,
    progress: ProgressFn | None = None,
    num_audio_tokens: int | None = None,
    pinned_latents: torch.Tensor | None = None,
    step_cache: float = 0.0,
    map_passes: PassMap | None = None,
) -> torch.Tensor:
    """Denoise from seeded noise to a video latent. Runs where ``dit`` is.

    Args:
        text_pos, text_neg: [1, L, text_dim] umT5 outputs (``text_neg`` None when ``guidance.cfg`` is 1).
        clip_tokens: [1, 257, 1280] CLIP penultimate tokens of the reference.
        image_latents: [1, 20, T, H/8, W/8] the I2V conditioning y.
        audio_features: [L_audio, 768] wav2vec2 last hidden state of the cropped recording.
        num_frames: video frames (4n+1) the audio features were made for.
        guidance: text/audio guidance scales and the audio-guidance step range.
        sigmas: [steps + 1] float32 noise levels in [0, 1] ending at 0 (``schedule.flow_match_sigmas``).
        seed: seed of the initial noise (the official CPU noise for the same seed and shape).
        audio_scale: strength of the audio branch: a float, or a [S] tensor with one strength per video token
            (``face.motion.audio_scale_map``).
        batch_passes: run a step's guidance passes as one batch (faster on a big GPU).
        progress: ``(step, total)`` after every step; it may raise to interrupt.
        num_audio_tokens: tokens the window rule spans (default: the rows of ``audio_features``); more for a long
            recording's last segment whose audio slice outlasts the recording (``audio/timeline.py``): the
            missing rows are end padding.
        pinned_latents: [1, 16, P, H/8, W/8] clean latents of the first P latent frames (P < T), held on the
            forward process with the run's own noise at those frames during the whole run
            (:class:`~.euler.PinnedLatents`); the result's first P latent frames are exactly these.
        step_cache: first-block-cache threshold (``step_cache.py``): 0 runs every block (the default, bit for bit
            the uncached run); typical 0.05-0.1. The cache lives for this run only.
        map_passes: where each step's guidance passes run (:func:`~.euler.guided_velocity`); None: all here.
    Returns:
        [1, 16, T, H/8, W/8] float32 denoised latent.
    """
    threshold = check_step_cache(step_cache)
    device = dit.device
    frames, height, width = image_latents.shape[2], image_latents.shape[3] * 8, image_latents.shape[4] * 8
    if frames != latent_frame_count(num_frames):
        raise ValueError(f"image_latents has {frames} latent frames but {num_frames} video frames need "
                         f"{latent_frame_count(num_frames)}.")
    steps = len(sigmas) - 1
    windows = audio_windows_for_frames(num_audio_tokens or audio_features.shape[0], num_frames,
                                       valid_tokens=audio_features.shape[0])
    audio_tokens = gather_audio_windows(dit.project_audio(audio_features[None].to(device)), windows)
    cond = DiTConditions(text_pos.to(device), None if text_neg is None else text_neg.to(device),
                         clip_tokens.to(device), image_latents.to(device), audio_tokens,
                         windows.k_lens_tensor(),  # read as Python ints once per forward: kept on the CPU
                         audio_scale.to(device) if isinstance(audio_scale, torch.Tensor) else audio_scale)
    noise = initial_noise((1, dit.transformer.config.out_channels, frames, height // 8, width // 8), seed)
    cache = StepCache(threshold, steps) if threshold > 0 else None
    velocity = guided_velocity(dit, cond, guidance, steps, batch_passes=batch_passes, step_cache=cache,
                               map_passes=map_passes)

    def on_step(state: dict) -> None:
        check_finite(state["x"], state["i"], steps, dit.dtype)
        if progress is not None:
            progress(state["i"] + 1, steps)

    pinned = None
    if pinned_latents is not None:
        count = pinned_latents.shape[2]
        pinned = PinnedLatents(pinned_latents.float().to(device), noise[:, :, :count].to(device))
    return sample_flow_euler(velocity, noise.to(device), sigmas, on_step, pinned)
