"""model/limits.py: the frame count and frame size caps are the DiT's real reach, and say why."""

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from fantasytalking_core.audio.rules import frames_for_duration
from fantasytalking_core.errors import SettingsError
from fantasytalking_core.media.image import frame_size
from fantasytalking_core.model.limits import MAX_FRAMES, MAX_IMAGE_SIZE, MAX_VIDEO_FRAMES, ROPE_MAX_SEQ_LEN
from fantasytalking_core.sampling.segments import SegmentOptions
from fantasytalking_core.model.transformer import resolve_config
from fantasytalking_core.pipeline import GenerationSettings


def rope_fits(latent_frames: int, latent_height: int, latent_width: int) -> bool:
    """Whether diffusers' Wan RoPE (bundled 14B config: head dim 128, 1x2x2 patches) places this latent."""
    config = resolve_config("wan2.1_i2v_14b_720p")
    assert config["rope_max_seq_len"] == ROPE_MAX_SEQ_LEN
    rope = WanRotaryPosEmbed(config["attention_head_dim"], config["patch_size"], config["rope_max_seq_len"])
    try:
        rope(torch.empty(1, 1, latent_frames, latent_height, latent_width, device="meta"))
    except RuntimeError:
        return False
    return True


def test_the_caps_are_where_the_rotary_table_ends():
    latent_frames = (MAX_FRAMES - 1) // 4 + 1
    assert rope_fits(latent_frames, 2, 2) and not rope_fits((MAX_FRAMES + 4 - 1) // 4 + 1, 2, 2)
    width, height = frame_size(MAX_IMAGE_SIZE, 100, MAX_IMAGE_SIZE)
    assert rope_fits(1, height // 8, width // 8)
    width, height = frame_size(MAX_IMAGE_SIZE + 1, 100, MAX_IMAGE_SIZE + 1)  # rounds up to the next 16 pixels
    assert not rope_fits(1, height // 8, width // 8)


def test_largest_allowed_settings_pass_and_the_next_are_refused_with_the_reason():
    GenerationSettings(max_frames=MAX_FRAMES, image_size=MAX_IMAGE_SIZE)
    assert frames_for_duration(1e6, 23, MAX_FRAMES) == MAX_FRAMES == 4093
    with pytest.raises(SettingsError, match=r"max_frames 4097 is above 4093.*position table.*at most 4093"):
        GenerationSettings(max_frames=MAX_FRAMES + 4)
    # a whole video may be longer than a clip (Audio Encode's cap): it is made in segments of at most 4093 frames
    assert frames_for_duration(1e6, 23, MAX_FRAMES + 4) == MAX_FRAMES + 4
    assert frames_for_duration(1e7, 23, None) > MAX_VIDEO_FRAMES
    with pytest.raises(SettingsError, match=r"max_frames 16777221 is above 16777217"):
        frames_for_duration(1.0, 23, MAX_VIDEO_FRAMES + 4)
    with pytest.raises(ValueError, match=r"segment_frames 4097 is above 4093.*at most 4093"):
        SegmentOptions(segment_frames=MAX_FRAMES + 4)
    SegmentOptions(segment_frames=MAX_FRAMES)
    with pytest.raises(SettingsError, match=r"image_size 16385 is above 16384 pixels.*at most 16384"):
        GenerationSettings(image_size=MAX_IMAGE_SIZE + 1)
