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


@pytest.mark.parametrize("rate,muxed", [(192000, 48000), (176400, 48000), (37000, 44100), (22050, 22050)])
def test_a_rate_aac_refuses_is_resampled_for_the_mux(tmp_path, rate, muxed):
    # 176.4 / 192 kHz studio recordings made FFmpeg's AAC encoder fail after the whole run (avcodec_open2 error 22)
    t = torch.arange(rate) / rate
    tone = (0.5 * torch.sin(2 * torch.pi * 440 * t))[None]  # 1 s of 440 Hz, mono
    path = write_video(tmp_path / "hi.mp4", torch.rand(23, 16, 16, 3), 23, tone, rate)
    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        assert (a.codec_context.name, a.rate) == ("aac", muxed)
        assert abs(float(a.duration * a.time_base) - 1.0) < 0.07
        decoded = torch.cat([torch.from_numpy(f.to_ndarray()[0]) for f in c.decode(audio=0)])
    spectrum = torch.fft.rfft(decoded[muxed // 10: muxed // 10 + muxed // 2]).abs()  # 0.5 s: 2 Hz bins
    assert abs(int(spectrum.argmax()) * 2 - 440) <= 2  # still the same tone: resampled, not reinterpreted


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"the previous video")
    real = av.AudioFrame.from_ndarray
    calls = []

    def fail_midway(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user stops the job while the sound is muxed, after every video frame
        return real(*args, **kwargs)

    monkeypatch.setattr(av.AudioFrame, "from_ndarray", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        write_video(target, torch.rand(6, 16, 16, 3), 23, torch.zeros(1, 16000), 16000)
    assert len(calls) == 3
    assert target.read_bytes() == b"the previous video"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
    monkeypatch.setattr(av.AudioFrame, "from_ndarray", real)
    write_video(target, torch.rand(6, 16, 16, 3), 23)  # a complete write replaces it
    assert len(probe(target)[2]) == 6 and sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


def test_a_folder_that_cannot_take_the_file_is_a_clear_error_after_the_check(tmp_path):
    """The output folder passed the up-front check, then became a file before the first frame: one clear error
    (OutputWriteError, an OSError), nothing left behind."""
    from fantasytalking_core.errors import OutputWriteError
    from fantasytalking_core.media.video import VideoStreamWriter

    target = tmp_path / "later" / "out.mp4"
    writer = VideoStreamWriter(target, 23)
    (tmp_path / "later").write_bytes(b"a file where the folder was to be")
    with pytest.raises(OutputWriteError, match="cannot be written"), writer:
        writer.write(torch.rand(2, 16, 16, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["later"]


def test_crf_zero_is_lossless_and_a_crf_off_the_scale_is_refused(tmp_path):
    """crf 0 keeps the frames (grey ones, whose colour yuv420p does not subsample: up to its limited-range luma
    steps), the default keeps them closely, 51 loses more; a crf off x264's scale is one line."""
    from fantasytalking_core.errors import SettingsError

    grey = torch.rand(5, 16, 16, 1, generator=torch.Generator().manual_seed(0))
    frames = grey.expand(5, 16, 16, 3).contiguous()  # noise: nothing for H.264 to predict
    source = (frames * 255).round()
    off = {}
    for crf in (0, 18, 51):
        path = write_video(tmp_path / f"crf{crf}.mp4", frames, 23, crf=crf)
        with av.open(str(path)) as c:
            decoded = torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in c.decode(video=0)])
        off[crf] = (decoded.float() - source).abs().max().item()
    assert off[0] <= 1 < off[18] < off[51]  # limited-range luma: half a Y step each way, then rounding
    for bad in (-1, 52, 1.5, True):
        with pytest.raises(SettingsError, match=r"crf must be a whole number from 0 \(lossless\) to 51"):
            write_video(tmp_path / "bad.mp4", frames, 23, crf=bad)
    assert not (tmp_path / "bad.mp4").exists()


def test_a_5_1_recording_is_mixed_down_not_cut_to_its_first_two_channels(tmp_path):
    # the first two of 5.1 are front left and right: the dialogue in the centre channel was dropped from the mp4
    rate = 16000
    t = torch.arange(rate) / rate
    surround = torch.zeros(6, rate)
    surround[2] = 0.5 * torch.sin(2 * torch.pi * 440 * t)  # centre only
    surround[3] = 0.5 * torch.sin(2 * torch.pi * 60 * t)  # LFE: left out of a stereo mix
    path = write_video(tmp_path / "surround.mp4", torch.rand(23, 16, 16, 3), 23, surround, rate)
    with av.open(str(path)) as c:
        assert c.streams.audio[0].channels == 2
        decoded = torch.cat([torch.from_numpy(f.to_ndarray()) for f in c.decode(audio=0)], dim=1)  # [2, T]
    middle = decoded[:, rate // 10: rate // 10 + rate // 2]
    assert (middle.abs().amax(dim=1) > 0.25).all()  # the centre in both sides, at about -3 dB (0.35)
    spectrum = torch.fft.rfft(middle[0]).abs()  # 0.5 s: 2 Hz bins
    assert abs(int(spectrum.argmax()) * 2 - 440) <= 2 and spectrum[30] < spectrum.max() / 20  # no 60 Hz LFE
