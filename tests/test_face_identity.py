import pytest
import torch
from skimage import data

from fantasytalking_core.errors import FaceNotFoundError
from fantasytalking_core.face.identity import FaceEmbedder, identity_similarity


@pytest.fixture(scope="module")
def embedder():
    return FaceEmbedder()


def test_same_face_scores_one_and_altered_faces_less(embedder):
    ref = torch.from_numpy(data.astronaut()).float() / 255
    mirrored = ref.flip(1)
    shifted = torch.roll(ref, shifts=(7, -5), dims=(0, 1))
    darker = ref * 0.6
    blank = torch.full_like(ref, 0.5)
    score = identity_similarity(ref, torch.stack([ref, shifted, mirrored, darker, blank]), embedder)
    same, shift, mirror, dark, none = score.per_frame
    assert same == pytest.approx(1.0, abs=1e-4)
    assert 0.9 < shift < 1.0 and 0.8 < mirror < 1.0 and 0.85 < dark < 1.0
    assert none != none and score.frames_without_face == 1  # NaN: no face in the blank frame
    assert score.minimum == pytest.approx(min(same, shift, mirror, dark))
    assert "without a detectable face" in score.summary()


def test_no_face_anywhere_is_an_error(embedder):
    ref = torch.from_numpy(data.astronaut()).float() / 255
    with pytest.raises(FaceNotFoundError, match="any output frame"):
        identity_similarity(ref, torch.full((2, 64, 64, 3), 0.2), embedder)
