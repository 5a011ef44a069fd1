"""Every bad input gives one clear line naming the problem (and the fix), before any model loads, with no
traceback and no output file: the command line and the node functions, case by case.

Command-line cases run ``cli.main`` in this process (the code path of ``python -m fantasytalking_core``; importing
torch and diffusers costs ~5 s per fresh process on two cores), and a few run as real processes to check the exit
status and stderr of the whole program. Node cases call ``nodes/convert.py`` as the nodes do (no ComfyUI here);
ComfyUI shows the exception's message on the node, so it must be one line.
"""

from __future__ import annotations

import math
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import run_here
from PIL import Image

from fantasytalking_core.errors import FantasyTalkingError
from nodes.convert import (check_wan21_vae, clip_vision_tokens, conditioning_to_text, crop_face, encode_audio,
                           reference_pixels, segment_options)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """face.png (60x90), voice.wav (0.5 s, 16 kHz), empty.wav (no samples), short.wav (10 samples), noise.wav (not
    audio), a folder."""
    d = tmp_path_factory.mktemp("in")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 60, 3), dtype=np.uint8)).save(d / "face.png")
    for name, seconds in (("voice.wav", 0.5), ("empty.wav", 0.0), ("short.wav", 10 / 16000)):
        samples = (0.3 * np.sin(np.arange(int(seconds * 16000)) / 7) * 32767).astype(np.int16)
        with wave.open(str(d / name), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(samples.tobytes())
    (d / "noise.wav").write_bytes(np.random.default_rng(1).integers(0, 255, 4000, dtype=np.uint8).tobytes())
    (d / "folder").mkdir()
    return d


def generate_args(inputs: Path, out: Path, *extra: str, image: str = "face.png", audio: str = "voice.wav") -> list[str]:
    return ["generate", "--image", str(inputs / image), "--audio", str(inputs / audio), "--out", str(out), "--tiny",
            "--steps", "1", "--image-size", "32", *extra]


def assert_one_clear_line(stderr: str, words: str, rc: int | None) -> None:
    """Non-zero exit (when known), exactly one line on stderr, no traceback, and the words naming the problem."""
    lines = stderr.strip().splitlines()
    assert rc is None or rc != 0
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and words in lines[0], lines[0]


def run_main(argv: list[str]) -> tuple[int, str]:
    """``cli.main`` as the program runs it, in this process: its exit code and what it printed on stderr."""
    proc = run_here(argv)
    return proc.returncode, proc.stderr


# (arguments after the defaults of generate_args, keyword arguments of generate_args, words in the one line)
COMMAND_LINE_CASES = {
    "missing image": ([], dict(image="missing.png"), "Image not found"),
    "image not an image": ([], dict(image="voice.wav"), "not a readable image"),
    "image is a folder": ([], dict(image="folder"), "is a folder, not an image file"),
    "audio not found": ([], dict(audio="missing.wav"), "Audio file not found"),
    "audio is a picture": ([], dict(audio="face.png"), "no audio track"),
    "audio is noise bytes": ([], dict(audio="noise.wav"), "not an audio or video file"),
    "audio is a folder": ([], dict(audio="folder"), "is a folder, not an audio file"),
    "audio has no samples": ([], dict(audio="empty.wav"), "holds no samples"),
    "steps zero": (["--steps", "0"], {}, "--steps must be at least 1"),
    "steps not a number": (["--steps", "abc"], {}, "invalid int value: 'abc'"),
    "fps zero": (["--fps", "0"], {}, "--fps must be from 1 to 120 frames per second"),
    "fps far too high": (["--fps", "1000"], {}, "--fps must be from 1 to 120 frames per second"),
    "shift zero": (["--shift", "0"], {}, "--shift must be positive"),
    "max frames not 4n+1": (["--max-frames", "80"], {}, "--max-frames must be 4n+1"),
    "max frames past the RoPE": (["--max-frames", "4097"], {}, "--max-frames 4097 is above 4093"),
    "image size too small": (["--image-size", "8"], {}, "--image-size must be at least 16"),
    "image size past the RoPE": (["--image-size", "16385"], {}, "--image-size 16385 is above 16384"),
    "guidance range reversed": (["--audio-guidance-start", "0.8", "--audio-guidance-end", "0.2"], {},
                                "audio guidance range"),
    "vae tile": (["--vae-tile", "100"], {}, "--vae-tile must be a multiple of 32"),
    "negative audio scale": (["--audio-scale", "-1"], {}, "--audio-scale must be >= 0"),
    "face intensity": (["--face-intensity", "2"], {}, "face intensity"),
    "face box outside": (["--face-box", "5000,5000,6000,6000"], {}, "lies outside the 60x90 portrait"),
    "face box without area": (["--face-box", "40,20,10,60"], {}, "x1 > x0 and y1 > y0"),
    "face box not numbers": (["--face-box", "1,2,3"], {}, "x0,y0,x1,y1"),
    "face box infinite": (["--face-box", "0,0,inf,10"], {}, "x0,y0,x1,y1"),
    "dtype not offered": (["--dtype", "fp64"], {}, "invalid choice: 'fp64'"),
    "gpu memory budget not positive": (["--gpu-memory", "0"], {}, "--gpu-memory must be a positive number of GiB"),
    "attention not offered": (["--attention", "fastest"], {}, "attention must be one of sdpa, flash, sage, xformers"),
    "no face to crop": (["--face-crop"], {}, "--face-box x0,y0,x1,y1, or add --face-fallback"),
    "step cache negative": (["--step-cache", "-0.1"], {}, "--step-cache must be a number from 0 (off) to 1"),
    "step cache nan": (["--step-cache", "nan"], {}, "--step-cache must be a number from 0 (off) to 1"),
    "step cache above 1": (["--step-cache", "2"], {}, "got 2.0"),
    "segment flags with one clip": (["--max-frames", "45", "--segment-frames", "21", "--crossfade"], {},
                                    "--segment-frames, --crossfade shape the segments of a long video, but "
                                    "--max-frames makes the official single clip, which has none"),
    "step cache in 4 steps": (["--step-cache", "0.1", "--steps", "4"], {},
                              "--step-cache skips nothing in a 4-step run: the first 3 and last 2 steps always "
                              "compute every block. Set --step-cache to 0, or sample more than 5 steps."),
    "fps not a number": (["--fps", "nan"], {}, "--fps must be a finite number, got nan"),
    "fps infinite": (["--fps", "inf"], {}, "--fps must be a finite number, got inf"),
    "shift not a number": (["--shift", "nan"], {}, "--shift must be a finite number"),
    "cfg not a number": (["--cfg", "nan"], {}, "--cfg must be a finite number"),
    "audio cfg infinite": (["--audio-cfg", "inf"], {}, "--audio-cfg must be a finite number"),
    "audio scale infinite": (["--audio-scale", "inf"], {}, "--audio-scale must be a finite number"),
    "seed past 64 bits": (["--seed", str(2**64)], {}, "--seed must be a whole number from -9223372036854775808 to 18446744073709551615"),
    "seed below 64 bits": (["--seed", str(-(2**63) - 1)], {}, "--seed must be a whole number from -9223372036854775808"),
    "gpu memory budget not a number": (["--gpu-memory", "nan"], {}, "--gpu-memory must be a positive number of GiB"),
    "max frames zero": (["--max-frames", "0"], {}, "--max-frames must be"),
    "face margin negative": (["--face-box", "5,5,30,30", "--face-margin", "-1"], {},
                             "the face margin must be a number >= 0"),
    "face margin not a number": (["--face-box", "5,5,30,30", "--face-margin", "nan"], {},
                                 "the face margin must be a number >= 0"),
    "device unknown": (["--device", "bogus"], {}, "--device bogus: use cpu, or cuda"),
    "device of another kind": (["--device", "mps"], {}, "--device mps: use cpu, or cuda"),
    "audio shorter than one wav2vec2 token": ([], dict(audio="short.wav"), "wav2vec2 needs at least 25 ms"),
    # these once went through: a face index below 0, a negative feather, model flags --tiny would not read
    "offload on the cpu": (["--device", "cpu", "--offload-blocks"], {}, "--offload-blocks places the DiT on a GPU; "
                                                                         "with --device cpu it computes in RAM"),
    "gpu budget on the cpu": (["--device", "cpu", "--gpu-memory", "8"], {}, "--gpu-memory places the DiT on a GPU"),
    "face index negative": (["--face-crop", "--face-fallback", "--face-index", "-1"], {},
                            "the face index must be 0 (the largest face) or more, got -1"),
    "face feather negative": (["--face-box", "5,5,30,30", "--face-feather", "-5"], {},
                              "the face feather must be 0 pixels (a hard edge) or more, got -5"),
    "face margin negative, face detected": (["--face-crop", "--face-margin", "-1"], {},
                                            "the face margin must be a number >= 0"),
}


@pytest.mark.parametrize("case", COMMAND_LINE_CASES)
def test_command_line_bad_input(case, inputs, tmp_path):
    extra, where, words = COMMAND_LINE_CASES[case]
    out = tmp_path / "talking.mp4"
    rc, err = run_main(generate_args(inputs, out, *extra, **where))
    assert_one_clear_line(err, words, rc)
    assert "--tiny" not in err and list(tmp_path.iterdir()) == []  # no model made, no file written


@pytest.mark.parametrize("out,words", [
    ("folder", "is a folder: give a file name in it"),
    ("talking.gif", "not a video file name"),
    ("face.png/talking.mp4", "is a file, not a folder"),
    ("a" * 241 + ".mp4", "The output file name is 245 bytes long; shorten it to at most 237"),
    ("/proc/talking.mp4", "/proc does not take new files"),  # no file can be made there, root or not
    ("\udce9" * 240 + ".mp4", "is 244 bytes long"),  # not UTF-8 (a Linux name's raw bytes): counted, no traceback
])
def test_an_output_path_the_writer_would_fail_on_is_refused_up_front(inputs, out, words):
    before = sorted(p.name for p in inputs.iterdir())
    rc, err = run_main(generate_args(inputs, inputs / out))
    assert_one_clear_line(err, words, rc)
    assert sorted(p.name for p in inputs.iterdir()) == before


def test_an_image_too_large_for_pillow_is_one_line(inputs, tmp_path, monkeypatch):
    """Pillow refuses images past twice its pixel limit (DecompressionBombError, not an OSError); the 60x90
    portrait stands in for a huge one under a lower limit."""
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)
    rc, err = run_main(generate_args(inputs, tmp_path / "x.mp4"))
    assert_one_clear_line(err, "is too large to open", rc)
    assert "downscale it" in err and list(tmp_path.iterdir()) == []


def test_ctrl_c_is_one_line_and_the_shell_status_of_an_interrupt(inputs, tmp_path, monkeypatch):
    """KeyboardInterrupt while the video is written (every frame in its temporary file, the voice being muxed): no
    traceback, exit status 130 (128 + SIGINT), no file left."""
    from fantasytalking_core.media import video

    partial = []

    def interrupted(*args, **kwargs):
        partial.extend(p for p in tmp_path.iterdir() if p.name.endswith(".partial.mp4") and p.stat().st_size)
        raise KeyboardInterrupt

    monkeypatch.setattr(video, "_mux_audio", interrupted)
    rc, err = run_main(generate_args(inputs, tmp_path / "x.mp4"))
    lines = err.strip().splitlines()
    assert rc == 130 and "Traceback" not in err and lines[-1].startswith("interrupted: stopped by the user")
    assert len(partial) == 1 and list(tmp_path.iterdir()) == []


def test_sigterm_leaves_no_partial_video(inputs, tmp_path, monkeypatch):
    """kill, timeout, job schedulers and docker stop send SIGTERM, which once killed the run with its temporary
    file left behind: it unwinds as Ctrl-C does, exit status 143 (128 + SIGTERM), and the handler is put back."""
    import os
    import signal

    from fantasytalking_core.media import video

    partial = []

    def terminated(*args, **kwargs):
        partial.extend(p for p in tmp_path.iterdir() if p.name.endswith(".partial.mp4") and p.stat().st_size)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(video, "_mux_audio", terminated)
    rc, err = run_main(generate_args(inputs, tmp_path / "x.mp4"))
    assert rc == 143 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("terminated: stopped by")
    assert len(partial) == 1 and list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigterm_while_the_models_load_is_no_bad_file(inputs, tmp_path, monkeypatch):
    # the loaders turn any Exception from a reader into "not a readable file": SIGTERM must pass through them
    import os
    import signal

    from fantasytalking_core.loaders import state_dict

    real_open = state_dict.safe_open

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(state_dict, "safe_open", terminated)
    rc, err = run_main(generate_args(inputs, tmp_path / "x.mp4"))
    assert rc == 143 and err.strip().splitlines()[-1].startswith("terminated: stopped by"), err[-500:]
    assert "not a readable" not in err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--out", "--image", "--audio"])
def test_a_file_name_longer_than_the_system_allows_is_one_line(inputs, tmp_path, flag):
    long = str(tmp_path / ("n" * 300 + ".mp4"))
    argv = generate_args(inputs, tmp_path / "x.mp4")
    argv[argv.index(flag) + 1] = long
    rc, err = run_main(argv)
    assert_one_clear_line(err, "", rc)
    assert ("File name too long" in err or "at most 255 bytes" in err) and list(tmp_path.iterdir()) == []


def test_a_silent_recording_is_told_before_the_models_load(tmp_path, monkeypatch):
    # the warning came from the audio encoder, minutes into a run with real weights
    from fantasytalking_core.errors import FantasyTalkingError
    from fantasytalking_core.loaders import model_paths

    def not_loading(*args, **kwargs):
        raise FantasyTalkingError("the models would load now")

    Image.new("RGB", (64, 64), "grey").save(tmp_path / "face.png")
    with wave.open(str(tmp_path / "silent.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(bytes(2 * 16000))
    monkeypatch.setattr(model_paths, "load_models", not_loading)
    rc, err = run_main(generate_args(tmp_path, tmp_path / "x.mp4", audio="silent.wav"))
    lines = err.strip().splitlines()
    assert "warning: the recording is digital silence: the face will not speak." in lines
    assert lines[-1] == "error: the models would load now" and rc == 2


def test_a_warning_told_before_the_models_load_is_not_logged_again(caplog):
    # the command line printed the silence warning early and the audio encoder logged it again minutes later
    from fantasytalking_core import cli
    from fantasytalking_core.audio import encode

    silent, quiet = "the recording is digital silence: the face will not speak", "another warning"
    with caplog.at_level("WARNING"), cli._said_once([silent]):
        encode.logger.warning("Audio: %s.", silent)
        encode.logger.warning("Audio: %s.", quiet)
    assert [r.getMessage() for r in caplog.records] == [f"Audio: {quiet}."]
    caplog.clear()
    encode.logger.warning("Audio: %s.", silent)  # outside the run the encoder speaks as before
    assert [r.getMessage() for r in caplog.records] == [f"Audio: {silent}."]


@pytest.mark.parametrize("extra, words", [
    (["--models", "/nonexistent"], "--tiny makes its own random models and would not read --models"),
    (["--dit", "/nonexistent.safetensors", "--vae", "/x"], "would not read --dit, --vae"),
])
def test_model_flags_beside_tiny_are_refused(inputs, tmp_path, extra, words):
    # they were ignored with exit 0, so a user believed the model files checked
    rc, err = run_main(generate_args(inputs, tmp_path / "x.mp4", *extra))
    assert_one_clear_line(err, words, rc)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--audio", "--image"])
def test_the_output_may_not_replace_an_input(inputs, tmp_path, flag):
    # --audio same.mp4 --out same.mp4 once replaced the recording with the video
    source = inputs / ("voice.wav" if flag == "--audio" else "face.png")
    same = tmp_path / "same.mp4"
    same.write_bytes(source.read_bytes())
    argv = generate_args(inputs, same)
    argv[argv.index(flag) + 1] = str(same)
    rc, err = run_main(argv)
    assert_one_clear_line(err, f"--out is the {flag} file", rc)
    assert same.read_bytes() == source.read_bytes()


def test_no_models_and_no_tiny(inputs, tmp_path):
    argv = [a for a in generate_args(inputs, tmp_path / "x.mp4") if a != "--tiny"]
    rc, err = run_main(argv)
    assert_one_clear_line(err, "--models is required", rc)


def test_model_files_given_one_by_one_need_no_models_folder_and_the_missing_ones_are_named_by_flag(
        inputs, tmp_path):
    """--dit and --adapter without --models: the run goes on to find the other parts, and each one missing is
    named by the flag that gives it (not "--models is required")."""
    dit, adapter = tmp_path / "my_dit.safetensors", tmp_path / "adapter.ckpt"
    dit.write_bytes(b""), adapter.write_bytes(b"")
    argv = [a for a in generate_args(inputs, tmp_path / "x.mp4") if a != "--tiny"]
    rc, err = run_main([*argv, "--dit", str(dit), "--adapter", str(adapter)])
    assert rc == 2 and "Traceback" not in err and "--models is required" not in err
    for flag in ("--wav2vec2", "--text-encoder", "--clip-vision", "--vae"):
        assert f"not given; pass {flag} with its file" in err
    assert "pass --dit" not in err and "pass --adapter" not in err
    assert not (tmp_path / "x.mp4").exists()


def test_parity_on_a_folder_that_is_no_fixture_set(tmp_path):
    rc, err = run_main(["parity", str(tmp_path)])
    assert_one_clear_line(err, "is not a fixture set", rc)


@pytest.mark.parametrize("extra,words", [
    (["--face-box", "5000,5000,6000,6000"], "lies outside the 60x90 portrait"),
    (["--max-frames", "4097"], "above 4093"),
    (["--steps"], "expected one argument"),
])
def test_the_program_itself_prints_one_line_and_exits_non_zero(inputs, tmp_path, extra, words):
    out = tmp_path / "talking.mp4"
    proc = subprocess.run([sys.executable, "-m", "fantasytalking_core", *generate_args(inputs, out, *extra)],
                          capture_output=True, text=True)
    assert_one_clear_line(proc.stderr, words, proc.returncode)
    assert proc.stdout == "" and not out.exists()


# ---- nodes ---------------------------------------------------------------------------------------------------------


def audio_value(waveform: torch.Tensor, sample_rate: int = 16000) -> dict:
    return {"waveform": waveform, "sample_rate": sample_rate}


def voice(samples: int = 8000) -> torch.Tensor:
    return 0.3 * torch.sin(torch.arange(samples) / 7.0)[None, None]  # AUDIO [1, 1, T]


class NotWan21VAE:
    latent_channels, latent_dim = 48, 3


WAV2VEC2_STANDIN = torch.nn.Linear(1, 1)  # the inputs are refused before the model runs
NODE_CASES = {
    "audio batch of two": (lambda: encode_audio(WAV2VEC2_STANDIN, audio_value(voice().repeat(2, 1, 1)), 23, 81, CPU),
                           "batch of 2 recordings"),
    "audio with NaN": (lambda: encode_audio(WAV2VEC2_STANDIN, audio_value(voice().index_fill(2, torch.tensor([5]),
                                                                                             math.nan)), 23, 81, CPU),
                       "NaN"),
    "audio rate zero": (lambda: encode_audio(WAV2VEC2_STANDIN, audio_value(voice(), 0), 23, 81, CPU),
                        "not a valid audio rate"),
    "audio transposed": (lambda: encode_audio(WAV2VEC2_STANDIN, audio_value(voice().transpose(1, 2)), 23, 81, CPU),
                         "transpose the last two dimensions"),
    "audio empty": (lambda: encode_audio(WAV2VEC2_STANDIN, audio_value(torch.zeros(1, 1, 0)), 23, 81, CPU), "empty"),
    "audio not an AUDIO": (lambda: encode_audio(WAV2VEC2_STANDIN, "voice", 23, 81, CPU), "Audio file not found"),
    "max frames past any video": (lambda: encode_audio(WAV2VEC2_STANDIN, audio_value(voice()), 23, 16777221, CPU),
                                  "above 16777217"),
    "segments past the RoPE": (lambda: segment_options(4097, 9, "last_frame"),
                               "FantasyTalking Sampler: segment_frames 4097 is above 4093"),
    "segment not 4n+1": (lambda: segment_options(80, 9, "last_frame"),
                         "FantasyTalking Sampler: segment_frames must be 4n+1 and at least 5 (e.g. 81), got 80"),
    "overlap not shorter than the segment": (lambda: segment_options(9, 9, "motion_frames"),
                                             "motion_frames must be less than segment_frames (9) with chaining "
                                             "motion_frames, got 9"),
    "unknown chaining": (lambda: segment_options(81, 9, "pinned"),
                         "FantasyTalking Sampler: chaining must be one of last_frame, motion_frames, pinned_latents"),
    "no face and no fallback": (lambda: crop_face(torch.full((1, 64, 96, 3), 0.5)), "No face was found"),
    "empty face mask": (lambda: crop_face(torch.rand(1, 64, 64, 3), mask=torch.zeros(1, 64, 64)), "mask is empty"),
    "mask of another size": (lambda: crop_face(torch.rand(1, 64, 64, 3), mask=torch.ones(1, 32, 32)),
                             "paint the mask on this image"),
    "image not an IMAGE": (lambda: reference_pixels(torch.rand(64, 64), 32), "expected an IMAGE"),
    "two prompts": (lambda: conditioning_to_text([[torch.zeros(1, 4, 8), {}]] * 2, "positive", 8), "holds 2 prompts"),
    "text of another width": (lambda: conditioning_to_text([[torch.zeros(1, 4, 8), {}]], "positive", 16),
                              "8 wide"),
    "no CLIP vision output": (lambda: clip_vision_tokens({"image_embeds": torch.zeros(1, 8)}),
                              "no penultimate_hidden_states"),
    "Wan2.2 VAE": (lambda: check_wan21_vae(NotWan21VAE()), "the Wan2.2 VAE"),
}


@pytest.mark.parametrize("case", NODE_CASES)
def test_node_bad_input(case):
    call, words = NODE_CASES[case]
    with pytest.raises((FantasyTalkingError, ValueError, FileNotFoundError)) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and words in message, message


def test_an_error_reworded_keeps_its_class_whatever_its_constructor():
    """errors.reworded: the worker pool and the sampler node prefix where an error happened, and the user's one
    line must come out even for an error class whose constructor takes other arguments."""
    from fantasytalking_core.errors import FantasyTalkingError, ModelNotFoundError, reworded

    class Detailed(FantasyTalkingError):
        def __init__(self, path: str, reason: str):
            super().__init__(f"{path}: {reason}")

    plain = reworded(ModelNotFoundError("x not found"), "worker 1: x not found")
    assert type(plain) is ModelNotFoundError and str(plain) == "worker 1: x not found"
    detailed = reworded(Detailed("/m", "bad"), "worker 1: /m: bad")
    assert type(detailed) is Detailed and str(detailed) == "worker 1: /m: bad"
    assert type(reworded(Detailed, "rank 1: /m: bad")) is FantasyTalkingError  # only the class: the base one
