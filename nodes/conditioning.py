"""Identity encode and motion intensity nodes: what the video should look like and how much it should move."""

from __future__ import annotations

import comfy.model_management as mm
from comfy_api.latest import io, ui

from fantasytalking_core.face.motion import DEFAULT_INTENSITY, MotionIntensity

from . import io_types
from .convert import encode_identity, encode_text_official


class IdentityEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io_types.schema(
            node_id="FantasyTalkingIdentityEncode",
            display_name="FantasyTalking Identity Encode",
            description="Sizes the portrait to the video and takes its CLIP tokens. The video's first frame is this "
                        "portrait; the sampler encodes it with the VAE once the frame count is known.",
            inputs=[
                io.Image.Input("image", tooltip="The portrait (first image of the batch), any size."),
                io.Vae.Input("vae", tooltip="The Wan2.1 VAE (wan_2.1_vae.safetensors) from the core Load VAE node."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="clip_vision_h.safetensors from the core Load CLIP Vision node: the "
                                            "portrait's CLIP tokens are taken the official way (the video frame "
                                            "squashed to 224 px, bicubic, no antialias). Use this."),
                io.ClipVisionOutput.Input("clip_vision_output", optional=True,
                                          tooltip="Alternative to clip_vision: the portrait through the core CLIP "
                                                  "Vision Encode node (crop: none). Approximate: ComfyUI's resize "
                                                  "antialiases and rounds to 8 bits, about 3% of the input's std "
                                                  "away from the official tokens."),
                io.Int.Input("image_size", default=512, min=64, max=2048, step=16,
                             tooltip="Longest side of the video in pixels; the other side keeps the portrait's "
                                     "aspect, both rounded up to multiples of 16. 512 is the official setting."),
                io_types.FaceCrop.Input("crop_info", optional=True,
                                        tooltip="From FantasyTalking Face Crop when the portrait is a face crop: "
                                                "tells Motion Intensity where the face is, and lets the sampler "
                                                "paste the face back into a video it writes to a file."),
                io.Boolean.Input("locate_face", default=True, advanced=True,
                                 tooltip="Without a face crop, find the face in the portrait so Motion Intensity "
                                         "can tell face from body (whole frame if none is found, or without "
                                         "dlib)."),
            ],
            outputs=[io_types.Identity.Output(display_name="identity",
                                              tooltip="Portrait at the video size, its CLIP tokens, the VAE and the "
                                                      "face region.")],
        )

    @classmethod
    def execute(cls, image, vae, image_size: int, clip_vision=None, clip_vision_output=None, crop_info=None,
                locate_face: bool = True) -> io.NodeOutput:
        identity = encode_identity(image, vae, clip_vision_output, image_size, crop_info, locate_face,
                                   clip_vision=clip_vision, load_model=mm.load_model_gpu)
        width, height = identity.frame_size
        face = identity.face_note
        clip = "official CLIP tokens" if clip_vision is not None else "approximate CLIP tokens (CLIP Vision Encode)"
        return io.NodeOutput(identity, ui=ui.PreviewText(f"video frames {width}x{height} px, {face}, {clip}"))


class TextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io_types.schema(
            node_id="FantasyTalkingTextEncode",
            display_name="FantasyTalking Text Encode",
            description="CLIP Text Encode for Wan's umT5 the official way: the prompt cleaned as Wan cleans it, no "
                        "(word:1.2) weighting, and cut at 512 tokens before encoding (core CLIP Text Encode "
                        "encodes a longer prompt whole, which changes every row).",
            inputs=[
                io.Clip.Input("clip", tooltip="umt5_xxl_fp16.safetensors (or _fp8_e4m3fn_scaled) from the core Load "
                                              "CLIP node, type wan."),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                tooltip="The prompt (or the negative prompt). Past 512 umT5 tokens the rest is "
                                        "dropped, as the official pipeline does."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning",
                                            tooltip="For the FantasyTalking Sampler's positive or negative input.")],
        )

    @classmethod
    def execute(cls, clip, text: str) -> io.NodeOutput:
        return io.NodeOutput(encode_text_official(clip, text))


class Motion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        intensity = {"default": DEFAULT_INTENSITY, "min": 0.0, "max": 1.0, "step": 0.05}
        return io_types.schema(
            node_id="FantasyTalkingMotion",
            display_name="FantasyTalking Motion Intensity",
            description="How strongly the voice moves the face and the rest of the frame. 0.5 and 0.5 give the "
                        "released model's behaviour exactly. A training-free approximation: the paper's motion module "
                        "was never released.",
            inputs=[
                io.Float.Input("face_intensity", **intensity,
                               tooltip="Lip and expression motion, 0..1: 0 ignores the voice, 0.5 as released, 1 = 1.5x "
                                       "the audio strength. Applies to the face region (the whole frame when no "
                                       "face was found)."),
                io.Float.Input("body_intensity", **intensity,
                               tooltip="Head and body motion outside the face region, 0..1 (same scale). Used when "
                                       "Identity Encode knows the face region (face crop or face found)."),
                io.Boolean.Input("affect_audio_cfg", default=False,
                                 tooltip="Also scale the audio guidance by the mean of the two intensities."),
            ],
            outputs=[io_types.Motion.Output(display_name="motion", tooltip="Motion intensity for the sampler.")],
        )

    @classmethod
    def execute(cls, face_intensity: float, body_intensity: float, affect_audio_cfg: bool) -> io.NodeOutput:
        return io.NodeOutput(MotionIntensity(face_intensity, body_intensity, affect_audio_cfg))


NODES = [IdentityEncode, TextEncode, Motion]
