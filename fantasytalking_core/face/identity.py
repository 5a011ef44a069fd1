"""Identity check: how much the generated frames still look like the reference person.

Like the paper's identity-consistency (IDC) metric, the score is the cosine similarity of face embeddings between
the reference and each frame. The embedding model is dlib's face-recognition ResNet, whose weights ship inside the
``face-recognition-models`` package (nothing is downloaded); faces are found with dlib's HOG detector and aligned
with its 5-point landmarks. Scores are in [-1, 1]; the same person typically scores above ~0.9.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import FaceNotFoundError, MissingDependencyError
from .crop import _as_uint8, detect_faces, face_model_dir, import_dlib, pick_face

class FaceEmbedder:
    """dlib face detector + 5-point aligner + 128-d face-recognition ResNet, loaded once."""

    def __init__(self) -> None:
        dlib = import_dlib()
        folder = face_model_dir()
        self._dlib = dlib
        self._landmarks = dlib.shape_predictor(str(folder / "shape_predictor_5_face_landmarks.dat"))
        self._network = dlib.face_recognition_model_v1(str(folder / "dlib_face_recognition_resnet_model_v1.dat"))

    def embed(self, image: torch.Tensor | np.ndarray, face_index: int = 0) -> torch.Tensor:
        """Unit-length 128-d embedding of the chosen face (0 = largest) in ``image`` [H, W, 3]."""
        pixels = _as_uint8(image)
        face = pick_face(detect_faces(pixels), face_index)
        rect = self._dlib.rectangle(int(face.x0), int(face.y0), int(face.x1) - 1, int(face.y1) - 1)
        vector = torch.tensor(list(self._network.compute_face_descriptor(pixels, self._landmarks(pixels, rect))))
        return vector / vector.norm()


@dataclass(frozen=True)
class IdentityScore:
    """per_frame: cosine similarity for each frame (NaN where no face was found); mean/minimum over the frames
    with a face; frames_without_face: how many had none."""

    per_frame: tuple[float, ...]
    mean: float
    minimum: float
    frames_without_face: int

    def summary(self) -> str:
        return (f"identity similarity: mean {self.mean:.3f}, min {self.minimum:.3f} over "
                f"{len(self.per_frame) - self.frames_without_face} frames"
                + (f" ({self.frames_without_face} without a detectable face)" if self.frames_without_face else ""))


def identity_similarity(reference: torch.Tensor | np.ndarray, frames: torch.Tensor, embedder: FaceEmbedder | None = None,
                        stride: int = 1, progress: Callable[[int, int], None] | None = None) -> IdentityScore:
    """Face-embedding similarity of every ``stride``-th frame ([F, H, W, 3] in 0..1) to the reference [H, W, 3].

    ``progress(done, total)`` is called after each checked frame (a frame without a face takes seconds on a CPU);
    an exception it raises (an interrupt) stops the check."""
    embedder = embedder or FaceEmbedder()
    ref = embedder.embed(reference)
    checked = frames[::stride]
    scores = []
    for frame in checked:
        try:
            scores.append(float(embedder.embed(frame) @ ref))
        except FaceNotFoundError:
            scores.append(float("nan"))
        if progress is not None:
            progress(len(scores), len(checked))
    found = [s for s in scores if s == s]
    if not found:
        raise FaceNotFoundError("No face was found in any output frame, so identity cannot be measured.")
    return IdentityScore(tuple(scores), float(np.mean(found)), float(np.min(found)), len(scores) - len(found))


def identity_report(reference: torch.Tensor | np.ndarray, frames: torch.Tensor, stride: int = 1,
                    progress: Callable[[int, int], None] | None = None) -> tuple[IdentityScore | None, str]:
    """:func:`identity_similarity` as a report that never fails the job: (score, its summary), or (None, why) when
    the reference or every checked frame has no face, or dlib is not installed. The check runs after the video
    exists (beside Save Video, or after the command line wrote the mp4), and a measurement with nothing to measure
    must not cost it. An exception from ``progress`` (an interrupt) still stops it."""
    try:
        score = identity_similarity(reference, frames, stride=stride, progress=progress)
    except (FaceNotFoundError, MissingDependencyError) as exc:
        return None, f"identity check: no score: {exc}"
    return score, score.summary()
