"""Plain functions between ComfyUI's values and the library (no ComfyUI import, so CI tests them directly).

ComfyUI values, as the core nodes make them:

- IMAGE: [B, H, W, 3] float32 in 0..1.
- AUDIO: ``{"waveform": [B, C, samples] float, "sample_rate": int}``.
- CONDITIONING (CLIPTextEncode): ``[[text_tokens [1, L, C], {...}]]``; for Wan's umT5-XXL, L = 512 rows (the padding
  rows are zeros) and C = 4096.
- CLIP_VISION_OUTPUT (CLIPVisionEncode): ``penultimate_hidden_states`` [B, 257, 1280] for ViT-H/14.
- VAE: ``encode(pixels [F, H, W, 3] in 0..1) -> [1, 16, T, H/8, W/8]`` raw Wan latents (not normalized) and
  ``decode(raw latents) -> [1, F, H, W, 3]`` in 0..1.

The DiT works on normalized latents, ``(mu - mean) / std`` with the Wan2.1 tables, and expects the official I2V
conditioning ``y = [4 mask channels, normalized latent of (image, F-1 zero frames)]``; this module builds it from
ComfyUI's VAE.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import replace
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch

from fantasytalking_core.audio.encode import AudioFeatures, extract_audio_features
from fantasytalking_core.audio.rules import crop_samples_for_frames
from fantasytalking_core.errors import (AudioInputError, FantasyTalkingError, FaceNotFoundError, ImageInputError,
                                        MissingDependencyError, ModelFileError)
from fantasytalking_core.model.adapter import TEXT_LEN
from fantasytalking_core.face.crop import (CropInfo, box_from_mask, crop_image, detect_faces, paste_back, pick_face,
                                           square_crop)
from fantasytalking_core.face.identity import identity_report
from fantasytalking_core.encoders.image import preprocess_clip_image
from fantasytalking_core.encoders.text import clean_prompt
from fantasytalking_core.encoders.vae import known_frames_mask, latent_num_frames, vae_config
from fantasytalking_core.media.image import comfy_image_to_pil, image_to_tensor
from fantasytalking_core.model.transformer import IMAGE_TOKENS, FantasyTalkingModel
from fantasytalking_core.audio.timeline import SegmentPlan, plan_segments
from fantasytalking_core.errors import SettingsError
from fantasytalking_core.long_video import stream_to_file
from fantasytalking_core.media.video import DEFAULT_CRF
from fantasytalking_core.pipeline import (GenerationSettings, budget_settings, check_dit_fits, sample_latents,
                                          sample_latents_in_worker)
from fantasytalking_core.sampling.segments import SegmentOptions, generate_segments, segment_seed
from fantasytalking_core.runtime.placement import dit_on_device, on_device
from fantasytalking_core.runtime.attention import check_attention
from fantasytalking_core.runtime.compile import check_compile
from fantasytalking_core.runtime.pool import POOL_BACKENDS, SamplerPool

from .parallel import check_parallel_text

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
WAN21_LATENT_CHANNELS = 16
VAE_STRIDE = 8  # pixels per latent cell, each spatial side


@dataclass(frozen=True)
class EncodedAudio:
    """What the audio encode node hands to the sampler.

    Attributes:
        features: wav2vec2 features of the part of the recording the video shows, with the frame count and fps.
        audio: that same part of the original recording, a ComfyUI AUDIO at its own sample rate and channels.
    """

    features: AudioFeatures
    audio: dict


@dataclass(frozen=True)
class Identity:
    """The reference portrait, ready for the sampler.

    Attributes:
        pixels: [1, H, W, 3] float32 in 0..1, the portrait at the video frame size (sides multiples of 16).
        clip_tokens: [1, 257, C] CLIP vision penultimate tokens of the portrait.
        vae: ComfyUI's Wan2.1 VAE; the sampler encodes the conditioning video and decodes the frames with it.
        face_box: (x0, y0, x1, y1) of the face in video-frame pixels (from the face crop, or found in the portrait),
            else None.
        face_note: how the face region was found, or why not (shown on the node).
        crop: the face crop the portrait was cut from (Face Crop's record), else None: a video the sampler writes
            to a file gets the face pasted back into the full portrait there, since no node can do it after.
    """

    pixels: torch.Tensor
    clip_tokens: torch.Tensor
    vae: Any
    face_box: tuple[float, float, float, float] | None = None
    face_note: str = ""
    crop: FaceCrop | None = None

    @property
    def frame_size(self) -> tuple[int, int]:
        """(width, height) of the video in pixels."""
        return int(self.pixels.shape[2]), int(self.pixels.shape[1])


# --------------------------------------------------------------------------------------------------------------------
# Text and image conditioning
# --------------------------------------------------------------------------------------------------------------------


UMT5_END_TOKEN = 1  # umT5's </s>; 0 pads


def truncate_umt5_tokens(tokens: Mapping[str, list], max_tokens: int = TEXT_LEN) -> dict[str, list]:
    """ComfyUI umT5 tokens cut the way the official tokenizer cuts (``truncation=True, max_length=512``): the
    first ``max_tokens - 1`` prompt tokens, then ``</s>``.

    Args:
        tokens: ``clip.tokenize`` output, ``{"umt5xxl": [batch]}`` where the batch is a list of ``(token, weight)``
            (or ``(token, weight, word_id)``) tuples: the prompt, ``</s>``, then padding up to 512 (ComfyUI's umT5
            tokenizer puts a whole prompt in one batch).
    Returns:
        The same layout with at most ``max_tokens`` entries in the batch (a short prompt is returned unchanged).
    """
    out = {}
    for key, batches in tokens.items():
        if len(batches) != 1:
            raise ValueError(f"expected ComfyUI's umT5 tokens in one batch, got {len(batches)}: is this a Wan "
                             "text encoder (Load CLIP, type wan)?")
        batch = list(batches[0])
        ids = [entry[0] for entry in batch]
        end = ids.index(UMT5_END_TOKEN) if UMT5_END_TOKEN in ids else len(ids)
        if end >= max_tokens:  # too long: the prompt's first max_tokens - 1 tokens, then its own </s> entry
            end_entry = batch[end] if end < len(batch) else (UMT5_END_TOKEN, 1.0)
            batch = batch[: max_tokens - 1] + [end_entry]
        out[key] = [batch]
    return out


def encode_text_official(clip: Any, text: str) -> list:
    """The FantasyTalking Text Encode node's work: CONDITIONING of ``text`` as the official pipeline encodes it.

    The prompt is cleaned as Wan cleans it (:func:`clean_prompt`: ftfy, HTML unescape, whitespace), tokenized
    without ComfyUI's ``(word:1.2)`` weighting (the model never saw it), cut at 512 tokens *before* encoding
    (:func:`truncate_umt5_tokens`; core CLIP Text Encode encodes a longer prompt whole, so even its first 512 rows
    differ), then encoded by ComfyUI's text encoder.
    """
    tokens = clip.tokenize(clean_prompt(text), disable_weights=True)
    return clip.encode_from_tokens_scheduled(truncate_umt5_tokens(tokens))


def conditioning_to_text(conditioning: Sequence, which: str, text_dim: int) -> torch.Tensor:
    """CONDITIONING of the core CLIPTextEncode -> the DiT's text context [1, L, text_dim] float32 (L <= 512).

    Args:
        which: "positive" or "negative", for messages.
        text_dim: width the DiT's text embedding takes (4096: umT5-XXL).
    """
    where = f"FantasyTalking Sampler: the {which} CONDITIONING"
    if not isinstance(conditioning, Sequence) or len(conditioning) == 0:
        raise ValueError(f"{where} is empty; connect a CLIPTextEncode node.")
    if len(conditioning) > 1:
        raise ValueError(f"{where} holds {len(conditioning)} prompts (Conditioning Combine?); FantasyTalking takes one. "
                         "Join the texts in one CLIPTextEncode, or use Conditioning Concat.")
    tokens = conditioning[0][0]
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3 or tokens.shape[0] != 1:
        shape = list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"{where} should be one prompt [1, tokens, width], got {shape}.")
    if tokens.shape[-1] != text_dim:
        raise ModelFileError(
            f"{where} is {tokens.shape[-1]} wide, but the diffusion model reads {text_dim}-wide text (umT5-XXL for "
            "Wan2.1). Load umt5_xxl_fp16.safetensors (or _fp8_e4m3fn_scaled) with the core Load CLIP node, type wan.")
    if tokens.shape[1] > TEXT_LEN:
        logger.warning("%s has %d tokens; Wan reads the first %d, as the official pipeline does.",
                       where, tokens.shape[1], TEXT_LEN)
        tokens = tokens[:, :TEXT_LEN]
    return tokens.float()


def clip_vision_tokens(output: Any) -> torch.Tensor:
    """CLIP_VISION_OUTPUT of the core CLIPVisionEncode -> [1, 257, C] float32 penultimate tokens (first image)."""
    where = "FantasyTalking Identity Encode: the CLIP vision output"
    try:
        states = output["penultimate_hidden_states"]
    except (KeyError, TypeError, AttributeError):
        states = None
    if not isinstance(states, torch.Tensor):
        raise ValueError(f"{where} has no penultimate_hidden_states; connect a core CLIPVisionEncode node.")
    if states.ndim != 3 or states.shape[1] != IMAGE_TOKENS:
        raise ModelFileError(
            f"{where} has shape {list(states.shape)}; FantasyTalking needs {IMAGE_TOKENS} tokens per image (CLS + 16x16 "
            "patches: a ViT-*/14 at 224 px such as clip_vision_h.safetensors).")
    return states[:1].float()


def check_image_tokens(tokens: torch.Tensor, image_dim: int) -> None:
    """Refuse CLIP tokens of another width than the DiT's image embedding takes (1280: CLIP ViT-H/14)."""
    if tokens.shape[-1] != image_dim:
        raise ModelFileError(
            f"FantasyTalking Sampler: the identity's CLIP tokens are {tokens.shape[-1]} wide, but the diffusion model "
            f"reads {image_dim}-wide image tokens. Load clip_vision_h.safetensors (CLIP ViT-H/14) in Load CLIP Vision.")


def reference_pixels(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """IMAGE [B, H, W, 3] -> [1, h, w, 3] in 0..1 at the video frame size (first image of the batch).

    The official sizing: the longest side becomes ``image_size`` pixels with the aspect kept, both sides rounded
    up to multiples of 16, Lanczos resampling of the 8-bit image.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        shape = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ImageInputError(f"FantasyTalking Identity Encode: expected an IMAGE [batch, height, width, 3], got {shape}.")
    pixels = image_to_tensor(comfy_image_to_pil(image), image_size)  # [3, h, w] in -1..1
    return ((pixels.permute(1, 2, 0) + 1) / 2)[None]


def check_wan21_vae(vae: Any) -> None:
    """Refuse a ComfyUI VAE that does not make Wan2.1 latents (16 channels, 3-D, 8x spatial stride)."""
    channels = getattr(vae, "latent_channels", WAN21_LATENT_CHANNELS)
    dims = getattr(vae, "latent_dim", 3)
    if channels != WAN21_LATENT_CHANNELS or dims != 3:
        hint = " (the Wan2.2 VAE)" if channels == 48 else ""
        raise ModelFileError(
            f"FantasyTalking Identity Encode: this VAE makes {channels}-channel {dims}-D latents{hint}; FantasyTalking "
            "needs the Wan2.1 VAE (wan_2.1_vae.safetensors, 16-channel video latents).")


def official_clip_tokens(clip_vision: Any, pixels: torch.Tensor,
                         load_model: Callable[[Any], None] = lambda patcher: None) -> torch.Tensor:
    """CLIP tokens the official way with ComfyUI's CLIP_VISION model: [1, 257, C] float32 on the CPU.

    The video-size frame is squashed to 224 x 224 by the library's :func:`preprocess_clip_image` (bicubic, no
    antialias, no centre crop, as Wan), then runs through the vision model past ComfyUI's own preprocessing, which
    would antialias the resize and round it to 8 bits (about 3% of the input's std away on a 3:4 portrait).

    Args:
        clip_vision: ComfyUI's ClipVisionModel (``patcher``, ``model``, ``load_device``, ``image_size``,
            ``image_mean``, ``image_std``), e.g. clip_vision_h.safetensors from the core Load CLIP Vision node.
        pixels: [1, H, W, 3] in 0..1, the portrait at the video frame size (:func:`reference_pixels`).
        load_model: puts ``clip_vision.patcher`` on its device (``comfy.model_management.load_model_gpu``).
    """
    load_model(clip_vision.patcher)
    config = SimpleNamespace(image_size=clip_vision.image_size, image_mean=clip_vision.image_mean,
                             image_std=clip_vision.image_std)
    values = preprocess_clip_image(pixels.permute(0, 3, 1, 2) * 2 - 1, config)  # [1, 3, 224, 224]
    out = clip_vision.model(pixel_values=values.to(clip_vision.load_device), intermediate_output=-2)
    return clip_vision_tokens({"penultimate_hidden_states": out[1]})


def encode_identity(image: torch.Tensor, vae: Any, clip_vision_output: Any, image_size: int,
                    crop: FaceCrop | None = None, locate_face: bool = False, clip_vision: Any = None,
                    load_model: Callable[[Any], None] = lambda patcher: None) -> Identity:
    """The identity node's work: check the VAE, size the portrait, take the CLIP tokens, and find the face region.

    The CLIP tokens come from ``clip_vision`` the official way (:func:`official_clip_tokens`) when it is given, else
    from a core CLIP Vision Encode output (``clip_vision_output``: approximate, ComfyUI's preprocessing). The face
    box (video-frame pixels, for the motion intensities) comes from the face crop when ``crop`` made the portrait,
    else from face detection on the portrait when ``locate_face`` is set (None if no face is found).
    """
    if clip_vision is None and clip_vision_output is None:
        raise ValueError("FantasyTalking Identity Encode needs the CLIP vision model: connect Load CLIP Vision "
                         "(clip_vision_h.safetensors) to its clip_vision input.")
    check_wan21_vae(vae)
    pixels = reference_pixels(image, image_size)
    height, width = pixels.shape[1:3]
    face_box, note = None, "no face region"
    if crop is not None and crop.info is not None:
        face_box, note = crop.info.face_in(width, height), "face region from the face crop"
    elif locate_face:  # on the full-resolution portrait: a face too small at the video size is still found
        try:
            faces = detect_faces(image[0].float().cpu())
        except MissingDependencyError:  # a help, not a requirement: the basic workflow runs without dlib
            faces, note = [], "face not located (dlib is not installed: pip install dlib-bin), whole frame"
        scale = (width / image.shape[2], height / image.shape[1])
        if faces:
            face_box, note = faces[0].scaled(*scale).as_tuple(), "face region found"
    tokens = (official_clip_tokens(clip_vision, pixels, load_model) if clip_vision is not None
              else clip_vision_tokens(clip_vision_output))
    return Identity(pixels, tokens, vae, face_box, note, crop if crop is not None and crop.info is not None else None)


# --------------------------------------------------------------------------------------------------------------------
# Face crop and paste-back
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaceCrop:
    """What travels from the face crop node to the paste-back node.

    Attributes:
        info: where the square came from; None when no face was found and the whole image was used (fallback).
        reference: [H, W, 3] float32 0..1, the full-resolution reference the frames are pasted back into.
    """

    info: CropInfo | None
    reference: torch.Tensor


# what Face Crop offers when detection finds no face (its own inputs)
FACE_CROP_REMEDY = ("FantasyTalking Face Crop: paint the face in a mask (right-click the image, Open in MaskEditor) "
                    "and connect it to mask, or switch on fallback_whole_image.")


def crop_face(image: torch.Tensor, face_index: int = 0, margin: float = 0.6, mask: torch.Tensor | None = None,
              fallback_whole_image: bool = False) -> tuple[torch.Tensor, FaceCrop]:
    """IMAGE [B, H, W, 3] (first image used) -> (the square face crop [1, S, S, 3], the crop record).

    The face comes from ``mask`` (its bounding box) when given, else from detection (``face_index`` 0 = largest).
    """
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ImageInputError(f"FantasyTalking Face Crop: expected an IMAGE [B, H, W, 3], got {tuple(image.shape)}.")
    reference = image[0].float().cpu()
    if mask is not None and tuple(mask.shape[-2:]) != tuple(reference.shape[:2]):
        raise ImageInputError(f"FantasyTalking Face Crop: the mask is {tuple(mask.shape[-2:])} but the image is "
                              f"{tuple(reference.shape[:2])}; paint the mask on this image.")
    try:
        face = box_from_mask(mask[0] if mask.ndim == 3 else mask) if mask is not None else pick_face(
            detect_faces(reference), face_index, FACE_CROP_REMEDY)
    except FaceNotFoundError:
        if not fallback_whole_image:
            raise
        return image[:1], FaceCrop(None, reference)
    info = square_crop(face, reference.shape[0], reference.shape[1], margin)
    return crop_image(reference, info)[None], FaceCrop(info, reference)


def paste_face(frames: torch.Tensor, crop: FaceCrop, feather: int = 16) -> torch.Tensor:
    """Generated (or upscaled) frames [F, h, w, 3] -> the full-resolution reference with them pasted in.

    After a fallback (no face, whole image used) the frames are returned as they are.
    """
    written = getattr(frames, PREVIEW_OF, None)
    if written is not None and (getattr(frames, PASTED_BACK, False) or crop.info is None):
        raise SettingsError(f"FantasyTalking Face Paste Back: these are {len(frames)} preview frames of a video "
                            f"longer than the sampler's max_image_frames, which it wrote to {Path(written).name} "
                            + ("with the face pasted back already" if getattr(frames, PASTED_BACK, False) else
                               "whole (Face Crop found no face, so there is nothing to paste back)")
                            + ": save the sampler's video output (Save Video) instead of these frames.")
    if written is not None:
        raise SettingsError(f"FantasyTalking Face Paste Back: these are {len(frames)} preview frames of a video "
                            f"longer than the sampler's max_image_frames, which it wrote to {Path(written).name} "
                            "without the paste-back. Connect Face Crop's crop_info to Identity Encode too (with the "
                            "sampler's paste_face_back on), so the sampler pastes the face back into the file, or "
                            "raise max_image_frames above the video's frame count to paste back every frame here.")
    if crop.info is None:
        return frames
    return paste_back(frames.float().cpu(), crop.reference, crop.info, feather)


# --------------------------------------------------------------------------------------------------------------------
# Latents through ComfyUI's VAE
# --------------------------------------------------------------------------------------------------------------------


def check_identity(reference: torch.Tensor, images: torch.Tensor, every_nth_frame: int = 4,
                   progress: ProgressFn | None = None) -> tuple[float | None, float | None, str]:
    """Identity Check's outputs: (mean, min similarity, the text shown on the node) of every n-th frame of
    ``images`` [F, H, W, 3] against the first ``reference`` image [B, H, W, 3] (both 0..1). No face to measure
    (or no dlib) gives (None, None, why): the node never fails a job whose video is already made. ``progress``:
    called after each checked frame (the node's bar and Cancel)."""
    score, text = identity_report(reference[0], images, stride=every_nth_frame, progress=progress)
    return (None, None, text) if score is None else (score.mean, score.minimum, text)


def _wan21_latent_stats() -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each [1, 16, 1, 1, 1] float32: the Wan2.1 latent tables."""
    config = vae_config()
    shape = (1, -1, 1, 1, 1)
    return (torch.tensor(config["latents_mean"], dtype=torch.float32).view(shape),
            torch.tensor(config["latents_std"], dtype=torch.float32).view(shape))


def normalize_latents(raw: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents [B, 16, T, h, w] (what ComfyUI's VAE.encode returns) -> the DiT's (mu - mean) / std."""
    mean, std = _wan21_latent_stats()
    return (raw.float() - mean.to(raw.device)) / std.to(raw.device)


def denormalize_latents(latents: torch.Tensor) -> torch.Tensor:
    """The DiT's normalized latents [B, 16, T, h, w] -> raw latents for ComfyUI's VAE.decode."""
    mean, std = _wan21_latent_stats()
    return latents.float() * std.to(latents.device) + mean.to(latents.device)


def conditioning_video(pixels: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[num_frames, H, W, 3] in 0..1: the K known frames ``pixels`` [K, H, W, 3] (the portrait, K = 1; a long
    video's motion frames), then mid-grey frames (0 in the model's -1..1 range).

    Encoded, this is Wan I2V's conditioning video ``[known frames, num_frames - K zero frames]``.
    """
    latent_num_frames(num_frames)  # refuses counts that are not 4k+1
    video = torch.full((num_frames, *pixels.shape[1:]), 0.5, dtype=torch.float32)
    video[: len(pixels)] = pixels
    return video


def image_condition(vae: Any, pixels: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The I2V conditioning ``y`` [1, 20, T, H/8, W/8] float32 from ComfyUI's VAE (see the module docstring), for
    K known first frames ``pixels`` [K, H, W, 3] in 0..1 (K = 1: the portrait; K = 4m+1: latent frames 0..m known,
    ``encoders.vae.known_frames_mask``)."""
    height, width = pixels.shape[1:3]
    raw = vae.encode(conditioning_video(pixels, num_frames))
    want = (1, WAN21_LATENT_CHANNELS, latent_num_frames(num_frames), height // VAE_STRIDE, width // VAE_STRIDE)
    if tuple(raw.shape) != want:
        raise ModelFileError(f"FantasyTalking Sampler: the VAE encoded {num_frames} frames of {width}x{height} to "
                             f"{list(raw.shape)}, a Wan2.1 VAE gives {list(want)}. Use wan_2.1_vae.safetensors.")
    latent = normalize_latents(raw.cpu())
    mask = known_frames_mask(num_frames, len(pixels), height, width)
    return torch.cat([mask[None], latent], dim=1)


def decode_frames(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """The sampler's normalized latents [1, 16, T, h, w] -> IMAGE frames [4(T-1)+1, H, W, 3] in 0..1."""
    frames = vae.decode(denormalize_latents(latents))
    return frames.reshape(-1, *frames.shape[-3:]).float()


# --------------------------------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------------------------------


def trim_audio(audio: Mapping, num_frames: int, fps: float) -> dict:
    """The first ``num_frames / fps`` seconds of a ComfyUI AUDIO (first recording of the batch), as an AUDIO.

    The cut is the one the features were made from (``crop_samples_for_frames``), at the recording's own rate.
    """
    rate = int(audio["sample_rate"])
    waveform = audio["waveform"]
    if waveform.ndim != 3:
        raise AudioInputError(f"AUDIO waveform must be [batch, channels, samples], got {list(waveform.shape)}.")
    return {"waveform": waveform[:1, :, : crop_samples_for_frames(num_frames, fps, rate)], "sample_rate": rate}


def encode_audio(model: torch.nn.Module, audio: Mapping, fps: float, max_frames: int, device: torch.device,
                 progress: ProgressFn | None = None) -> EncodedAudio:
    """The audio node's work: wav2vec2 features on ``device`` (the model returns to where it was) + the trimmed AUDIO."""
    with on_device(model, device):
        features = extract_audio_features(model, audio, fps, max_frames, progress=progress)
    return EncodedAudio(features, trim_audio(audio, features.num_frames, fps))


def describe_audio(encoded: EncodedAudio) -> str:
    """One line for the node's display: the frame count the video will have and what it covers."""
    f = encoded.features
    capped = " (capped by max_frames)" if f.video_duration_s < f.duration_s else ""
    warnings = "".join(f"\nWarning: {w}." for w in f.warnings())
    return (f"{f.num_frames} frames = {f.video_duration_s:.2f} s at {f.fps:g} fps{capped}; "
            f"recording {f.duration_s:.2f} s{warnings}")


# --------------------------------------------------------------------------------------------------------------------
# The sampler: a recording of any length in segments, frames in memory or streamed to an mp4
# --------------------------------------------------------------------------------------------------------------------

PREVIEW_FRAMES = 16
"""Frames, spread over the video, that the sampler's ``images`` output holds when the video went to a file."""
PREVIEW_OF = "fantasytalking_preview_of"
"""Attribute of the sampler's IMAGE output when it holds only preview frames of a video it wrote to a file (the
file's path): nodes that need every frame (Face Paste Back) refuse it instead of making a 16-frame video."""
PASTE_FRAMES = 8  # frames pasted back (and written) at a time: 8 at 4K are 0.8 GB in float32
PASTED_BACK = "fantasytalking_pasted_back"
"""Attribute of such preview frames when the file has the face pasted back into the portrait already."""


def mark_preview(frames: torch.Tensor, path: str | Path, pasted_back: bool) -> torch.Tensor:
    """Tag ``frames`` as the preview of the video written to ``path`` (:data:`PREVIEW_OF`, :data:`PASTED_BACK`);
    again after any move, which can make a new tensor. Returns ``frames``."""
    setattr(frames, PREVIEW_OF, str(path))
    setattr(frames, PASTED_BACK, pasted_back)
    return frames


IMAGE_BYTES_PER_PIXEL = 12  # an IMAGE frame: 3 float32 channels per pixel


def image_gigabytes(num_frames: int, width: int, height: int) -> float:
    """Memory of ``num_frames`` IMAGE frames of ``width`` x ``height`` pixels (float32 RGB), in GB (10^9 bytes)."""
    return num_frames * width * height * IMAGE_BYTES_PER_PIXEL / 1e9


def segment_options(segment_frames: int, motion_frames: int, chaining: str, color_match: float = 0.0,
                    crossfade: bool = False) -> SegmentOptions:
    """The sampler's segment inputs as library options; a bad value is one line naming the node, the input and
    the rule (SettingsError)."""
    try:
        return SegmentOptions(segment_frames, motion_frames, chaining, color_match, crossfade)
    except ValueError as error:
        raise SettingsError(f"FantasyTalking Sampler: {error}") from None


def segment_plan(voice: EncodedAudio, options: SegmentOptions) -> SegmentPlan:
    """The segments the sampler cuts ``voice``'s frames into (one for a video of at most ``segment_frames``)."""
    features = voice.features
    return plan_segments(features.num_frames, features.fps, features.num_tokens, options.segment_frames,
                         options.overlap)


def guidance_range_problem(node: str, start: float | None, end: float | None) -> str | None:
    """The line for an audio guidance step range outside 0 <= start <= end <= 1, or None (also while either end is
    not known yet: None)."""
    if None in (start, end) or 0 <= start <= end <= 1:
        return None
    return (f"{node}: audio_guidance_start and audio_guidance_end must satisfy 0 <= start <= end <= 1 (shares of "
            f"the steps), got {start} and {end}.")


def check_sampler_inputs(*, segment_frames: int | None = None, motion_frames: int | None = None,
                         chaining: str | None = None, color_match: float | None = None,
                         max_image_frames: int | None = None, audio_guidance_start: float | None = None,
                         audio_guidance_end: float | None = None, attention: str | None = None,
                         compile: bool | None = None, parallel: str | None = None, parallel_workers: str | None = None,
                         filename_prefix: str | None = None, device_type: str = "cpu",
                         output_dir: str | None = None, writes_file: bool = True,
                         attention_device: torch.device | None = None) -> str | None:
    """The sampler's inputs that are known before the run, checked in its ``validate_inputs`` (ComfyUI shows the
    line before any node runs, so before any model loads) and again in ``execute``: None when this run can use
    them, else one line naming the node, the input and the fix.

    An input given as None is not known yet: ComfyUI passes None at validation for a widget fed by a link, and
    ``execute`` checks its value. ComfyUI skips its own range and dropdown checks for the inputs a
    ``validate_inputs`` takes, so the ranges and choices are checked here. ``device_type``: where the sampler runs
    (``compile`` needs Triton on CUDA); ``output_dir``: ComfyUI's output folder, which ``filename_prefix`` must
    stay in when ``writes_file`` (the video is longer than ``max_image_frames``; the frame count is known only
    when the node runs, so validation checks the prefix only when every video is written: ``max_image_frames``
    0). ``attention_device``: where to try the attention library with one small call (``execute`` gives the
    sampler's device; validation, on ComfyUI's server thread, only checks it is installed).
    """
    node = "FantasyTalking Sampler"
    if max_image_frames is not None and max_image_frames < 0:
        return f"{node}: max_image_frames must be 0 or more, got {max_image_frames}."
    if None not in (segment_frames, motion_frames, chaining, color_match):
        try:
            segment_options(segment_frames, motion_frames, chaining, color_match)
        except SettingsError as error:
            return str(error)
    problem = guidance_range_problem(node, audio_guidance_start, audio_guidance_end) or (
        None if parallel is None else check_parallel_text(parallel))
    if problem:
        return problem
    if parallel_workers is not None and parallel_workers not in POOL_BACKENDS:
        return f"{node}: parallel_workers must be one of {', '.join(POOL_BACKENDS)}, got {parallel_workers!r}."
    ray_workers = bool(parallel and parallel.strip()) and parallel_workers == "ray"
    if ray_workers and importlib.util.find_spec("ray") is None:
        return f"{node}: parallel_workers ray needs the ray package (pip install ray), or choose processes."
    try:
        if attention is not None:
            check_attention(attention, attention_device)
        if compile and None not in (parallel, parallel_workers) and not ray_workers:  # Ray workers compile on
            check_compile(True, device_type, "compile")  # their own machines
    except FantasyTalkingError as error:
        return f"{node}: {error}"
    if filename_prefix is not None and output_dir is not None and writes_file:
        folder = os.path.join(output_dir, os.path.dirname(os.path.normpath(filename_prefix)))
        if not inside_folder(output_dir, folder):
            return (f"{node}: filename_prefix {filename_prefix!r} leads outside ComfyUI's output folder; give a "
                    "path inside it, such as FantasyTalking/long.")
    return None


def inside_folder(folder: str, path: str) -> bool:
    """Whether ``path`` resolves inside ``folder`` (symbolic links followed, as ComfyUI's own check does); a path
    on another Windows drive is not."""
    folder, path = os.path.realpath(folder), os.path.realpath(path)
    try:
        return os.path.commonpath([folder, path]) == folder
    except ValueError:  # another drive
        return False


@dataclass
class SampledVideo:
    """The sampler node's result.

    Attributes:
        images: every frame [F, H, W, 3] float32 in 0..1 when the video is kept in memory; when it was written to
            ``path``, up to :data:`PREVIEW_FRAMES` frames spread evenly over it (every ceil(F / 16)-th from 0).
        path: the mp4 with the voice, or None when the frames are in ``images``.
        plan: the segments (one for a video of at most ``segment_frames``).
    """

    images: torch.Tensor
    path: Path | None
    plan: SegmentPlan


def sample_segments(
    model: FantasyTalkingModel,
    text_pos: torch.Tensor,
    text_neg: torch.Tensor | None,
    identity: Identity,
    voice: EncodedAudio,
    settings: GenerationSettings,
    options: SegmentOptions,
    device: torch.device,
    progress: ProgressFn | None = None,
    make_room: Callable[[], None] | None = None,
    dit_placement: str = "resident",
    gpu_memory: float | None = None,
    pool: SamplerPool | None = None,
) -> SegmentRun:
    """The whole recording ``voice`` in segments on one frame grid (``sampling.segments.generate_segments``, the
    library's segment loop) with ComfyUI's VAE: the plan, an iterator of frame chunks [f, H, W, 3] in 0..1, and
    where the model computes (:class:`SegmentRun`).

    ``progress(step, total)`` counts the steps of all segments (it may raise to interrupt); ``make_room`` is
    called before the memory check and before each move of the DiT to ``device`` (ComfyUI unloads its own
    models there); ``dit_placement`` / ``gpu_memory`` as in ``pipeline.check_dit_fits``. The memory
    check runs here, before anything is sampled; the work happens as the chunks are consumed, the DiT on
    ``device`` for each segment's denoising only (``make_room`` before each move: ComfyUI's VAE ran in between).
    A video of at most ``options.segment_frames`` frames is one segment: the single clip, for every chaining mode.

    With a ``pool`` (a parallel layout, :mod:`.parallel`), each segment's denoising runs in the pool's workers,
    which hold their own copies of the DiT: ``model`` itself stays where it is; each worker checks its own GPU and
    places its copy as ``dit_placement`` / ``gpu_memory`` say (``progress`` still sees every step and may raise
    to stop the workers).
    """
    check_image_tokens(identity.clip_tokens, model.transformer.config.image_dim)
    features = voice.features
    plan = segment_plan(voice, options)
    height, width = identity.pixels.shape[1:3]
    if make_room is not None:
        make_room()
    settings = budget_settings(model, plan.longest, height, width, settings, gpu_memory, pool and pool.layout)
    placement = None if pool is not None else check_dit_fits(
        model, device, plan.longest, height, width, settings, dit_placement, gpu_memory)
    reference = identity.pixels[0].permute(2, 0, 1) * 2 - 1  # [3, H, W] in -1..1

    def condition(known: torch.Tensor, num_frames: int) -> torch.Tensor:
        # the portrait is encoded from the node's own pixels (as the single clip is), not from a -1..1 round trip
        first = known.shape[1] == 1 and torch.equal(known[:, 0], reference)
        pixels = identity.pixels if first else (known.permute(1, 2, 3, 0) + 1) / 2  # [K, H, W, 3] in 0..1
        return image_condition(identity.vae, pixels, num_frames)

    def sample(index: int, y: torch.Tensor, audio: torch.Tensor, num_frames: int, num_tokens: int,
               report: ProgressFn | None, pinned: torch.Tensor | None) -> torch.Tensor:
        if make_room is not None:
            make_room()  # ComfyUI's VAE ran in between; the workers' GPUs include this process's
        segment = replace(settings, seed=segment_seed(settings.seed, index))
        if pool is not None:
            return pool.call(sample_latents_in_worker, text_pos, text_neg, identity.clip_tokens, y, audio,
                             num_frames, segment, num_tokens, pinned, model.loras, progress=report,
                             placement=dit_placement, gpu_memory=gpu_memory)
        with dit_on_device(model, device, placement):
            return sample_latents(model, text_pos, text_neg, identity.clip_tokens, y, audio, num_frames, segment,
                                  report, num_tokens, pinned)

    chunks = generate_segments(plan, features.features, reference, options, condition=condition, sample=sample,
                               decode=lambda latents: decode_frames(identity.vae, latents).cpu(),
                               steps=settings.steps, progress=progress)
    return SegmentRun(plan, chunks, where_it_computes(placement, device, gpu_memory, pool))


class SegmentRun(NamedTuple):
    """What :func:`sample_segments` returns: the plan, the frame chunks (the work happens as they are consumed)
    and where the model computes, in words for the node's display."""

    plan: SegmentPlan
    chunks: Iterator[torch.Tensor]
    where: str


def where_it_computes(placement: str | None, device: torch.device, gpu_memory: float | None,
                      pool: SamplerPool | None) -> str:
    """Where the DiT computes, for the sampler's display: its placement on ``device`` (a budget's choice named as
    such; a budget applies to GPUs only), or the pool's workers and how each places its copy."""
    on_gpu = (pool.device_type if pool is not None else torch.device(device).type) == "cuda"
    budget = f"within the {gpu_memory:g} GiB budget" if gpu_memory and on_gpu else ""
    if pool is None:
        how = "whole on" if placement == "resident" else "streamed block by block to"
        return f"model {how} {device}" + (f" ({budget})" if budget else "")
    home = "its GPU" if on_gpu else "the CPU"
    if pool.layout.fsdp:
        each = f"its share of the weights on {home}"
    elif pool.keep_on_device:
        each = f"its copy of the model kept on {home}"
    else:
        each = f"placing its copy {budget}" if budget else f"streaming its copy block by block to {home}"
    return f"parallel {pool.layout}: {pool.layout.world_size} workers ({pool.backend}), each {each}"


def describe_sampling(plan: SegmentPlan, steps: int, where: str, path: Path | None,
                      pasted_into: tuple[int, int] | None = None) -> str:
    """The sampler's display: the frames, segments and steps it made, where the model computed, and the file a
    long video went to (``pasted_into``: the (width, height) of the portrait its face was pasted back into)."""
    segments = ("1 segment" if len(plan) == 1 else
                f"{len(plan)} segments of up to {plan.segment_frames} frames")
    pasted = f", the face pasted back into the {pasted_into[0]}x{pasted_into[1]} portrait" if pasted_into else ""
    written = f"\nwritten to {path.name} (above max_image_frames){pasted}" if path is not None else ""
    return f"{plan.num_frames} frames in {segments}, {steps} steps each; {where}{written}"


def join_frames(chunks: Iterable[torch.Tensor], num_frames: int) -> torch.Tensor:
    """The chunks [f, H, W, 3] as one [num_frames, H, W, 3] tensor, each copied in and let go as it comes
    (``torch.cat`` of the list would hold every chunk and the joined copy at once: twice the frames' memory)."""
    frames, filled = None, 0
    for chunk in chunks:
        if frames is None:
            frames = chunk.new_empty((num_frames, *chunk.shape[1:]))
        if filled + len(chunk) > num_frames:
            raise RuntimeError(f"the segments made more than the plan's {num_frames} frames")
        frames[filled: filled + len(chunk)] = chunk
        filled += len(chunk)
    if filled != num_frames:
        raise RuntimeError(f"the segments made {filled} frames, the plan {num_frames}")
    return frames


def render_video(plan: SegmentPlan, chunks: Iterator[torch.Tensor], voice: EncodedAudio, max_image_frames: int,
                 output_path: Callable[[], str | Path], crf: int = DEFAULT_CRF, crop: FaceCrop | None = None,
                 feather: int = 16) -> SampledVideo:
    """Consume the chunks of :func:`sample_segments`: a video of at most ``max_image_frames`` frames is kept as
    IMAGE frames (Face Paste Back and upscalers come after); a longer one streams into the mp4 at ``output_path()``
    with the voice muxed, at H.264 quality ``crf`` (library ``long_video.stream_to_file``: memory bounded by one
    segment, a temporary file renamed at the end, so an interrupted or failed run leaves no file), keeping
    :data:`PREVIEW_FRAMES` frames. With ``crop`` (a face crop's record), the frames are pasted back into the full
    portrait (``feather`` pixels of blend, Face Paste Back's default) before they are written, a few at a time
    (:data:`PASTE_FRAMES`: a segment at the portrait's full resolution would take gigabytes): no node can do it
    after."""
    if plan.num_frames <= max_image_frames:
        return SampledVideo(join_frames(chunks, plan.num_frames), None, plan)
    audio = voice.audio
    pasting = crop is not None and crop.info is not None
    if pasting:
        chunks = (paste_back(frames[i:i + PASTE_FRAMES].float().cpu(), crop.reference, crop.info, feather)
                  for frames in chunks for i in range(0, len(frames), PASTE_FRAMES))
    report = stream_to_file(chunks, plan, output_path(), audio["waveform"][0], int(audio["sample_rate"]),
                            PREVIEW_FRAMES, crf)
    if report.samples is not None:  # the frames go on as IMAGE: say they are not the video
        mark_preview(report.samples, report.path, pasting)
    return SampledVideo(report.samples, Path(report.path), plan)
