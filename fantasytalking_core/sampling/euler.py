"""The sampling loop: Euler on the flow-matching velocity, with FantasyTalking's guided velocity.

``sample_flow_euler`` is a small k-diffusion-style loop over sigma pairs; guidance wraps the model
(:func:`guided_velocity`) and leaves the loop alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..model.adapter import AudioConditioning
from ..model.transformer import FantasyTalkingModel, pad_text
from .guidance import POS_AUDIO, GuidanceConfig, combine_guidance, passes_for_step, passes_in_run
from .schedule import sigmas_to_timesteps
from .step_cache import StepCache

VelocityFn = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
StepCallback = Callable[[dict], None]
Pass = tuple[str, bool]
# (passes, evaluate, like, run_passes) -> the passes' velocities in order: where a step's passes are computed (one
# process, or spread over ranks and gathered: runtime.parallel.ParallelRun.map_passes); ``like`` is one velocity
# [C, T, h, w]; ``run_passes`` every pass of the run (guidance.passes_in_run), so a pass keeps its rank every step
PassMap = Callable[[tuple[Pass, ...], Callable[[tuple[Pass, ...]], list[torch.Tensor]], torch.Tensor,
                    tuple[Pass, ...]], list[torch.Tensor]]


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Seeded float32 noise, identical to the official ``rand_device='cpu'`` noise for the same seed and shape."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


@dataclass(frozen=True)
class PinnedLatents:
    """Known first latent frames held on flow matching's forward process while the rest is sampled.

    At noise level sigma (in [0, 1]) the first P latent frames of the sample are replaced by
    ``sigma * noise + (1 - sigma) * latents`` (the forward process x_sigma of the known clean latents with one fixed
    noise), so the model always sees them at the step's noise level, and at sigma = 0 they are the known latents
    exactly. InfiniteTalk chains its clips this way (it draws new noise each step; here the noise is fixed).

    Attributes:
        latents: [B, C, P, h, w] float32 clean (normalized) latents of the known frames.
        noise: [B, C, P, h, w] float32 the fixed noise (the run's own seeded noise at those frames).
    """

    latents: torch.Tensor
    noise: torch.Tensor

    def __post_init__(self) -> None:
        if self.latents.shape != self.noise.shape:
            raise ValueError(f"pinned latents {tuple(self.latents.shape)} and their noise "
                             f"{tuple(self.noise.shape)} differ in shape.")

    def apply(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """x [B, C, T, h, w] with its first P latent frames set to the forward process at ``sigma`` (a copy)."""
        count = self.latents.shape[2]
        if x.shape[:2] != self.latents.shape[:2] or x.shape[3:] != self.latents.shape[3:] or x.shape[2] <= count:
            raise ValueError(f"cannot pin {tuple(self.latents.shape)} latents in a sample of {tuple(x.shape)}.")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        pinned = sigma * self.noise.to(x.device) + (1 - sigma) * self.latents.to(x.device)
        return torch.cat([pinned.to(x.dtype), x[:, :, count:]], dim=2)


@torch.no_grad()
def sample_flow_euler(
    velocity_fn: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor, callback: StepCallback | None = None,
    pinned: PinnedLatents | None = None,
) -> torch.Tensor:
    """Euler integration of dx/dsigma = v from sigmas[0] to sigmas[-1] (rectified flow, Liu et al. 2022).

    Args:
        velocity_fn: (x, step index, sigma) -> velocity, same shape as x.
        x: [B, C, T, H, W] float32 latent at sigmas[0].
        sigmas: [n + 1] float32 levels in [0, 1], ending at 0.
        callback: called after every step with ``{"i", "x", "sigma", "sigma_next", "velocity"}``; it may raise to
            interrupt the run between steps (ComfyUI's interrupt does).
        pinned: known first latent frames, set to the forward process at sigmas[0] before the first step and at
            each step's ``sigma_next`` after it (so ``x`` in the callback has them; the result has them clean).
    """
    if pinned is not None:
        x = pinned.apply(x, sigmas[0])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        velocity = velocity_fn(x, i, sigma)
        x = x + velocity * (sigma_next - sigma)
        if pinned is not None:
            x = pinned.apply(x, sigma_next)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "velocity": velocity})
    return x


@dataclass
class DiTConditions:
    """Everything the DiT sees besides the latent, fixed for a whole run.

    Attributes:
        text_pos, text_neg: [1, L, text_dim] umT5 outputs (L <= 512); ``text_neg`` may be None when cfg is 1.
        image_tokens: [1, 257, 1280] CLIP tokens of the reference.
        image_latents: [1, 20, T, h, w] I2V conditioning y.
        audio_windows: [1, F, W, P] projected audio windows (``gather_audio_windows(model.project_audio(...))``).
        k_lens: [F] valid tokens per window, or None to attend the padding (official non-flash fallback).
        audio_scale: float, or a [S] tensor with one strength per video token (S = F * h/2 * w/2).
    """

    text_pos: torch.Tensor
    text_neg: torch.Tensor | None
    image_tokens: torch.Tensor
    image_latents: torch.Tensor
    audio_windows: torch.Tensor
    k_lens: torch.Tensor | None
    audio_scale: float | torch.Tensor = 1.0


def guided_velocity(
    model: FantasyTalkingModel,
    cond: DiTConditions,
    guidance: GuidanceConfig,
    num_steps: int,
    batch_passes: bool = False,
    on_passes: Callable[[int, dict], None] | None = None,
    step_cache: StepCache | None = None,
    map_passes: PassMap | None = None,
) -> VelocityFn:
    """A velocity function running the passes each step needs and combining them (see ``guidance.py``).

    Args:
        batch_passes: run a step's passes as one batch (faster on a GPU with memory to spare) instead of one
            after another (lowest peak memory). Results agree to float rounding.
        on_passes: optional ``(step, {pass: velocity})`` hook, for inspection and parity checks.
        step_cache: this generation's first-block cache (``step_cache.py``), each pass with its own residuals; a
            batch of passes skips its blocks only when every pass may. None: every block runs.
        map_passes: where the passes run: None computes them all here; a parallel run's
            :meth:`~fantasytalking_core.runtime.parallel.ParallelRun.map_passes` computes this rank's share and
            gathers the others before the combine (with ``batch_passes``, a rank batches its own share).
    """
    if guidance.cfg != 1.0 and cond.text_neg is None:
        raise ValueError("cfg != 1 needs a negative prompt encoding (text_neg).")
    texts = {"positive": pad_text(cond.text_pos), "negative": None if cond.text_neg is None else pad_text(cond.text_neg)}

    device = cond.audio_windows.device
    scale_map = cond.audio_scale.to(device) if isinstance(cond.audio_scale, torch.Tensor) else None

    def audio_for(passes: tuple[tuple[str, bool], ...]) -> AudioConditioning:
        scale = cond.audio_scale if scale_map is None else scale_map
        if batch_passes:
            # one scale row per pass, built on the model's device (0 for the passes without audio)
            if scale_map is not None:
                scale = torch.stack([scale_map if on else torch.zeros_like(scale_map) for _, on in passes])  # [B, S]
            else:
                scale = torch.tensor([scale if on else 0.0 for _, on in passes], dtype=torch.float32, device=device)
            return AudioConditioning(cond.audio_windows, cond.k_lens, scale)
        on = passes[0][1]
        # a tensor, not a float: a compiled block sees the strength as data and never recompiles for its value
        scale = scale.unsqueeze(0) if isinstance(scale, torch.Tensor) else torch.tensor([scale], device=device)
        return AudioConditioning(cond.audio_windows, cond.k_lens, scale if on else 0.0)

    def run(x: torch.Tensor, t: torch.Tensor, step: int, passes: tuple[tuple[str, bool], ...]) -> list[torch.Tensor]:
        b = len(passes)
        text = torch.cat([texts[prompt] for prompt, _ in passes])
        pred = model(
            x.expand(b, *x.shape[1:]), t, text, cond.image_tokens.expand(b, -1, -1),
            cond.image_latents.expand(b, *cond.image_latents.shape[1:]), audio_for(passes),
            cache=None if step_cache is None else step_cache.call(step, passes),
        )
        return list(pred.float().unbind(0))

    run_passes = passes_in_run(num_steps, guidance)

    def velocity(x: torch.Tensor, step: int, sigma: torch.Tensor) -> torch.Tensor:
        t = sigmas_to_timesteps(sigma).reshape(1)
        passes = passes_for_step(step, num_steps, guidance)

        def evaluate(some: tuple[Pass, ...]) -> list[torch.Tensor]:
            if batch_passes:
                return run(x, t, step, some)
            return [run(x, t, step, (p,))[0] for p in some]

        outs = evaluate(passes) if map_passes is None else map_passes(passes, evaluate, x[0].float(), run_passes)
        preds = {p: o.unsqueeze(0) for p, o in zip(passes, outs)}
        if on_passes is not None:
            on_passes(step, preds)
        return combine_guidance(preds, guidance)

    return velocity


__all__ = ["DiTConditions", "POS_AUDIO", "PassMap", "PinnedLatents", "guided_velocity", "initial_noise",
           "sample_flow_euler"]
