"""``FantasyTalkingPipeline``: portrait + voice in, frames + the matching audio out.

The pipeline composes the parts and owns no maths: audio features (``audio_features``), windows
(``audio_windows``), encoders (``text_encoder``, ``image_encoder``, ``vae``), the DiT (``transformer``) and the
sampler (``schedule``, ``guidance``, ``sampler``). Each model sits on the compute device only while it works
(offloading), and everything it put there is freed when a run ends or fails.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .audio.encode import AudioFeatures, extract_audio_features
from .audio.rules import crop_samples_for_frames
from .audio.io import DecodedAudio, load_audio
from .audio.windows import audio_windows_for_frames, gather_audio_windows, latent_frame_count
from .errors import SettingsError
from .sampling.guidance import GuidanceConfig
from .encoders.image import encode_image_clip
from .media.image import comfy_image_to_pil, image_to_tensor, load_image
from .face.motion import MotionIntensity, audio_cfg_for, audio_scale_map
from .sampling.euler import DiTConditions, guided_velocity, initial_noise, sample_flow_euler
from .sampling.schedule import flow_match_sigmas
from .encoders.text import DEFAULT_NEGATIVE_PROMPT, encode_prompt
from .model.transformer import FantasyTalkingModel
from .encoders.vae import decode_latents, image_to_video_condition

ProgressFn = Callable[[int, int], None]


@dataclass
class GenerationSettings:
    """Everything a user chooses for one video (defaults: the official ``infer.py``).

    Attributes:
        fps: video frames per second; the frame count follows the audio (``4*floor(fps*duration/4)+5``).
        max_frames: cap on the frame count (4n+1).
        image_size: longest edge of the video in pixels (sides rounded up to multiples of 16).
        cfg, audio_cfg: text and audio guidance scales; audio_scale: strength of the audio branch.
        audio_guidance_range: fraction of the steps [start, end) with audio guidance.
        batch_passes: run the guidance passes of a step as one batch (faster on a big GPU).
        vae_tile: decode in spatial tiles of this many pixels (bounded memory), or None.
        motion: face/body motion intensity (training-free, see ``motion.py``); None = official behaviour.
        face_box: (x0, y0, x1, y1) of the face in video-frame pixels, where the face intensity applies.
    """

    prompt: str = "A person is talking."
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    seed: int = 1111
    steps: int = 30
    shift: float = 5.0
    cfg: float = 5.0
    audio_cfg: float = 5.0
    audio_scale: float = 1.0
    audio_guidance_range: tuple[float, float] = (0.0, 1.0)
    fps: float = 23
    max_frames: int = 81
    image_size: int = 512
    batch_passes: bool = False
    vae_tile: int | None = None
    motion: MotionIntensity | None = None
    face_box: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        """Check every setting before any work, so a bad value fails in a second, not after the models load."""
        start, end = self.audio_guidance_range
        problems = [
            (self.steps < 1, f"steps must be at least 1, got {self.steps}"),
            (self.max_frames < 5 or (self.max_frames - 1) % 4, f"max_frames must be 4n+1 and at least 5 (e.g. 81), "
                                                                f"got {self.max_frames}"),
            (self.fps <= 0, f"fps must be positive, got {self.fps}"),
            (self.shift <= 0, f"shift must be positive (5 official), got {self.shift}"),
            (not 0 <= start <= end <= 1, f"the audio guidance range must satisfy 0 <= start <= end <= 1, got "
                                         f"[{start}, {end}]"),
            (self.image_size < 16, f"image_size must be at least 16 pixels, got {self.image_size}"),
            (self.vae_tile is not None and (self.vae_tile < 64 or self.vae_tile % 32),
             f"vae_tile must be a multiple of 32 and at least 64 pixels (e.g. 256), got {self.vae_tile}"),
            (self.audio_scale < 0, f"audio_scale must be >= 0, got {self.audio_scale}"),
        ]
        for bad, message in problems:
            if bad:
                raise SettingsError(message + ".")


@dataclass
class GenerationResult:
    """frames: [F, H, W, 3] float32 in 0..1 (ComfyUI IMAGE layout); audio: [C, T] float32, the part of the
    recording the video shows, at its own rate and channels; sample_rate in Hz; fps in frames/s."""

    frames: torch.Tensor
    audio: torch.Tensor
    sample_rate: int
    fps: float


@dataclass
class FantasyTalkingModels:
    """The loaded parts. ``tokenizer`` is the umT5 tokenizer; ``wav2vec2`` the audio encoder."""

    dit: FantasyTalkingModel
    vae: Any
    text_encoder: Any
    tokenizer: Any
    image_encoder: Any
    wav2vec2: Any
    extra: dict = field(default_factory=dict)


@contextmanager
def on_device(module: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """Keep ``module`` on ``device`` inside the block and move it back where it was afterwards, even on error."""
    home = next(module.parameters()).device
    try:  # the move itself may fail half-way (out of memory): move back in every case
        module.to(device)
        yield module
    finally:
        module.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()


class FantasyTalkingPipeline:
    """Portrait + voice -> talking video frames.

    Args:
        models: the loaded parts (see :func:`fantasytalking_core.loaders.model_paths.load_models`).
        device: where the models compute; they wait on their own device (usually the CPU) in between.
    """

    def __init__(self, models: FantasyTalkingModels, device: str | torch.device = "cpu"):
        self.models = models
        self.device = torch.device(device)

    def reference_image(self, image: str | os.PathLike | Image.Image | torch.Tensor, image_size: int) -> torch.Tensor:
        """A file path, PIL image or ComfyUI IMAGE -> [3, H, W] in -1..1 at the video size."""
        if isinstance(image, torch.Tensor):
            image = comfy_image_to_pil(image)
        elif not isinstance(image, Image.Image):
            image = load_image(image)
        return image_to_tensor(image, image_size)

    @torch.no_grad()
    def audio_features(self, audio: str | os.PathLike | Mapping | DecodedAudio,
                       settings: GenerationSettings) -> AudioFeatures:
        with on_device(self.models.wav2vec2, self.device):
            return extract_audio_features(self.models.wav2vec2, audio, settings.fps, settings.max_frames)

    @torch.no_grad()
    def __call__(
        self,
        image: str | os.PathLike | Image.Image | torch.Tensor,
        audio: str | os.PathLike | Mapping,
        settings: GenerationSettings | None = None,
        progress: ProgressFn | None = None,
    ) -> GenerationResult:
        """Generate. ``progress(step, total)`` is called after every denoising step and may raise to interrupt."""
        settings = settings or GenerationSettings()
        m = self.models
        pixels = self.reference_image(image, settings.image_size)  # validate the cheap input first
        recording = load_audio(audio)  # decoded once: the features and the muxed sound come from it
        voice = self.audio_features(recording, settings)
        height, width = pixels.shape[1:]

        with on_device(m.text_encoder, self.device):
            text_pos = encode_prompt(m.text_encoder, m.tokenizer, settings.prompt)[None]
            text_neg = encode_prompt(m.text_encoder, m.tokenizer, settings.negative_prompt)[None] if settings.cfg != 1 else None
        with on_device(m.image_encoder, self.device):
            clip_tokens = encode_image_clip(m.image_encoder, pixels[None])
        tile = (settings.vae_tile, settings.vae_tile) if settings.vae_tile else None
        with on_device(m.vae, self.device):
            y = image_to_video_condition(m.vae, pixels, voice.num_frames, tile_size=tile)

        with on_device(m.dit, self.device):
            latents = generate_latents(m.dit, text_pos, text_neg, clip_tokens, y, voice.features, voice.num_frames,
                                       settings, progress)

        with on_device(m.vae, self.device):
            video = decode_latents(m.vae, latents, tile_size=tile)  # [1, 3, F, H, W] in -1..1
        frames = (video[0].permute(1, 2, 3, 0).float().cpu() + 1) / 2
        # the recording itself (its own rate and channels), cut where the features were cut
        cut = crop_samples_for_frames(voice.num_frames, voice.fps, recording.sample_rate)
        return GenerationResult(frames.clamp(0, 1), recording.waveform[:, :cut], recording.sample_rate, voice.fps)


@torch.no_grad()
def generate_latents(
    dit: FantasyTalkingModel,
    text_pos: torch.Tensor,
    text_neg: torch.Tensor | None,
    clip_tokens: torch.Tensor,
    image_latents: torch.Tensor,
    audio_features: torch.Tensor,
    num_frames: int,
    settings: GenerationSettings,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """The denoising run, shared by the pipeline and the ComfyUI sampler node. Runs where ``dit`` is.

    Args:
        text_pos, text_neg: [1, L, text_dim] umT5 outputs (``text_neg`` None when cfg is 1).
        clip_tokens: [1, 257, 1280] CLIP penultimate tokens of the reference.
        image_latents: [1, 20, T, H/8, W/8] the I2V conditioning y.
        audio_features: [L_audio, 768] wav2vec2 last hidden state of the cropped recording.
        num_frames: video frames (4n+1) the audio features were made for.
    Returns:
        [1, 16, T, H/8, W/8] float32 denoised latent.
    """
    device = dit.device
    frames, height, width = image_latents.shape[2], image_latents.shape[3] * 8, image_latents.shape[4] * 8
    if frames != latent_frame_count(num_frames):
        raise ValueError(f"image_latents has {frames} latent frames but {num_frames} video frames need "
                         f"{latent_frame_count(num_frames)}.")
    windows = audio_windows_for_frames(audio_features.shape[0], num_frames)
    audio_tokens = gather_audio_windows(dit.project_audio(audio_features[None].to(device)), windows)
    scale = audio_scale_map(settings.motion, settings.audio_scale, frames, height, width, settings.face_box)
    cond = DiTConditions(text_pos.to(device), None if text_neg is None else text_neg.to(device),
                         clip_tokens.to(device), image_latents.to(device), audio_tokens,
                         windows.k_lens_tensor().to(device), scale.to(device) if isinstance(scale, torch.Tensor) else scale)
    start, end = settings.audio_guidance_range
    guidance = GuidanceConfig(settings.cfg, audio_cfg_for(settings.motion, settings.audio_cfg), start, end)
    noise = initial_noise((1, dit.transformer.config.out_channels, frames, height // 8, width // 8), settings.seed)
    velocity = guided_velocity(dit, cond, guidance, settings.steps, batch_passes=settings.batch_passes)
    on_step = None if progress is None else (lambda d: progress(d["i"] + 1, settings.steps))
    return sample_flow_euler(velocity, noise.to(device), flow_match_sigmas(settings.steps, settings.shift), on_step)


@dataclass
class FaceCropOptions:
    """Crop -> generate -> paste back. index: which face (0 = largest); margin: see ``face_crop.square_crop``;
    feather: blend width in reference pixels; fallback_whole_image: use the whole image when no face is found;
    box: (x0, y0, x1, y1) of the face in reference pixels, given by the user instead of detection."""

    index: int = 0
    margin: float = 0.6
    feather: int = 16
    fallback_whole_image: bool = False
    box: tuple[float, float, float, float] | None = None


def generate_talking_video(
    pipe: FantasyTalkingPipeline,
    image: str | os.PathLike | Image.Image,
    audio: str | os.PathLike | Mapping,
    settings: GenerationSettings,
    face_crop: FaceCropOptions | None = None,
    progress: ProgressFn | None = None,
) -> GenerationResult:
    """The whole job: optional face crop and paste-back around the pipeline, and the face region for motion.

    With ``face_crop`` the model generates on a square around the face and the frames are pasted back into the
    full-resolution reference (the result has the reference's size). Without it, a non-default motion intensity
    locates the face in the reference to know where the face intensity applies (whole frame if none is found).
    """
    from dataclasses import replace

    from .face.crop import FaceBox, crop_image, detect_faces, paste_back, pick_face, square_crop
    from .media.image import frame_size

    picture = image if isinstance(image, Image.Image) else load_image(image)
    full = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255)  # [H, W, 3] in 0..1
    needs_face = face_crop is not None or (settings.motion is not None and not settings.motion.is_default
                                           and settings.face_box is None)
    if face_crop is not None and face_crop.box is not None:
        faces = [FaceBox(*face_crop.box)]
    else:
        faces = detect_faces(full) if needs_face else []
    if face_crop is not None and (faces or not face_crop.fallback_whole_image):
        info = square_crop(pick_face(faces, face_crop.index), full.shape[0], full.shape[1], face_crop.margin)
        crop = Image.fromarray((crop_image(full, info).numpy() * 255).round().astype(np.uint8))
        side = frame_size(info.size, info.size, settings.image_size)[0]
        result = pipe(crop, audio, replace(settings, face_box=info.face_in(side, side)), progress)
        return replace(result, frames=paste_back(result.frames, full, info, face_crop.feather))
    if faces and settings.face_box is None and settings.motion is not None and not settings.motion.is_default:
        width, height = frame_size(picture.width, picture.height, settings.image_size)
        face = pick_face(faces, face_crop.index if face_crop else 0)
        sx, sy = width / picture.width, height / picture.height
        settings = replace(settings, face_box=(face.x0 * sx, face.y0 * sy, face.x1 * sx, face.y1 * sy))
    return pipe(picture, audio, settings, progress)


def save_result(result: GenerationResult, path: str | Path) -> Path:
    """Write ``result`` as an H.264 mp4 with the voice muxed as AAC."""
    from .media.video import write_video

    return write_video(path, result.frames, result.fps, result.audio, result.sample_rate)
