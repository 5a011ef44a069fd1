"""Flow-matching noise schedule of the official pipeline, as pure functions.

Sigmas are noise levels in [0, 1] (1 = pure noise); the DiT's timestep is ``1000 * sigma``. The official
DiffSynth ``FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True)`` spaces ``n + 1`` levels linearly
from 1 to 0, drops the final 0, then applies the shift ``s' = shift * s / (1 + (shift - 1) * s)``; all in float32.
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_SHIFT = 5.0
DEFAULT_STEPS = 30


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Time-shift sigmas in [0, 1] towards the noisy end (shift > 1 spends more steps at high noise)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_match_sigmas(num_steps: int = DEFAULT_STEPS, shift: float = DEFAULT_SHIFT,
                      denoising_strength: float = 1.0) -> torch.Tensor:
    """Sigma levels of a run: [num_steps + 1] float32, the first ``num_steps`` from the official scheduler,
    then a final 0 (the Euler target of the last step)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
    if not 0 < denoising_strength <= 1:
        raise ValueError(f"denoising_strength must be in (0, 1], got {denoising_strength}.")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}.")
    start = 1.0 * denoising_strength  # sigma_min (0) + (sigma_max (1) - sigma_min) * strength
    sigmas = shift_sigmas(torch.linspace(start, 0.0, num_steps + 1)[:-1], shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sigmas_to_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """DiT timesteps in [0, 1000] for sigmas in [0, 1] (float32)."""
    return sigmas * NUM_TRAIN_TIMESTEPS
