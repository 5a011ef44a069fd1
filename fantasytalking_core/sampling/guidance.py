"""Three-pass audio/text classifier-free guidance of FantasyTalking, as pure functions.

Per step the official pipeline evaluates the DiT three times:
  u  = negative prompt, audio off;  p = positive prompt, audio off;  pa = positive prompt, audio on,
and combines ``eps = u + s_p * (p - u) + s_a * (pa - p)``. With ``s_p == 1`` (step-distilled LoRAs) the
negative pass is pointless and two passes give ``eps = p + s_a * (pa - p)``. Outside the audio-guidance step
range there is no separate audio pass: ``eps = u + s_p * (pa - u)`` (audio stays on in the positive pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GuidanceConfig:
    """Guidance scales and where audio guidance applies.

    Attributes:
        cfg: text guidance scale s_p (1 disables the negative-prompt pass).
        audio_cfg: audio guidance scale s_a.
        audio_start, audio_end: fraction of the steps [start, end) that get audio guidance (default: all).
    """

    cfg: float = 5.0
    audio_cfg: float = 5.0
    audio_start: float = 0.0
    audio_end: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.audio_start <= self.audio_end <= 1.0:
            raise ValueError(f"audio guidance range must satisfy 0 <= start <= end <= 1, got "
                             f"[{self.audio_start}, {self.audio_end}].")


# The passes a step needs, named by (prompt, audio on).
NEG = ("negative", False)
POS = ("positive", False)
POS_AUDIO = ("positive", True)


def audio_guidance_active(step: int, num_steps: int, config: GuidanceConfig) -> bool:
    """Whether step ``step`` (0-based) of ``num_steps`` lies in the audio-guidance range."""
    return config.audio_start <= step / num_steps < config.audio_end


def passes_for_step(step: int, num_steps: int, config: GuidanceConfig) -> tuple[tuple[str, bool], ...]:
    """The DiT passes one step needs, in a fixed order (negative, positive, positive+audio)."""
    passes = []
    audio_guided = audio_guidance_active(step, num_steps, config)
    if config.cfg != 1.0:
        passes.append(NEG)
    if audio_guided:
        passes.append(POS)
    passes.append(POS_AUDIO)
    return tuple(passes)


def max_passes(num_steps: int, config: GuidanceConfig) -> int:
    """The most DiT passes any step of a ``num_steps`` run needs (3 with text and audio guidance; fewer without)."""
    return max(len(passes_for_step(step, num_steps, config)) for step in range(num_steps))


def passes_in_run(num_steps: int, config: GuidanceConfig) -> tuple[tuple[str, bool], ...]:
    """Every pass some step of the run needs, in the order a parallel run deals them to its groups
    (``runtime.parallel.ParallelRun.map_passes``): positive+audio (in every step) first, then negative, then
    positive, so that the passes of a step spread over the groups whichever of them it runs."""
    needed = {p for step in range(num_steps) for p in passes_for_step(step, num_steps, config)}
    return tuple(p for p in (POS_AUDIO, NEG, POS) if p in needed)


def combine_guidance(preds: dict[tuple[str, bool], torch.Tensor], config: GuidanceConfig) -> torch.Tensor:
    """Guided velocity from the passes :func:`passes_for_step` asked for (same arithmetic order as official)."""
    pos_audio = preds[POS_AUDIO]
    if POS in preds:  # audio guidance on
        pos = preds[POS]
        if NEG in preds:
            neg = preds[NEG]
            return neg + config.cfg * (pos - neg) + config.audio_cfg * (pos_audio - pos)
        return pos + config.audio_cfg * (pos_audio - pos)
    if NEG in preds:
        neg = preds[NEG]
        return neg + config.cfg * (pos_audio - neg)
    return pos_audio


def step_of_sigma(sample_sigmas: torch.Tensor, sigma: torch.Tensor | float) -> int:
    """0-based index of the step evaluated at noise level ``sigma`` in a run over ``sample_sigmas`` [steps + 1]
    (a sampler calls its model at ``sample_sigmas[i]``, i < steps; the nearest level counts, for rounding)."""
    sigma = float(torch.as_tensor(sigma).reshape(-1)[0])
    levels = (sample_sigmas.detach().cpu().double() if isinstance(sample_sigmas, torch.Tensor)  # float64: not on MPS
              else torch.as_tensor(sample_sigmas, dtype=torch.float64)).reshape(-1)[:-1]
    return int((levels - sigma).abs().argmin())
