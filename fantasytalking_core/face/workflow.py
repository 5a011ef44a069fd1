"""The face-crop workflow around a generation: crop to the face, generate, paste back at full resolution.

Also locates the face for motion intensity when the user gives no box. ``pipe`` is any callable with the
``FantasyTalkingPipeline`` signature, so this module needs nothing from the pipeline at run time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ..audio.io import DecodedAudio
from ..errors import SettingsError
from ..media.image import frame_size, load_image
from .crop import FaceBox, check_margin, crop_image, detect_faces, paste_back, pick_face, square_crop

if TYPE_CHECKING:
    from ..pipeline import FantasyTalkingPipeline, GenerationResult
    from ..settings import GenerationSettings

ProgressFn = Callable[[int, int], None]


# what the command line offers when detection finds no face (its flags)
NO_FACE_REMEDY = ("Use a clear, frontal portrait, give the face with --face-box x0,y0,x1,y1, or add --face-fallback "
                  "to use the whole image.")


@dataclass
class FaceCropOptions:
    """Crop -> generate -> paste back. index: which face (0 = largest); margin: see ``crop.square_crop``;
    feather: blend width in reference pixels; fallback_whole_image: use the whole image when no face is found;
    box: (x0, y0, x1, y1) of the face in reference pixels, given by the user instead of detection."""

    index: int = 0
    margin: float = 0.6
    feather: int = 16
    fallback_whole_image: bool = False
    box: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        """Refuse, before any face is looked for, values no crop can use."""
        if self.index < 0:
            raise SettingsError(f"the face index must be 0 (the largest face) or more, got {self.index}.")
        check_margin(self.margin)
        if self.feather < 0:
            raise SettingsError(f"the face feather must be 0 pixels (a hard edge) or more, got {self.feather}.")


@dataclass
class PreparedJob:
    """What the pipeline gets for a job, and what to do with its frames.

    image: the picture the model sees (the face square with a face crop, else the portrait); settings: with the
    face region filled in where motion intensity needs it; finish: frames [F, h, w, 3] -> the video's frames
    (paste-back into the full-resolution portrait, or the frames unchanged); works chunk by chunk.
    """

    image: Image.Image
    settings: GenerationSettings
    finish: Callable[[torch.Tensor], torch.Tensor]


def prepare_job(
    image: str | os.PathLike | Image.Image,
    settings: GenerationSettings,
    face_crop: FaceCropOptions | None = None,
) -> PreparedJob:
    """The face-crop and motion-region decisions of :func:`generate_talking_video`, before any generation.

    With ``face_crop`` the model generates on a square around the face and ``finish`` pastes the frames back into
    the full-resolution reference (the result has the reference's size). Without it, a non-default motion
    intensity locates the face in the reference to know where the face intensity applies (whole frame if none is
    found).
    """
    picture = image if isinstance(image, Image.Image) else load_image(image)
    full = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255)  # [H, W, 3] in 0..1
    needs_face = face_crop is not None or (settings.motion is not None and not settings.motion.is_default
                                           and settings.face_box is None)
    if face_crop is not None and face_crop.box is not None:
        faces = [FaceBox(*face_crop.box)]
    else:
        faces = detect_faces(full) if needs_face else []
    if face_crop is not None and (faces or not face_crop.fallback_whole_image):
        info = square_crop(pick_face(faces, face_crop.index, NO_FACE_REMEDY), full.shape[0], full.shape[1],
                           face_crop.margin)
        crop = Image.fromarray((crop_image(full, info).numpy() * 255).round().astype(np.uint8))
        side = frame_size(info.size, info.size, settings.image_size)[0]
        return PreparedJob(crop, replace(settings, face_box=info.face_in(side, side)),
                           lambda frames: paste_back(frames, full, info, face_crop.feather))
    if faces and settings.face_box is None and settings.motion is not None and not settings.motion.is_default:
        width, height = frame_size(picture.width, picture.height, settings.image_size)
        face = pick_face(faces, face_crop.index if face_crop else 0)
        settings = replace(settings, face_box=face.scaled(width / picture.width, height / picture.height).as_tuple())
    return PreparedJob(picture, settings, lambda frames: frames)


def generate_talking_video(
    pipe: FantasyTalkingPipeline,
    image: str | os.PathLike | Image.Image,
    audio: str | os.PathLike | Mapping | DecodedAudio,
    settings: GenerationSettings,
    face_crop: FaceCropOptions | None = None,
    progress: ProgressFn | None = None,
) -> GenerationResult:
    """The whole job: optional face crop and paste-back around the pipeline, and the face region for motion
    (see :func:`prepare_job`)."""
    return run_job(pipe, prepare_job(image, settings, face_crop), audio, progress)


def run_job(pipe: FantasyTalkingPipeline, job: PreparedJob, audio: str | os.PathLike | Mapping | DecodedAudio,
            progress: ProgressFn | None = None) -> GenerationResult:
    """Generate a prepared job (:func:`prepare_job`, which can run before any model loads) as one clip."""
    result = pipe(job.image, audio, job.settings, progress)
    return replace(result, frames=job.finish(result.frames))
