"""Sampler node: text, identity, voice and motion -> video frames, the matching audio and the frame rate."""

from __future__ import annotations

import comfy.model_management as mm
import comfy.utils
from comfy_api.latest import io

from fantasytalking_core.pipeline import GenerationSettings
from fantasytalking_core.runtime.attention import ATTENTION_BACKENDS
from fantasytalking_core.sampling.step_cache import FIRST_STEPS, LAST_STEPS, MAX_THRESHOLD

from . import io_types
from .convert import conditioning_to_text, sample_video

DEFAULTS = GenerationSettings()


class Sampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io_types.schema(
            node_id="FantasyTalkingSampler",
            display_name="FantasyTalking Sampler",
            description="Generates the talking video. The frames, the audio cut to the video and the fps go straight "
                        "into Create Video, upscalers or frame interpolators. The model is on the GPU only while "
                        "this node runs; Cancel stops it after the current step.",
            inputs=[
                io_types.FantasyTalkingModel.Input("model", tooltip="From the FantasyTalking Model Loader."),
                io.Conditioning.Input("positive", tooltip="What happens in the video, from the core CLIP Text Encode "
                                                          "with umT5-XXL (Load CLIP, type wan)."),
                io.Conditioning.Input("negative", tooltip="What to avoid, same encoder. Unused when cfg is 1."),
                io_types.Identity.Input("identity", tooltip="From FantasyTalking Identity Encode."),
                io_types.AudioFeatures.Input("audio_features", tooltip="From FantasyTalking Audio Encode; sets the "
                                                                       "frame count."),
                io_types.Motion.Input("motion", optional=True,
                                      tooltip="From FantasyTalking Motion Intensity; unconnected = as released."),
                io.Int.Input("steps", default=DEFAULTS.steps, min=1, max=200,
                             tooltip="Denoising steps (30 official); each step runs the model 3 times (2 at cfg 1)."),
                io.Float.Input("cfg", default=DEFAULTS.cfg, min=1.0, max=20.0, step=0.1, round=0.01,
                               tooltip="Text guidance scale (5 official); 1 skips the negative prompt, one "
                                       "model pass less per step."),
                io.Float.Input("audio_cfg", default=DEFAULTS.audio_cfg, min=0.0, max=20.0, step=0.1, round=0.01,
                               tooltip="Audio guidance scale (5 official): how far the motion follows the voice, "
                                       "beyond a pass without audio. 1 = no extra push."),
                io.Float.Input("audio_guidance_start", default=DEFAULTS.audio_guidance_range[0], min=0.0, max=1.0,
                               step=0.01, tooltip="Fraction of the steps at which audio guidance starts (0 = first "
                                                  "step)."),
                io.Float.Input("audio_guidance_end", default=DEFAULTS.audio_guidance_range[1], min=0.0, max=1.0,
                               step=0.01, tooltip="Fraction of the steps at which audio guidance ends (1 = last step); "
                                                  "steps outside save one model pass each."),
                io.Float.Input("audio_scale", default=DEFAULTS.audio_scale, min=0.0, max=3.0, step=0.05,
                               tooltip="Strength of the audio branch inside the model (1 official)."),
                io.Float.Input("shift", default=DEFAULTS.shift, min=0.1, max=20.0, step=0.1,
                               tooltip="Flow-matching sigma shift (5 official); higher spends more steps on coarse "
                                       "motion."),
                io.Int.Input("seed", default=DEFAULTS.seed, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the starting noise (drawn on the CPU: the same noise on any machine)."),
                io.Boolean.Input("batch_passes", default=DEFAULTS.batch_passes, advanced=True,
                                 tooltip="Run the 2-3 model passes of a step as one batch: faster on a GPU with "
                                         "memory to spare, more peak memory."),
                io.Combo.Input("attention", options=list(ATTENTION_BACKENDS), default="sdpa", optional=True,
                               advanced=True, tooltip="The model's attention kernels: sdpa (PyTorch, default), or "
                                                      "flash / sage / xformers when that package is installed "
                                                      "(faster on some GPUs)."),
                io.Float.Input("gpu_memory_gb", default=0.0, min=0.0, max=1024.0, step=0.5, optional=True,
                               advanced=True, tooltip="GPU memory budget in GB: the model stays whole on the GPU "
                                                      "when the run fits, else its blocks stream (overrides "
                                                      "offload_blocks). 0: off."),
                io.Float.Input("step_cache", default=DEFAULTS.step_cache, min=0.0, max=MAX_THRESHOLD, step=0.01,
                               optional=True, advanced=True,
                               tooltip="Step caching threshold: a step reuses most of a guidance pass's previous "
                                       "model computation when its first block changed by less than this fraction "
                                       "(each pass keeps its own cache). 0 = off (the official output); 0.05-0.1 "
                                       f"is typical: faster, slightly different video. The first {FIRST_STEPS} "
                                       f"and last {LAST_STEPS} steps always compute fully."),
                io.Boolean.Input("offload_blocks", default=False, optional=True, advanced=True,
                                 tooltip="Stream the model's blocks to the GPU one at a time instead of moving it "
                                         "whole: the 14B model in about 5 GB of GPU memory (a 24 GB card, even "
                                         "8-12 GB), about 30% slower. Needs the model's size in system RAM."),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="The video frames, [frames, height, width, 3]."),
                io.Audio.Output(display_name="audio", tooltip="The recording cut to the length of the video."),
                io.Float.Output(display_name="fps", tooltip="Frame rate of the video in frames per second."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, identity, audio_features, steps: int, cfg: float, audio_cfg: float,
                audio_guidance_start: float, audio_guidance_end: float, audio_scale: float, shift: float, seed: int,
                motion=None, batch_passes: bool = False, offload_blocks: bool = False,
                attention: str = "sdpa", gpu_memory_gb: float = 0.0, step_cache: float = 0.0) -> io.NodeOutput:
        settings = GenerationSettings(
            seed=seed, steps=steps, shift=shift, cfg=cfg, audio_cfg=audio_cfg, audio_scale=audio_scale,
            audio_guidance_range=(audio_guidance_start, audio_guidance_end), fps=audio_features.features.fps,
            batch_passes=batch_passes, motion=motion, face_box=identity.face_box, attention=attention,
            step_cache=step_cache)
        text_dim = model.transformer.config.text_dim
        text_pos = conditioning_to_text(positive, "positive", text_dim)
        text_neg = None if cfg == 1.0 else conditioning_to_text(negative, "negative", text_dim)
        bar = comfy.utils.ProgressBar(steps)

        def progress(step: int, total: int) -> None:
            bar.update_absolute(step, total)
            mm.throw_exception_if_processing_interrupted()

        frames = sample_video(model, text_pos, text_neg, identity, audio_features, settings, mm.get_torch_device(),
                              progress, make_room=mm.unload_all_models,
                              dit_placement="streamed" if offload_blocks else "resident",
                              gpu_memory=gpu_memory_gb or None)
        return io.NodeOutput(frames.to(mm.intermediate_device()), audio_features.audio, audio_features.features.fps)


NODES = [Sampler]
