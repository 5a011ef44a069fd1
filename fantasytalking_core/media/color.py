"""CIE Lab conversion and Lab statistics transfer (Reinhard et al. 2001), in torch, for colour drift of long videos.

Frames are ComfyUI IMAGE-layout tensors [..., 3] of sRGB in 0..1; Lab uses the D65 white point (L in 0..100).
"""

from __future__ import annotations

import torch

# sRGB (linear) -> CIE XYZ, D65 (IEC 61966-2-1)
_RGB_TO_XYZ = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                            [0.2126729, 0.7151522, 0.0721750],
                            [0.0193339, 0.1191920, 0.9503041]], dtype=torch.float64)
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
_EPS = 216 / 24389  # CIE: where the cube root meets its linear segment
_KAPPA = 24389 / 27


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB [..., 3] in 0..1 -> Lab [..., 3] (L 0..100, a and b about -128..127), computed in float64."""
    x = rgb.to(torch.float64).clamp(0, 1)
    linear = torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    xyz = (linear @ _RGB_TO_XYZ.T.to(x.device)) / _WHITE_D65.to(x.device)
    f = torch.where(xyz > _EPS, xyz.clamp_min(_EPS) ** (1 / 3), (_KAPPA * xyz + 16) / 116)
    return torch.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Lab [..., 3] -> sRGB [..., 3] float64, clamped to 0..1 (the inverse of :func:`rgb_to_lab` in gamut)."""
    lab = lab.to(torch.float64)
    fy = (lab[..., 0] + 16) / 116
    f = torch.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    xyz = torch.where(f ** 3 > _EPS, f ** 3, (116 * f - 16) / _KAPPA) * _WHITE_D65.to(lab.device)
    linear = (xyz @ torch.linalg.inv(_RGB_TO_XYZ).T.to(lab.device)).clamp(0, 1)
    return torch.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055).clamp(0, 1)


def lab_stats(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation [3] of the Lab values of every pixel of ``rgb`` [..., 3]."""
    lab = rgb_to_lab(rgb).reshape(-1, 3)
    return lab.mean(0), lab.std(0, correction=0)


def match_color(frames: torch.Tensor, reference: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Move the Lab mean and std of ``frames`` (all frames pooled) to those of ``reference``.

    Each Lab channel c becomes ``(x - mean_c) / std_c * ref_std_c + ref_mean_c`` (one affine map for the whole
    segment, so motion and lighting within it are kept), blended with the original by ``strength``.

    Args:
        frames: [F, H, W, 3] sRGB in 0..1.
        reference: [H', W', 3] (any size) sRGB in 0..1: the portrait.
        strength: 0 (frames returned unchanged) .. 1 (full transfer).
    Returns:
        [F, H, W, 3] float32 in 0..1.
    """
    if not 0 <= strength <= 1:
        raise ValueError(f"colour-match strength must be in 0..1, got {strength}.")
    if strength == 0:
        return frames
    lab = rgb_to_lab(frames)
    mean, std = lab.reshape(-1, 3).mean(0), lab.reshape(-1, 3).std(0, correction=0)
    ref_mean, ref_std = lab_stats(reference)
    matched = (lab - mean) / std.clamp_min(1e-6) * ref_std + ref_mean
    return lab_to_rgb(lab + strength * (matched - lab)).to(torch.float32)
