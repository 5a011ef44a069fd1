"""Face crop, paste-back and identity check nodes (training-free; the paper's face modules were never released)."""

from __future__ import annotations

import comfy.model_management as mm
import comfy.utils
from comfy_api.latest import io, ui

from fantasytalking_core.face.crop import DEFAULT_MARGIN
from . import io_types
from .convert import check_identity, crop_face, paste_face


class FaceCrop(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io_types.schema(
            node_id="FantasyTalkingFaceCrop",
            display_name="FantasyTalking Face Crop",
            description="Cuts a square around the face so the model spends its whole resolution on it. Feed the crop "
                        "and the crop info to Identity Encode (with Load CLIP Vision's model: the official CLIP "
                        "tokens), and the crop info to Face Paste Back.",
            inputs=[
                io.Image.Input("image", tooltip="The full-resolution portrait (first image of the batch)."),
                io.Int.Input("face_index", default=0, min=0, max=64,
                             tooltip="Which detected face: 0 = the largest, 1 = the next, ..."),
                io.Float.Input("margin", default=DEFAULT_MARGIN, min=0.0, max=3.0, step=0.05,
                               tooltip="Space around the face on each side, in face sizes (0.6: the square is 2.2x "
                                       "the face). More margin shows more head and shoulders."),
                io.Boolean.Input("fallback_whole_image", default=False,
                                 tooltip="When no face is found, use the whole image instead of stopping with an "
                                         "error."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: paint the face; its bounding box replaces detection."),
            ],
            outputs=[
                io.Image.Output(display_name="face_image", tooltip="The square crop around the face."),
                io_types.FaceCrop.Output(display_name="crop_info",
                                         tooltip="Where the crop came from, for Identity Encode and Face Paste Back."),
            ],
        )

    @classmethod
    def execute(cls, image, face_index: int, margin: float, fallback_whole_image: bool, mask=None) -> io.NodeOutput:
        face_image, crop = crop_face(image, face_index, margin, mask, fallback_whole_image)
        text = ("no face found: whole image used" if crop.info is None
                else f"face crop {crop.info.size}x{crop.info.size} px at ({crop.info.x}, {crop.info.y})")
        return io.NodeOutput(face_image, crop, ui=ui.PreviewText(text))


class FacePasteBack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io_types.schema(
            node_id="FantasyTalkingFacePasteBack",
            display_name="FantasyTalking Face Paste Back",
            description="Pastes the generated face video back into the full-resolution portrait, frame by frame, "
                        "with a feathered edge. Upscalers and frame interpolators can sit before or after it. A "
                        "video longer than the sampler's max_image_frames is pasted back by the sampler into the "
                        "file it writes: this node refuses its preview frames.",
            inputs=[
                io.Image.Input("images", tooltip="The generated frames (from the sampler, or after an upscaler)."),
                io_types.FaceCrop.Input("crop_info", tooltip="From FantasyTalking Face Crop."),
                io.Int.Input("feather", default=16, min=0, max=256,
                             tooltip="Width of the blend at the crop's edge, in pixels of the full portrait."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="Full-resolution frames.")],
        )

    @classmethod
    def execute(cls, images, crop_info, feather: int) -> io.NodeOutput:
        return io.NodeOutput(paste_face(images, crop_info, feather))


class IdentityCheck(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io_types.schema(
            node_id="FantasyTalkingIdentityCheck",
            display_name="FantasyTalking Identity Check",
            description="How much the video still looks like the portrait: cosine similarity of dlib face embeddings "
                        "(like the paper's IDC metric); the same person usually scores above 0.9.",
            inputs=[
                io.Image.Input("reference", tooltip="The portrait (first image of the batch)."),
                io.Image.Input("images", tooltip="The video frames to check."),
                io.Int.Input("every_nth_frame", default=4, min=1, max=100,
                             tooltip="Check every n-th frame (each check takes a moment on the CPU)."),
            ],
            outputs=[
                io.Float.Output(display_name="mean_similarity",
                                tooltip="Mean similarity over the checked frames; none when no face was found."),
                io.Float.Output(display_name="min_similarity",
                                tooltip="Lowest similarity of a checked frame; none when no face was found."),
            ],
        )

    @classmethod
    def execute(cls, reference, images, every_nth_frame: int) -> io.NodeOutput:
        bar = comfy.utils.ProgressBar(-(-len(images) // every_nth_frame))

        def progress(done: int, total: int) -> None:  # a frame without a face takes seconds on a CPU
            bar.update_absolute(done, total)
            mm.throw_exception_if_processing_interrupted()

        mean, minimum, text = check_identity(reference, images, every_nth_frame, progress)
        return io.NodeOutput(mean, minimum, ui=ui.PreviewText(text))


NODES = [FaceCrop, FacePasteBack, IdentityCheck]
