import av
import pytest
import torch

from fantasytalking_core.media.video import write_video


def probe(path):
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], (c.streams.audio[0] if c.streams.audio else None)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        return v.codec_context.name, float(v.average_rate), frames, a


def test_h264_frames_fps_and_aac_trimmed_to_the_video(tmp_path):
    frames = torch.zeros(9, 32, 48, 3)
    frames[:, :, :, 0] = torch.linspace(0, 1, 9).view(9, 1, 1)  # red ramps up frame by frame
    audio = torch.randn(2, 16000 * 3).clamp(-1, 1) * 0.1  # 3 s of stereo, longer than the 9/23 s video
    path = write_video(tmp_path / "out.mp4", frames, 23, audio, 16000)
    codec, fps, decoded, a = probe(path)
    assert (codec, fps, len(decoded)) == ("h264", 23.0, 9) and decoded[0].shape == (32, 48, 3)
    assert decoded[0][..., 0].mean() < 10 and decoded[-1][..., 0].mean() > 240
    assert a.codec_context.name == "aac" and a.channels == 2
    assert abs(float(a.duration * a.time_base) - 9 / 23) < 0.07  # one AAC frame of slack


def test_odd_sizes_are_padded_and_shapes_checked(tmp_path):
    path = write_video(tmp_path / "odd.mp4", torch.rand(5, 31, 45, 3), 25)
    assert probe(path)[2][0].shape == (32, 46, 3)
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        write_video(tmp_path / "bad.mp4", torch.rand(5, 3, 32, 32), 25)
