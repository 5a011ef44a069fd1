"""nodes/convert.py: the ComfyUI-side conversions and the sampler path, without ComfyUI.

ComfyUI's values are built here as the core nodes make them (see the module docstring of nodes/convert.py); its
Wan2.1 VAE is stood in for by ``ComfyLikeVAE``, the library's VAE behind ComfyUI's VAE interface (0..1 pixels in
and out, raw latents).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from fantasytalking_core.audio.rules import crop_samples_for_frames
from fantasytalking_core.errors import ModelFileError, SettingsError
from fantasytalking_core.encoders.image import encode_image_clip
from fantasytalking_core.media.image import image_to_tensor
from fantasytalking_core.loaders.model_paths import load_models
from fantasytalking_core.pipeline import FantasyTalkingPipeline, GenerationSettings
from fantasytalking_core.encoders.text import encode_prompt
from fantasytalking_core.tiny import make_tiny_models
from fantasytalking_core.encoders.vae import first_frame_mask, vae_config
from nodes import convert
from nodes.convert import (
    EncodedAudio,
    Identity,
    check_wan21_vae,
    clip_vision_tokens,
    conditioning_to_text,
    conditioning_video,
    decode_frames,
    denormalize_latents,
    describe_audio,
    encode_audio,
    encode_identity,
    encode_text_official,
    truncate_umt5_tokens,
    image_condition,
    normalize_latents,
    reference_pixels,
    trim_audio,
)

CPU = torch.device("cpu")


class ComfyLikeVAE:
    """The library's AutoencoderKLWan behind ComfyUI's VAE interface: encode(pixels [F, H, W, 3] in 0..1) -> raw
    posterior mean [1, 16, T, h, w]; decode(raw latents) -> [1, F, H, W, 3] in 0..1."""

    latent_channels, latent_dim = 16, 3

    def __init__(self, vae):
        self.vae = vae
        self.encoded: list[torch.Tensor] = []

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.encoded.append(pixels)
        video = (pixels * 2 - 1).permute(3, 0, 1, 2)[None]  # [1, 3, F, H, W] in -1..1
        return self.vae.encode(video).latent_dist.mean

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        video = self.vae.decode(raw).sample.clamp(-1, 1)  # [1, 3, F, H, W]
        return ((video + 1) / 2).permute(0, 2, 3, 4, 1)


class CLIPVisionOutput:
    """Like ComfyUI's clip_vision.Output: attributes readable with [] too."""

    def __init__(self, **values):
        self.__dict__.update(values)

    def __getitem__(self, key):
        return getattr(self, key)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def models(model_files):
    return load_models(model_files, compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def voice():
    """0.4 s of 44.1 kHz stereo: 13 video frames at 23 fps."""
    t = torch.arange(int(0.4 * 44100)) / 44100
    left = 0.3 * torch.sin(2 * torch.pi * 220 * t)
    return {"waveform": torch.stack([left, 0.5 * left]).unsqueeze(0), "sample_rate": 44100}


@pytest.fixture(scope="module")
def face():
    return Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 64, 3), dtype=np.uint8))


def comfy_image(face: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(face, dtype=np.float32) / 255)[None]  # [1, H, W, 3]


def comfy_conditioning(tokens: torch.Tensor, rows: int = 512) -> list:
    """CLIPTextEncode's output for Wan: the prompt's rows, then zero rows up to 512."""
    padded = torch.zeros(1, rows, tokens.shape[-1])
    padded[:, : tokens.shape[1]] = tokens
    return [[padded, {"pooled_output": None}]]


# ---- the sampler path equals the library pipeline ------------------------------------------------------------------


def node_frames(model, text_pos, text_neg, identity, encoded, settings, progress=None, make_room=None):
    """The sampler node's frames for a video that fits one segment: its own route (segments, kept as IMAGE)."""
    options = convert.segment_options(81, 9, "last_frame")
    plan, chunks, _ = convert.sample_segments(model, text_pos, text_neg, identity, encoded, settings, options,
                                              CPU, progress, make_room)
    video = convert.render_video(plan, chunks, encoded, 10**6, lambda: pytest.fail("no file for one segment"))
    assert len(plan) == 1 and video.path is None
    return video.images


def test_node_path_makes_the_pipeline_video(models, face, voice):
    """Comfy-type conversions + sample_latents + ComfyUI-style VAE calls give the pipeline's frames: the latent
    normalization, the conditioning video (grey = 0), the mask and the frame layout are all right."""
    settings = GenerationSettings(steps=2, image_size=32, seed=5, cfg=4.5, audio_cfg=3.0)
    pipe = FantasyTalkingPipeline(models)
    expected = pipe(face, voice, settings)

    pixels = image_to_tensor(face, settings.image_size)
    clip = CLIPVisionOutput(penultimate_hidden_states=encode_image_clip(models.image_encoder, pixels[None]))
    identity = encode_identity(comfy_image(face), ComfyLikeVAE(models.vae), clip, settings.image_size)
    encoded = encode_audio(models.wav2vec2, voice, settings.fps, settings.max_frames, CPU)
    text_dim = models.dit.transformer.config.text_dim
    text = {p: encode_prompt(models.text_encoder, models.tokenizer, p)[None]
            for p in (settings.prompt, settings.negative_prompt)}
    text_pos = conditioning_to_text(comfy_conditioning(text[settings.prompt]), "positive", text_dim)
    text_neg = conditioning_to_text(comfy_conditioning(text[settings.negative_prompt]), "negative", text_dim)

    frames = node_frames(models.dit, text_pos, text_neg, identity, encoded, settings)

    assert frames.shape == expected.frames.shape == (13, 32, 32, 3)
    # the only extra arithmetic is the 0..1 <-> -1..1 round trip of ComfyUI's pixel range (exact here, 0.0 measured)
    torch.testing.assert_close(frames, expected.frames, atol=1e-6, rtol=0)
    assert encoded.features.num_frames == 13
    torch.testing.assert_close(encoded.features.features, pipe.audio_features(voice, settings).features)


class ComfyLikeClipVision:
    """ComfyUI's ClipVisionModel around the library's CLIP: its model takes pixel values and returns
    (last, penultimate, pooled, projected) for ``intermediate_output=-2``; its own preprocessing is not used."""

    def __init__(self, model):
        self.image_size = model.config.image_size
        self.image_mean, self.image_std = model.config.image_mean, model.config.image_std
        self.load_device, self.patcher, self.loaded = torch.device("cpu"), object(), []

        def forward(pixel_values, intermediate_output):
            assert intermediate_output == -2 and pixel_values.shape[-2:] == (self.image_size, self.image_size)
            hidden = model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
            return hidden[-1], hidden[-2], None, None

        self.model = forward


def test_identity_encode_takes_the_official_clip_tokens_from_clip_vision(models, face):
    """The CLIP_VISION route gives exactly the library's (official) tokens of the video-size frame; the core CLIP
    Vision Encode route (ComfyUI resizes with antialias and rounds to 8 bits) is only an approximation."""
    pixels = image_to_tensor(face, 48)  # a non-square frame: squashed, not cropped
    expected = encode_image_clip(models.image_encoder, pixels[None])
    clip_vision = ComfyLikeClipVision(models.image_encoder)
    identity = encode_identity(comfy_image(face), ComfyLikeVAE(models.vae), None, 48, clip_vision=clip_vision,
                               load_model=clip_vision.loaded.append)
    assert clip_vision.loaded == [clip_vision.patcher]  # the model was put on its device first
    assert torch.equal(identity.clip_tokens, expected.float())
    # what ComfyUI's own preprocessing would feed: antialiased, 8-bit rounded -> different tokens
    comfy_pixels = torch.nn.functional.interpolate((pixels[None] + 1) / 2, size=(224, 224), mode="bicubic",
                                                   antialias=True)
    comfy_pixels = (comfy_pixels.clamp(0, 1) * 255).round() / 255 * 2 - 1
    assert not torch.equal(encode_image_clip(models.image_encoder, comfy_pixels), expected)
    with pytest.raises(ValueError, match="Load CLIP Vision"):
        encode_identity(comfy_image(face), ComfyLikeVAE(models.vae), None, 48)


def umt5_batch(num_tokens: int, word_ids: bool = False) -> list:
    """A ComfyUI umT5 batch: prompt tokens 100.., </s>, padding to 512 (ComfyUI's tokenizer layout)."""
    batch = [(100 + i, 1.0, i + 1) if word_ids else (100 + i, 1.0) for i in range(num_tokens)]
    batch.append((1, 1.0, 0) if word_ids else (1, 1.0))
    return batch + [(0, 1.0, 0) if word_ids else (0, 1.0)] * max(0, 512 - len(batch))


def test_long_prompts_are_cut_at_512_tokens_before_encoding_as_the_official_tokenizer_does():
    long = truncate_umt5_tokens({"umt5xxl": [umt5_batch(700, word_ids=True)]})["umt5xxl"]
    assert len(long) == 1 and len(long[0]) == 512
    assert [t for t, *_ in long[0][:511]] == list(range(100, 611)) and long[0][511] == (1, 1.0, 0)
    exact = truncate_umt5_tokens({"umt5xxl": [umt5_batch(511)]})["umt5xxl"][0]  # 511 + </s> = 512: untouched
    assert exact == umt5_batch(511)
    one_more = truncate_umt5_tokens({"umt5xxl": [umt5_batch(512)]})["umt5xxl"][0]
    assert len(one_more) == 512 and one_more[-1] == (1, 1.0) and one_more[-2] == (100 + 510, 1.0)
    short = umt5_batch(7)
    assert truncate_umt5_tokens({"umt5xxl": [short]})["umt5xxl"][0] == short
    with pytest.raises(ValueError, match="one batch"):
        truncate_umt5_tokens({"l": [umt5_batch(3), umt5_batch(3)]})


def test_text_encode_cleans_the_prompt_and_encodes_the_cut_tokens():
    class FakeClip:
        def tokenize(self, text, **kwargs):
            self.text, self.kwargs = text, kwargs
            return {"umt5xxl": [umt5_batch(600)]}

        def encode_from_tokens_scheduled(self, tokens):
            self.tokens = tokens
            return [[torch.zeros(1, 512, 8), {}]]

    clip = FakeClip()
    encode_text_official(clip, "  a  \u201cquoted\u201d   prompt\uff0c ")
    assert clip.text == 'a "quoted" prompt,'  # Wan's cleaning: ftfy, whitespace collapsed
    assert clip.kwargs == {"disable_weights": True}  # the official model never saw (word:1.2) weighting
    assert len(clip.tokens["umt5xxl"][0]) == 512 and clip.tokens["umt5xxl"][0][-1] == (1, 1.0)


def test_sampler_reports_every_step_and_stops_when_progress_raises(models, face, voice):
    settings = GenerationSettings(steps=3, image_size=32, seed=5)
    clip = CLIPVisionOutput(penultimate_hidden_states=torch.randn(1, 257, 16))
    identity = encode_identity(comfy_image(face), ComfyLikeVAE(models.vae), clip, 32)
    encoded = encode_audio(models.wav2vec2, voice, settings.fps, settings.max_frames, CPU)
    text = torch.randn(1, 7, models.dit.transformer.config.text_dim)
    events = []

    def progress(step, total):
        events.append((step, total))

    node_frames(models.dit, text, text, identity, encoded, settings, progress,
                make_room=lambda: events.append("make_room"))
    # room is made before the memory check and before the DiT moves for the segment
    assert events == ["make_room", "make_room", (1, 3), (2, 3), (3, 3)]

    class Interrupted(Exception):
        pass

    def interrupt_after_first(step, total):
        events.append(step)
        raise Interrupted

    events.clear()
    with pytest.raises(Interrupted):
        node_frames(models.dit, text, text, identity, encoded, settings, interrupt_after_first)
    assert events == [1]
    assert models.dit.device == CPU


def test_sampler_refuses_clip_tokens_of_another_width(models, face, voice):
    clip = CLIPVisionOutput(penultimate_hidden_states=torch.randn(1, 257, 24))  # the tiny DiT reads 16
    identity = encode_identity(comfy_image(face), ComfyLikeVAE(models.vae), clip, 32)
    encoded = encode_audio(models.wav2vec2, voice, 23, 81, CPU)
    text = torch.randn(1, 7, models.dit.transformer.config.text_dim)
    with pytest.raises(ModelFileError, match="24 wide.*16-wide.*clip_vision_h"):
        node_frames(models.dit, text, None, identity, encoded, GenerationSettings(steps=1, cfg=1.0))


# ---- text and image conditioning --------------------------------------------------------------------------------


def test_conditioning_keeps_the_rows_and_refuses_other_encoders():
    tokens = torch.randn(1, 512, 32, dtype=torch.float16)
    text = conditioning_to_text([[tokens, {}]], "positive", 32)
    assert text.dtype == torch.float32 and torch.equal(text, tokens.float())
    with pytest.raises(ModelFileError, match="positive CONDITIONING is 768 wide.*4096.*type wan"):
        conditioning_to_text([[torch.zeros(1, 77, 768), {}]], "positive", 4096)
    with pytest.raises(ValueError, match="negative CONDITIONING holds 2 prompts"):
        conditioning_to_text([[tokens, {}], [tokens, {}]], "negative", 32)
    with pytest.raises(ValueError, match="empty"):
        conditioning_to_text([], "positive", 32)


def test_conditioning_longer_than_512_tokens_is_cut_like_the_official_tokenizer():
    tokens = torch.arange(600.0).view(1, 600, 1).expand(1, 600, 4)
    text = conditioning_to_text([[tokens, {}]], "positive", 4)
    assert text.shape == (1, 512, 4) and text[0, -1, 0] == 511


def test_clip_vision_tokens_take_the_penultimate_state_of_the_first_image():
    states = torch.randn(2, 257, 1280)
    out = CLIPVisionOutput(penultimate_hidden_states=states, last_hidden_state=torch.randn(2, 257, 1280))
    assert torch.equal(clip_vision_tokens(out), states[:1])
    with pytest.raises(ModelFileError, match=r"\[1, 730, 1152\].*257 tokens"):
        clip_vision_tokens(CLIPVisionOutput(penultimate_hidden_states=torch.randn(1, 730, 1152)))
    with pytest.raises(ValueError, match="no penultimate_hidden_states"):
        clip_vision_tokens({"image_embeds": torch.randn(1, 1024)})


def test_reference_pixels_follow_the_official_frame_size(face):
    pixels = reference_pixels(comfy_image(face), 32)  # 64x40 -> longest side 32 -> 32x20 -> multiples of 16
    assert pixels.shape == (1, 32, 32, 3)
    torch.testing.assert_close(pixels[0], (image_to_tensor(face, 32).permute(1, 2, 0) + 1) / 2)
    tall = reference_pixels(torch.rand(2, 100, 60, 3), 64)  # first of the batch; 60x100 -> 38x64 -> 48x64
    assert tall.shape == (1, 64, 48, 3)


def test_identity_refuses_a_wan22_vae():
    class Wan22VAE:
        latent_channels, latent_dim = 48, 3

    with pytest.raises(ModelFileError, match="48-channel.*Wan2.2.*wan_2.1_vae"):
        check_wan21_vae(Wan22VAE())


# ---- latents through the VAE ------------------------------------------------------------------------------------


def test_latent_normalization_uses_the_wan21_tables_and_round_trips():
    config = vae_config()
    mean = torch.tensor(config["latents_mean"]).view(1, 16, 1, 1, 1)
    std = torch.tensor(config["latents_std"]).view(1, 16, 1, 1, 1)
    raw = torch.randn(1, 16, 2, 3, 4)
    torch.testing.assert_close(normalize_latents(raw), (raw - mean) / std)
    torch.testing.assert_close(denormalize_latents(normalize_latents(raw)), raw)


def test_image_condition_is_the_mask_then_the_normalized_latent_of_image_and_grey_frames():
    mean = torch.tensor(vae_config()["latents_mean"]).view(1, 16, 1, 1, 1)

    class MeanVAE:  # encodes anything to the latent mean, i.e. to 0 after normalization
        def __init__(self):
            self.seen = None

        def encode(self, pixels):
            self.seen = pixels
            t = (pixels.shape[0] - 1) // 4 + 1
            return mean.expand(1, 16, t, pixels.shape[1] // 8, pixels.shape[2] // 8).clone()

    vae, pixels = MeanVAE(), torch.rand(1, 32, 48, 3)
    y = image_condition(vae, pixels, 9)
    assert y.shape == (1, 20, 3, 4, 6)
    assert torch.equal(y[0, :4], first_frame_mask(9, 32, 48))
    assert y[:, 4:].abs().max() < 1e-6
    assert torch.equal(vae.seen[0], pixels[0]) and torch.all(vae.seen[1:] == 0.5)
    assert torch.equal(conditioning_video(pixels, 9), vae.seen)

    class Wan22VAE(MeanVAE):
        def encode(self, pixels):
            return torch.zeros(1, 48, 3, 2, 3)

    with pytest.raises(ModelFileError, match=r"\[1, 48, 3, 2, 3\].*\[1, 16, 3, 4, 6\]"):
        image_condition(Wan22VAE(), pixels, 9)
    with pytest.raises(ValueError, match="4k\\+1"):
        conditioning_video(pixels, 8)


def test_decode_frames_denormalizes_and_flattens_to_an_image_batch():
    class RecordingVAE:
        def decode(self, raw):
            self.raw = raw
            return torch.rand(1, 4 * (raw.shape[2] - 1) + 1, 16, 24, 3)

    vae, latents = RecordingVAE(), torch.randn(1, 16, 3, 2, 3)
    frames = decode_frames(vae, latents)
    assert frames.shape == (9, 16, 24, 3)
    torch.testing.assert_close(vae.raw, denormalize_latents(latents))


# ---- audio --------------------------------------------------------------------------------------------------------


def test_trim_audio_keeps_the_video_length_at_the_recording_rate(voice):
    clip = trim_audio(voice, 5, 23.0)  # a 5-frame video shows 0.217 s of the 0.4 s recording
    samples = crop_samples_for_frames(5, 23.0, 44100)
    assert samples == int(5 / 23 * 44100)
    assert clip["sample_rate"] == 44100 and clip["waveform"].shape == (1, 2, samples)
    assert torch.equal(clip["waveform"], voice["waveform"][:, :, :samples])
    short = trim_audio(voice, 81, 23.0)  # the video is longer than the recording: nothing to cut
    assert short["waveform"].shape[-1] == voice["waveform"].shape[-1]


def test_encode_audio_reports_the_frame_count(models, voice):
    encoded = encode_audio(models.wav2vec2, voice, 23.0, 81, CPU)
    assert isinstance(encoded, EncodedAudio)
    assert encoded.features.num_frames == 13 and encoded.features.fps == 23.0
    assert encoded.audio["waveform"].shape[-1] == voice["waveform"].shape[-1]  # 13 frames outlast the voice
    assert describe_audio(encoded) == "13 frames = 0.57 s at 23 fps; recording 0.40 s"
    capped = encode_audio(models.wav2vec2, voice, 23.0, 5, CPU)
    assert describe_audio(capped) == "5 frames = 0.22 s at 23 fps (capped by max_frames); recording 0.40 s"
    assert capped.audio["waveform"].shape[-1] == crop_samples_for_frames(5, 23.0, 44100)


@pytest.mark.parametrize("scale, seconds, expected", [
    (0.0, 0.4, ["digital silence"]),
    (0.004, 0.4, ["nearly silent (peak -"]),  # -48 dBFS in the stereo original; the mono mix is quieter
    (1.0, 0.1, ["shorter than one latent frame (0.17 s at 23 fps)"]),
    (0.004, 0.1, ["nearly silent", "shorter than one latent frame"]),
    (1.0, 0.4, []),
])
def test_encode_audio_warns_on_the_node_about_silent_and_very_short_recordings(models, voice, scale, seconds, expected):
    peak = voice["waveform"].abs().max()
    samples = int(seconds * voice["sample_rate"])
    quiet = {"waveform": voice["waveform"][..., :samples] / peak * scale, "sample_rate": voice["sample_rate"]}
    shown = describe_audio(encode_audio(models.wav2vec2, quiet, 23.0, 81, CPU))
    warnings = shown.split("\n")[1:]
    assert len(warnings) == len(expected) and all(w.startswith("Warning: ") for w in warnings)
    assert all(e in w for e, w in zip(expected, warnings)), shown
    if "peak -" in shown:  # the mono mix of the stereo voice peaks within 6 dB below the original's -48 dBFS
        assert -54 <= int(shown.split("peak ")[1].split(" dBFS")[0]) <= -48


def test_identity_carries_the_frame_size_and_no_face_box(face):
    clip = CLIPVisionOutput(penultimate_hidden_states=torch.randn(1, 257, 8))
    identity = encode_identity(comfy_image(face), ComfyLikeVAE(None), clip, 64)
    assert isinstance(identity, Identity)
    assert identity.frame_size == (64, 48) and identity.face_box is None  # 64x40 -> 64x40 -> 64x48


def test_module_imports_no_comfy():
    """convert.py must stay testable without ComfyUI: none of its imports, anywhere in the file, is comfy's."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(convert.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert names and not [m for m in names if m == "comfy" or m.startswith(("comfy.", "comfy_api"))]


def test_identity_locates_the_face_on_the_full_resolution_portrait():
    """At a 64 px video size the astronaut's face is ~12 px (no detector finds it there); it is found on the 512 px
    portrait and its box scaled to the video frame."""
    from skimage import data

    portrait = torch.from_numpy(data.astronaut()).float()[None] / 255  # [1, 512, 512, 3], face around (220, 123)
    clip = CLIPVisionOutput(penultimate_hidden_states=torch.randn(1, 257, 8))
    identity = encode_identity(portrait, ComfyLikeVAE(None), clip, 64, locate_face=True)
    assert identity.frame_size == (64, 64)
    x0, y0, x1, y1 = identity.face_box
    assert x0 < 220 / 8 < x1 and y0 < 123 / 8 < y1 and 6 < x1 - x0 < 18
    assert identity.face_note == "face region found"


def test_identity_without_dlib_uses_the_whole_frame_and_says_why(monkeypatch):
    # locate_face is on by default: without dlib (no wheel for Windows on ARM) the basic workflow once failed here
    from fantasytalking_core.errors import MissingDependencyError

    def no_dlib(image):
        raise MissingDependencyError("Face detection needs dlib.")

    monkeypatch.setattr(convert, "detect_faces", no_dlib)
    clip = CLIPVisionOutput(penultimate_hidden_states=torch.randn(1, 257, 8))
    identity = encode_identity(torch.rand(1, 64, 64, 3), ComfyLikeVAE(None), clip, 64, locate_face=True)
    assert identity.face_box is None and "dlib is not installed: pip install dlib-bin" in identity.face_note


# ---- long recordings: segments, IMAGE frames or a streamed mp4 ------------------------------------------------------


def long_voice(seconds: float = 1.2) -> dict:
    """44.1 kHz stereo; 1.2 s = 29 video frames at 23 fps (3 segments of 13 frames)."""
    t = torch.arange(int(seconds * 44100)) / 44100
    left = 0.3 * torch.sin(2 * torch.pi * 220 * t) * (0.5 + 0.5 * torch.sin(2 * torch.pi * 3 * t))
    return {"waveform": torch.stack([left, 0.5 * left]).unsqueeze(0), "sample_rate": 44100}


def node_inputs(models, face, audio, steps=2):
    settings = GenerationSettings(steps=steps, image_size=32, seed=5)
    clip = CLIPVisionOutput(penultimate_hidden_states=encode_image_clip(models.image_encoder,
                                                                        image_to_tensor(face, 32)[None]))
    identity = encode_identity(comfy_image(face), ComfyLikeVAE(models.vae), clip, 32)
    encoded = encode_audio(models.wav2vec2, audio, settings.fps, 4093, CPU)
    text = torch.randn(1, 7, models.dit.transformer.config.text_dim, generator=torch.Generator().manual_seed(0))
    return text, identity, encoded, settings


def test_a_face_crop_video_written_to_a_file_has_the_face_pasted_back(models, face, tmp_path):
    # past max_image_frames nothing comes after the sampler but the file: without this, a long face-crop video was
    # the 32x32 crop only, and Face Paste Back could only refuse the preview frames
    import av
    from dataclasses import replace

    from fantasytalking_core.face.crop import FaceBox, square_crop

    text, identity, encoded, settings = node_inputs(models, face, long_voice())
    reference = torch.rand(48, 64, 3, generator=torch.Generator().manual_seed(5))  # the full portrait, 64x48
    crop = convert.FaceCrop(square_crop(FaceBox(24, 12, 40, 28), 48, 64, 0.2), reference)
    identity = replace(identity, crop=crop)
    options = convert.segment_options(13, 5, "pinned_latents")
    plan, chunks, _ = convert.sample_segments(models.dit, text, text, identity, encoded, settings, options, CPU)
    frames = convert.render_video(plan, chunks, encoded, 29, lambda: pytest.fail("29 frames fit")).images
    plan, chunks, _ = convert.sample_segments(models.dit, text, text, identity, encoded, settings, options, CPU)
    written = convert.render_video(plan, chunks, encoded, 28, lambda: tmp_path / "long_00001_.mp4", crop=crop)
    assert frames.shape == (29, 32, 32, 3)  # as IMAGE: the crop, for upscalers before Face Paste Back
    torch.testing.assert_close(written.images, convert.paste_face(frames[::2], crop), rtol=0, atol=1e-6)
    with av.open(str(written.path)) as c:
        stream = c.streams.video[0]
        assert (stream.width, stream.height) == (64, 48) and sum(1 for _ in c.decode(video=0)) == 29
    with pytest.raises(SettingsError, match=r"^FantasyTalking Face Paste Back: these are 15 preview frames .* with "
                                            r"the face pasted back already: save the sampler.s video output"):
        convert.paste_face(written.images, crop)


def test_a_video_that_fits_one_segment_is_the_single_clip_bit_for_bit_in_every_mode(models, face, voice):
    # the single clip: the node's frames equal the pipeline's (test_node_path_makes_the_pipeline_video)
    text, identity, encoded, settings = node_inputs(models, face, voice)
    today = node_frames(models.dit, text, text, identity, encoded, settings)
    for chaining in ("last_frame", "motion_frames", "pinned_latents"):
        options = convert.segment_options(13, 5, chaining)
        plan, chunks, _ = convert.sample_segments(models.dit, text, text, identity, encoded, settings, options, CPU)
        video = convert.render_video(plan, chunks, encoded, 100, lambda: pytest.fail("no file for 13 frames"))
        assert len(plan) == 1 and video.path is None
        assert torch.equal(video.images, today)


def test_long_video_as_images_or_as_an_mp4_with_the_voice(models, face, tmp_path):
    import av

    from fantasytalking_core.face.crop import FaceBox, square_crop

    text, identity, encoded, settings = node_inputs(models, face, long_voice())
    options = convert.segment_options(13, 5, "pinned_latents")
    calls = []
    plan, chunks, _ = convert.sample_segments(models.dit, text, text, identity, encoded, settings, options, CPU,
                                              lambda i, n: calls.append((i, n)))
    video = convert.render_video(plan, chunks, encoded, 29, lambda: pytest.fail("29 frames fit max_image_frames"))
    assert len(plan) == 3 and video.path is None and video.images.shape == (29, 32, 32, 3)
    assert calls == [(i, 6) for i in range(1, 7)]  # one bar over 2 steps x 3 segments

    plan, chunks, _ = convert.sample_segments(models.dit, text, text, identity, encoded, settings, options, CPU)
    written = convert.render_video(plan, chunks, encoded, 28, lambda: tmp_path / "out" / "long_00001_.mp4")
    assert written.path == tmp_path / "out" / "long_00001_.mp4"
    assert torch.equal(written.images, video.images[::2])  # 15 preview frames: every ceil(29 / 16) = 2nd
    # Face Paste Back pasted the previews back, and Save Video kept a 15-frame clip as the video
    assert getattr(written.images, convert.PREVIEW_OF) == str(written.path)
    assert not hasattr(video.images, convert.PREVIEW_OF)  # the whole video as frames: nothing to say
    with pytest.raises(SettingsError, match=r"^FantasyTalking Face Paste Back: these are 15 preview frames of a "
                                            r"video .* wrote to long_00001_\.mp4 without the paste-back\. Connect Face "
                                            r"Crop's crop_info to Identity Encode too .* or raise max_image_frames"):
        convert.paste_face(written.images, convert.FaceCrop(square_crop(FaceBox(8, 8, 20, 20), 32, 32, 0.2),
                                                            torch.rand(32, 32, 3)))
    with pytest.raises(SettingsError, match=r"wrote to long_00001_\.mp4 whole \(Face Crop found no face, so there is "
                                            r"nothing to paste back\): save the sampler's video output"):
        convert.paste_face(written.images, convert.FaceCrop(None, torch.rand(32, 32, 3)))  # the whole-image fallback
    with av.open(str(written.path)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 29
        sound = c.streams.audio[0]
        assert sound.channels == 2 and abs(float(sound.duration * sound.time_base) - 29 / 23) < 0.07

    # the node's crf reaches the encoder: lossless H.264 of these noisy frames takes 2.5x the default's video bytes
    plan, chunks, _ = convert.sample_segments(models.dit, text, text, identity, encoded, settings, options, CPU)
    lossless = convert.render_video(plan, chunks, encoded, 28, lambda: tmp_path / "out" / "long_00002_.mp4", crf=0)
    assert torch.equal(lossless.images, written.images)

    def video_bytes(path):
        with av.open(str(path)) as c:
            return sum(packet.size for packet in c.demux(video=0))

    assert video_bytes(lossless.path) > 2 * video_bytes(written.path)


def test_long_video_interrupted_leaves_no_file(models, face, tmp_path):
    text, identity, encoded, settings = node_inputs(models, face, long_voice(), steps=1)
    options = convert.segment_options(13, 5, "last_frame")

    class Interrupted(Exception):
        pass

    def stop(step, total):
        if step == 2:  # inside the second segment, after the first was written
            raise Interrupted

    plan, chunks, _ = convert.sample_segments(models.dit, text, text, identity, encoded, settings, options, CPU, stop)
    with pytest.raises(Interrupted):
        convert.render_video(plan, chunks, encoded, 0, lambda: tmp_path / "long.mp4")
    assert list(tmp_path.iterdir()) == [] and models.dit.device == CPU


def test_a_long_video_through_a_guidance_pool_is_the_one_process_video(models, model_files, face):
    """The sampler's parallel route: cfg=2 worker processes (gloo here), each loading the model from its files,
    make the video of one process, report every step of every segment, and stay for the next run. (Ray workers
    run the same protocol: tests/test_runtime_pool.py, and the real-ComfyUI script runs this route with both.)"""
    backend = "processes"
    from fantasytalking_core.loaders.model_source import ModelSource

    from nodes.parallel import close_sampler_pool, sampler_pool

    text, identity, encoded, settings = node_inputs(models, face, long_voice())
    options = convert.segment_options(13, 5, "pinned_latents")
    plan, chunks, where = convert.sample_segments(models.dit, text, text, identity, encoded, settings, options, CPU)
    reference = convert.render_video(plan, chunks, encoded, 100, lambda: pytest.fail("kept as images")).images
    assert where == "model whole on cpu"

    model = ModelSource(str(model_files.dit), str(model_files.adapter), None, torch.float32).load()
    try:
        pool = sampler_pool(model, "cfg=2", CPU, settings, backend)
        calls, room = [], []
        plan, chunks, where = convert.sample_segments(model, text, text, identity, encoded, settings, options,
                                                      CPU, lambda i, n: calls.append((i, n)),
                                                      lambda: room.append(1), pool=pool)
        assert where == (f"parallel cfg=2,ring=1,ulysses=1: 2 workers ({backend}), each its copy of the model "
                         "kept on the CPU")
        video = convert.render_video(plan, chunks, encoded, 100, lambda: pytest.fail("kept as images"))
        assert calls == [(i, 6) for i in range(1, 7)]  # one bar over 2 steps x 3 segments, from the workers
        assert len(room) == 4  # before the run and before each segment (ComfyUI's VAE ran in between)
        assert sampler_pool(model, " cfg=2 ", CPU, settings, backend) is pool and pool.alive  # kept for the next run
    finally:
        close_sampler_pool()
    assert not pool.alive
    # float32 parity bound (tests/fixtures/official/README.md); the workers may use other thread counts
    torch.testing.assert_close(video.images, reference, rtol=0, atol=1e-4)


SAMPLER_INPUTS = dict(segment_frames=81, motion_frames=9, chaining="last_frame", color_match=0.0,
                      max_image_frames=1500, audio_guidance_start=0.0, audio_guidance_end=1.0, attention="sdpa",
                      compile=False, parallel="", parallel_workers="processes", filename_prefix="FantasyTalking/long")


def test_sampler_inputs_are_checked_before_the_run_with_one_line(tmp_path, monkeypatch):
    from fantasytalking_core.errors import MissingDependencyError

    def check(device_type="cpu", **changes):
        return convert.check_sampler_inputs(**{**SAMPLER_INPUTS, **changes}, device_type=device_type,
                                            output_dir=str(tmp_path))

    def flash_missing(name, device=None):  # the same here as on a machine with flash-attn (test_runtime_attention)
        if name == "flash":
            raise MissingDependencyError("attention 'flash' needs the flash-attn package (pip install flash-attn)")
        return name

    real_find_spec, missing = importlib.util.find_spec, {"ray", "triton"}  # Triton: on every CUDA Linux machine
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in missing else real_find_spec(name, *a))
    monkeypatch.setattr(convert, "check_attention", flash_missing)

    assert check() is None
    assert check(segment_frames=5, motion_frames=1, chaining="pinned_latents", color_match=1.0, max_image_frames=0,
                 audio_guidance_start=0.25, audio_guidance_end=0.25, parallel="cfg=3",
                 filename_prefix="talk/%date%/x") is None
    bad = {(("segment_frames", 80),): "segment_frames must be 4n+1",
           (("segment_frames", 4097),): "segment_frames 4097 is above 4093",
           (("motion_frames", 8), ("chaining", "motion_frames")): "motion_frames must be 4m+1",
           (("segment_frames", 13), ("motion_frames", 13), ("chaining", "pinned_latents")):
               "less than segment_frames (13)",
           (("chaining", "overlap"),): "chaining must be one of last_frame, motion_frames, pinned_latents",
           (("color_match", 1.5),): "color_match must be in 0..1",
           (("max_image_frames", -1),): "max_image_frames must be 0 or more",
           # these once passed validation and failed after the models had loaded
           (("audio_guidance_start", 0.6), ("audio_guidance_end", 0.2)): "must satisfy 0 <= start <= end <= 1",
           (("audio_guidance_end", 1.5),): "must satisfy 0 <= start <= end <= 1",
           (("attention", "flash"),): "attention 'flash' needs the flash-attn package",

           (("compile", True), ("device_type", "cuda")): "compile on a GPU needs Triton",
           (("parallel", "cfg=two"),): "cfg needs a whole number",
           (("parallel_workers", "threads"),): "parallel_workers must be one of processes, ray",
           (("filename_prefix", "../../elsewhere/long"),): "leads outside ComfyUI's output folder"}
    for changes, words in bad.items():
        message = check(**dict(changes))
        assert message.startswith("FantasyTalking Sampler: ") and words in message and "\n" not in message, message
    assert "needs the ray package (pip install ray)" in check(parallel="cfg=2", parallel_workers="ray")
    assert check(parallel="", parallel_workers="ray") is None  # no workers to start
    missing.discard("ray")  # Ray workers compile on their own machines, whose Triton is theirs
    assert check(compile=True, device_type="cuda", parallel="cfg=2", parallel_workers="ray") is None
    assert check(compile=True, device_type="cuda", parallel=None) is None  # fed by a link: the workers may be Ray's
    # the prefix matters only when the video is written to a file
    assert check(filename_prefix="../../elsewhere/long", writes_file=False) is None


def test_sampler_inputs_fed_by_links_are_checked_when_known():
    # ComfyUI validates a widget fed by a link as None: once a crash in validation ("'NoneType' object has no
    # attribute 'strip'"); its value is checked when the node runs
    unknown = {name: None for name in SAMPLER_INPUTS}
    assert convert.check_sampler_inputs(**unknown, output_dir="/tmp") is None
    assert "must satisfy 0 <= start" in convert.check_sampler_inputs(**{**unknown, "audio_guidance_start": 0.8,
                                                                        "audio_guidance_end": 0.1})
    assert convert.check_sampler_inputs(**{**unknown, "audio_guidance_start": 0.8}) is None  # the end comes later
    assert "attention must be one of sdpa, flash, sage, xformers" in convert.check_sampler_inputs(
        **{**unknown, "attention": "magic"})


def test_the_sampler_tries_the_attention_library_on_its_device_only_when_it_runs(tmp_path, monkeypatch):
    # validate_inputs runs on ComfyUI's server thread, maybe beside a running job: it only checks the library is
    # installed; execute tries one call on the sampler's device (an install built for another PyTorch fails there)
    import torch

    seen = []
    monkeypatch.setattr(convert, "check_attention", lambda name, device=None: seen.append((name, device)) or name)
    inputs = {**SAMPLER_INPUTS, "attention": "sage", "output_dir": str(tmp_path)}
    assert convert.check_sampler_inputs(**inputs) is None
    assert convert.check_sampler_inputs(**inputs, attention_device=torch.device("cuda", 1)) is None
    assert seen == [("sage", None), ("sage", torch.device("cuda", 1))]


def test_image_memory_estimate_of_ten_minutes_at_512():
    assert round(convert.image_gigabytes(13805, 512, 512), 1) == 43.4  # the max_image_frames tooltip's figure


def test_the_sampler_says_what_it_made_and_where_the_model_computed():
    """The sampler node's display: frames, segments, steps, the placement (a budget's choice named as such) or
    the pool's workers and how each places its copy, and the file a long video went to."""
    from pathlib import Path
    from types import SimpleNamespace

    from fantasytalking_core.audio.timeline import plan_segments
    from fantasytalking_core.runtime.parallel import parse_parallel

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert convert.where_it_computes("resident", cuda, None, None) == "model whole on cuda:0"
    assert convert.where_it_computes("streamed", cuda, 24.0, None) == ("model streamed block by block to cuda:0 "
                                                                       "(within the 24 GiB budget)")
    assert convert.where_it_computes("resident", cpu, 24.0, None) == "model whole on cpu"  # a budget: GPUs only

    def pool(text, keep=True, device_type="cuda"):
        return SimpleNamespace(layout=parse_parallel(text), backend="ray", keep_on_device=keep,
                               device_type=device_type)

    assert convert.where_it_computes(None, cuda, None, pool("cfg=3")) == ("parallel cfg=3,ring=1,ulysses=1: 3 "
                                                                          "workers (ray), each its copy of the "
                                                                          "model kept on its GPU")
    assert convert.where_it_computes(None, cpu, None, pool("cfg=2", device_type="cpu")).endswith(
        "each its copy of the model kept on the CPU")
    assert convert.where_it_computes(None, cuda, None, pool("cfg=2", False)).endswith(
        "each streaming its copy block by block to its GPU")
    assert convert.where_it_computes(None, cuda, 16.0, pool("cfg=2", False)).endswith(
        "each placing its copy within the 16 GiB budget")
    assert convert.where_it_computes(None, cuda, None, pool("ulysses=4,fsdp")).endswith(
        "4 workers (ray), each its share of the weights on its GPU")

    one, long = plan_segments(73, 23.0, 160, 81, 1), plan_segments(325, 23.0, 700, 81, 1)
    assert convert.describe_sampling(one, 30, "model whole on cuda:0", None) == (
        "73 frames in 1 segment, 30 steps each; model whole on cuda:0")
    assert convert.describe_sampling(long, 4, "x", Path("/out/long_00001_.mp4")) == (
        "325 frames in 5 segments of up to 81 frames, 4 steps each; x\nwritten to long_00001_.mp4 (above "
        "max_image_frames)")
    assert convert.describe_sampling(long, 4, "x", Path("/out/long_00001_.mp4"), (1920, 1080)).endswith(
        "written to long_00001_.mp4 (above max_image_frames), the face pasted back into the 1920x1080 portrait")
