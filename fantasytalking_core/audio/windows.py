"""Which audio tokens each latent frame hears: the official window arithmetic, as pure functions.

FantasyTalking gives every latent frame (4 video frames, the first one alone) a window of wav2vec2 tokens
centred on it, widened by ``expand`` tokens on both sides. Windows past either end of the sequence keep their
valid tokens at the start and are zero-padded at the END (never the front), and ``k_lens`` counts the valid
tokens so attention leaves the padding out. The float and integer arithmetic below is the official
``split_audio_sequence`` / ``split_tensor_with_padding`` to the bit, including its truncations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_EXPAND = 4  # tokens added on both sides of each window (infer.py: expand_length=4)


def latent_frame_count(num_frames: int) -> int:
    """Latent frames for ``num_frames`` video frames (Wan's VAE: the first frame, then groups of 4)."""
    return (num_frames - 1) // 4 + 1


@dataclass(frozen=True)
class AudioWindows:
    """Audio windows of one clip.

    Attributes:
        pos_idx_ranges: per latent frame, the inclusive [start, end] centre range (may lie outside [0, L-1]).
        expanded_ranges: the same widened by ``expand`` on both sides (inclusive).
        k_lens: per latent frame, the number of valid (non-padded) tokens in its window.
        token_indices: [F, W] source token of every window slot, -1 for zero padding (always at the end).
        valid_tokens: tokens that exist (= num_tokens for a whole clip; fewer for a segment whose audio slice runs
            past the end of the recording, see ``audio/timeline.py``); the rest are padding.
    """

    num_tokens: int
    num_frames: int
    tokens_per_frame: float
    half_tokens: int
    pos_idx_ranges: tuple[tuple[int, int], ...]
    expanded_ranges: tuple[tuple[int, int], ...]
    k_lens: tuple[int, ...]
    token_indices: tuple[tuple[int, ...], ...]
    valid_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.valid_tokens is None:
            object.__setattr__(self, "valid_tokens", self.num_tokens)

    @property
    def window_len(self) -> int:
        return len(self.token_indices[0])

    def k_lens_tensor(self) -> torch.Tensor:
        """k_lens as an int64 tensor [F]."""
        return torch.tensor(self.k_lens, dtype=torch.long)


def split_audio_sequence(num_tokens: int, num_frames: int) -> tuple[list[list[int]], float, int]:
    """Centre ranges of the audio tokens for each latent frame (official ``split_audio_sequence``).

    Args:
        num_tokens: L, wav2vec2 tokens of the clip (about 50 per second).
        num_frames: N, video frames (4n+1).
    Returns:
        (pos_idx_ranges, tokens_per_frame, half_tokens): inclusive [start, end] per latent frame.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}: the audio gave no wav2vec2 token.")
    if num_frames < 5 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 4n+1 and >= 5, got {num_frames}.")
    tokens_per_frame = num_tokens / num_frames
    half_tokens = int(tokens_per_frame * 4 / 2)
    centres = [0]
    for i in range(1, latent_frame_count(num_frames)):
        start = tokens_per_frame * ((i - 1) * 4 + 1)
        end = tokens_per_frame * (i * 4 + 1)
        centres.append(int((start + end) / 2) - 1)
    ranges = [[c - half_tokens, c + half_tokens] for c in centres]
    # the first window ends where the second one's range starts and keeps the common width
    ranges[0] = [-(half_tokens * 2 - ranges[1][0]), ranges[1][0]]
    return ranges, tokens_per_frame, half_tokens


def audio_windows_for_frames(num_tokens: int, num_frames: int, expand: int = DEFAULT_EXPAND,
                             valid_tokens: int | None = None) -> AudioWindows:
    """Windows, valid lengths and slot -> token indices for a clip of ``num_tokens`` and ``num_frames``.

    ``valid_tokens`` (default ``num_tokens``): only the first ``valid_tokens`` exist; slots past them are end
    padding, exactly like slots past the end of a whole clip (a segment's slice that outlasts the recording);
    a window with no existing token keeps the last one.
    """
    ranges, tokens_per_frame, half_tokens = split_audio_sequence(num_tokens, num_frames)
    valid_tokens = num_tokens if valid_tokens is None else valid_tokens
    if not 1 <= valid_tokens <= num_tokens:
        raise ValueError(f"valid_tokens must be in [1, {num_tokens}], got {valid_tokens}.")
    last = valid_tokens - 1
    expanded, k_lens, indices = [], [], []
    for start, end in ranges:
        start, end = start - expand, end + expand
        valid = list(range(max(start, 0), min(end, last) + 1))
        if not valid and valid_tokens < num_tokens:
            # a window wholly past the end of a recording (the frame rule's extra frames at low fps) hears the
            # last token rather than nothing: attention over no key at all is undefined
            valid = [last]
        expanded.append((start, end))
        k_lens.append(len(valid))
        indices.append(tuple(valid + [-1] * (end - start + 1 - len(valid))))
    return AudioWindows(
        num_tokens=num_tokens,
        num_frames=num_frames,
        tokens_per_frame=tokens_per_frame,
        half_tokens=half_tokens,
        pos_idx_ranges=tuple(tuple(r) for r in ranges),
        expanded_ranges=tuple(expanded),
        k_lens=tuple(k_lens),
        token_indices=tuple(indices),
        valid_tokens=valid_tokens,
    )


def gather_audio_windows(tokens: torch.Tensor, windows: AudioWindows) -> torch.Tensor:
    """Cut the token sequence into per-frame windows, zero-padded at the end.

    Args:
        tokens: [B, L, C] audio tokens, L = ``windows.valid_tokens`` (projected or not; windowing commutes with a
            per-token projection).
    Returns:
        [B, F, W, C] with F latent frames and W = ``windows.window_len`` slots.
    """
    if tokens.shape[1] != windows.valid_tokens:
        raise ValueError(f"tokens have {tokens.shape[1]} positions but the windows were made for "
                         f"{windows.valid_tokens}.")
    index = torch.tensor(windows.token_indices, device=tokens.device)  # [F, W]
    index = torch.where(index < 0, windows.valid_tokens, index)  # padding slots read the zero row appended at L
    padded = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], 1, tokens.shape[2])], dim=1)
    return padded[:, index]  # [B, F, W, C]
