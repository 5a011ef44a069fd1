"""Audio encode node: a recording -> wav2vec2 features and the frame count of the video."""

from __future__ import annotations

import comfy.model_management as mm
import comfy.utils
from comfy_api.latest import io, ui

from fantasytalking_core.audio.rules import DEFAULT_FPS, DEFAULT_MAX_FRAMES, FPS_RANGE
from fantasytalking_core.model.limits import MAX_VIDEO_FRAMES

from . import io_types
from .convert import describe_audio, encode_audio


class AudioEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io_types.schema(
            node_id="FantasyTalkingAudioEncode",
            display_name="FantasyTalking Audio Encode",
            description="Turns the voice recording into the features that drive the lips, and fixes the video length: "
                        "4*floor(fps*seconds/4)+5 frames, at most max_frames (longer than the sampler's "
                        "segment_frames: made in segments).",
            inputs=[
                io_types.Wav2Vec2.Input("wav2vec2", tooltip="wav2vec2-base-960h from the FantasyTalking wav2vec2 Loader."),
                io.Audio.Input("audio", tooltip="The voice recording (any sample rate, mono or stereo), e.g. from Load "
                                                "Audio."),
                # step = round: some front-end versions keep only as many decimals as the step has (step 1 turned
                # 12.5 into 13), and 23.976 needs three
                io.Float.Input("fps", default=float(DEFAULT_FPS), min=FPS_RANGE[0], max=FPS_RANGE[1], step=0.001,
                               round=0.001,
                               tooltip="Video frame rate in frames per second, fractions allowed (12.5, 23.976); "
                                       "FantasyTalking was trained at 23."),
                io.Int.Input("max_frames", default=DEFAULT_MAX_FRAMES, min=5, max=MAX_VIDEO_FRAMES, step=4,
                             tooltip="Longest video in frames (4n+1); a longer recording is cut there. 81 frames = "
                                     "3.5 s at 23 fps, one clip. Longer videos are made by the sampler in segments "
                                     "of its segment_frames (13805 frames = 10 minutes at 23 fps); time grows with "
                                     "the frame count."),
            ],
            outputs=[
                io_types.AudioFeatures.Output(display_name="audio_features",
                                              tooltip="wav2vec2 features and the recording cut to the video."),
                io.Int.Output(display_name="num_frames", tooltip="Number of video frames the sampler will make (the "
                                                                 "length for WanImageToVideo on the native route)."),
                io.Audio.Output(display_name="audio", tooltip="The recording cut to the video, for Create Video."),
                io.Float.Output(display_name="fps", tooltip="The frame rate, for Create Video."),
            ],
        )

    @classmethod
    def execute(cls, wav2vec2, audio: dict, fps: float, max_frames: int) -> io.NodeOutput:
        bar = comfy.utils.ProgressBar(1)
        encoded = encode_audio(wav2vec2, audio, fps, max_frames, mm.get_torch_device(),
                               lambda done, total: bar.update_absolute(done, total))
        features = encoded.features
        return io.NodeOutput(encoded, features.num_frames, encoded.audio, features.fps,
                             ui=ui.PreviewText(describe_audio(encoded)))


NODES = [AudioEncode]
