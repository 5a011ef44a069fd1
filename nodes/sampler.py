"""Sampler node: text, identity, voice and motion -> video frames (or, for a long video, an mp4 it writes), the
matching audio and the frame rate."""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import InputImpl, Types, io, ui

from fantasytalking_core.audio.timeline import DEFAULT_MOTION_FRAMES, DEFAULT_SEGMENT_FRAMES
from fantasytalking_core.media.video import DEFAULT_CRF, MAX_CRF
from fantasytalking_core.model.limits import MAX_FRAMES, MAX_VIDEO_FRAMES
from fantasytalking_core.errors import SettingsError
from fantasytalking_core.pipeline import GenerationSettings
from fantasytalking_core.runtime.attention import ATTENTION_BACKENDS
from fantasytalking_core.runtime.pool import POOL_BACKENDS
from fantasytalking_core.sampling.segments import CHAININGS, MAX_SEED
from fantasytalking_core.sampling.step_cache import FIRST_STEPS, LAST_STEPS, MAX_THRESHOLD

from . import io_types
from .parallel import sampler_pool
from .convert import (PREVIEW_FRAMES, check_sampler_inputs, conditioning_to_text, describe_sampling, image_gigabytes,
                      mark_preview, render_video, sample_segments, segment_options, segment_plan)

logger = logging.getLogger(__name__)
DEFAULTS = GenerationSettings()
MAX_IMAGE_FRAMES = 1500
"""Default of ``max_image_frames``: 65 s at 23 fps, 4.7 GB of IMAGE frames at 512x512 (16.6 GB at 1280x720)."""


class Sampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io_types.schema(
            node_id="FantasyTalkingSampler",
            display_name="FantasyTalking Sampler",
            description="Generates the talking video, as long as Audio Encode's frame count: up to segment_frames in "
                        "one clip, longer in segments chained on one timeline. Up to max_image_frames the frames, "
                        "the audio cut to the video and the fps go into Create Video, upscalers or frame "
                        "interpolators; a longer video is written to an mp4 with the voice in the output folder as "
                        "it is made, and comes out as video (connect it to Save Video or leave it: the file is "
                        "there). The model is on the GPU only while it denoises; Cancel stops it after the current "
                        "step and leaves no partial file.",
            inputs=[
                io_types.FantasyTalkingModel.Input("model", tooltip="From the FantasyTalking Model Loader."),
                io.Conditioning.Input("positive", tooltip="What happens in the video, from FantasyTalking Text Encode "
                                                          "(the official encoding) with umT5-XXL (Load CLIP, type "
                                                          "wan); core CLIP Text Encode also works."),
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
                io.Int.Input("seed", default=DEFAULTS.seed, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="Seed of the starting noise (drawn on the CPU: the same noise on any machine)."),
                io.Boolean.Input("batch_passes", default=DEFAULTS.batch_passes, advanced=True,
                                 tooltip="Run the 2-3 model passes of a step as one batch: faster on a GPU with "
                                         "memory to spare, more peak memory (with gpu_memory_gb they run one "
                                         "after another where that keeps the model whole on the GPU and the batch "
                                         "would not)."),
                io.Combo.Input("attention", options=list(ATTENTION_BACKENDS), default="sdpa", optional=True,
                               advanced=True, tooltip="The model's attention kernels, the audio branch's included: "
                                                      "sdpa (PyTorch, default), or flash / sage / xformers when that "
                                                      "package is installed (faster on some GPUs); one built for "
                                                      "another PyTorch is refused when the run starts."),
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
                io.Int.Input("segment_frames", default=DEFAULT_SEGMENT_FRAMES, min=5, max=MAX_FRAMES, step=4,
                             tooltip="Frames per segment (4n+1) when the video is longer: 81 (3.5 s at 23 fps) is "
                                     "the length the model was trained on. A video up to this long is one clip."),
                io.Combo.Input("chaining", options=list(CHAININGS), default="last_frame",
                               tooltip="How a segment continues the previous one. last_frame: its last frame is "
                                       "the next one's start image (as trained; no motion carried across). "
                                       "motion_frames: its last motion_frames frames are given as known frames. "
                                       "pinned_latents: as motion_frames, and their latents are held at each "
                                       "step's noise level (InfiniteTalk's way). Not compared on the real "
                                       "weights yet."),
                io.Int.Input("motion_frames", default=DEFAULT_MOTION_FRAMES, min=1, max=MAX_FRAMES - 4, step=4,
                             tooltip="Frames (4m+1, fewer than segment_frames) each segment shares with the "
                                     "previous one in motion_frames and pinned_latents chaining (9 = 3 latent "
                                     "frames); last_frame shares 1."),
                io.Float.Input("color_match", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Pull each segment's colours (Lab mean and spread) toward the portrait's, "
                                       "against slow drift over a long video: 0 off, 1 full."),
                io.Boolean.Input("crossfade", default=False,
                                 tooltip="Blend the frames two segments share instead of keeping the earlier "
                                         "segment's."),
                io.Int.Input("max_image_frames", default=MAX_IMAGE_FRAMES, min=0, max=MAX_VIDEO_FRAMES,
                             tooltip="Videos up to this many frames come out as IMAGE frames in memory: width x "
                                     "height x 12 bytes each (3.1 MB at 512x512; 10 minutes at 23 fps, 13805 "
                                     "frames, would be about 43 GB). Longer videos are written straight to an mp4 "
                                     "with the voice (memory of one segment) and come out as video (the face pasted "
                                     "back into the portrait with a face crop: paste_face_back); images then "
                                     f"holds {PREVIEW_FRAMES} frames spread over it. 0: always write the file."),
                io.String.Input("filename_prefix", default="FantasyTalking/long",
                                tooltip="Where a video longer than max_image_frames is written, in ComfyUI's "
                                        "output folder (the number and .mp4 are added)."),
                io.Boolean.Input("compile", default=False, optional=True, advanced=True,
                                 tooltip="torch.compile the model's blocks for this run: about 20% faster steps on "
                                         "an H100 after a one-off compile of 20-60 s (needs Triton on GPUs). "
                                         "Results equal the plain run to rounding."),
                io.Boolean.Input("fp8_matmul", default=False, optional=True, advanced=True,
                                 tooltip="With the model loaded as fp8_e4m3fn: real fp8 matrix multiplies on GPUs "
                                         "that have them (RTX 40xx, H100 and newer): faster, a little less exact. "
                                         "Other GPUs compute as without it."),
                io.String.Input("parallel", default="", optional=True, advanced=True,
                                tooltip="Spread each run over several GPUs, one worker process per GPU: cfg=3 runs "
                                        "the three guidance passes of a step on three GPUs at once (cfg=2: two and "
                                        "one); add ulysses=N or ring=N to split the video over N GPUs per pass "
                                        "(cfg=3,ulysses=2 uses six), and fsdp to split the weights too. Each "
                                        "worker loads its own copy of the model (once; they stay for the next "
                                        "run); offload_blocks and gpu_memory_gb apply to each worker. Empty: this "
                                        "process, one GPU."),
                io.Combo.Input("parallel_workers", options=list(POOL_BACKENDS), default="processes", optional=True,
                               advanced=True,
                               tooltip="How the parallel workers start: processes on this machine's GPUs, or ray "
                                       "(needs pip install ray): Ray actors on the GPUs of the Ray cluster this "
                                       "ComfyUI joins (set RAY_ADDRESS before starting it), several machines "
                                       "included; without a cluster Ray starts one on this machine."),
                io.Int.Input("crf", default=DEFAULT_CRF, min=0, max=MAX_CRF, optional=True, advanced=True,
                             tooltip="H.264 quality of the mp4 written for a video longer than max_image_frames: "
                                     "0 lossless (large; not every player plays it), 18 visually lossless, 23 "
                                     "FFmpeg's default, 51 smallest. Frames that come out as images are not "
                                     "encoded here: Save Video sets their quality."),
                io.Boolean.Input("paste_face_back", default=True, optional=True, advanced=True,
                                 tooltip="When Identity Encode has a face crop, the mp4 written for a video longer "
                                         "than max_image_frames gets the face pasted back into the full portrait "
                                         "(feather 16), since no node can do it after the sampler. Off: that file "
                                         "is the face crop. Frames that come out as images are never pasted back "
                                         "here: Face Paste Back does it."),
            ],
            outputs=[
                io.Image.Output(display_name="images",
                                tooltip="The video frames, [frames, height, width, 3]; for a video longer than "
                                        f"max_image_frames only {PREVIEW_FRAMES} frames spread over it (use video)."),
                io.Audio.Output(display_name="audio", tooltip="The recording cut to the length of the video."),
                io.Float.Output(display_name="fps", tooltip="Frame rate of the video in frames per second."),
                io.Video.Output(display_name="video",
                                tooltip="The whole video with the voice, for Save Video: the written mp4 for a "
                                        "long video, else the frames, audio and fps together."),
            ],
        )

    @classmethod
    def validate_inputs(cls, audio_guidance_start: float | None = DEFAULTS.audio_guidance_range[0],
                        audio_guidance_end: float | None = DEFAULTS.audio_guidance_range[1],
                        segment_frames: int | None = DEFAULT_SEGMENT_FRAMES,
                        motion_frames: int | None = DEFAULT_MOTION_FRAMES, chaining: str | None = "last_frame",
                        color_match: float | None = 0.0, max_image_frames: int | None = MAX_IMAGE_FRAMES,
                        attention: str | None = "sdpa", compile: bool | None = False, parallel: str | None = "",
                        parallel_workers: str | None = "processes",
                        filename_prefix: str | None = "FantasyTalking/long") -> bool | str:
        # before any node runs: a value this run cannot use is told before the models load (None: fed by a link)
        return check_sampler_inputs(
            segment_frames=segment_frames, motion_frames=motion_frames, chaining=chaining, color_match=color_match,
            max_image_frames=max_image_frames, audio_guidance_start=audio_guidance_start,
            audio_guidance_end=audio_guidance_end, attention=attention, compile=compile, parallel=parallel,
            parallel_workers=parallel_workers, filename_prefix=filename_prefix,
            device_type=mm.get_torch_device().type, output_dir=folder_paths.get_output_directory(),
            writes_file=max_image_frames == 0) or True  # the frame count is not known yet

    @classmethod
    def execute(cls, model, positive, negative, identity, audio_features, steps: int, cfg: float, audio_cfg: float,
                audio_guidance_start: float, audio_guidance_end: float, audio_scale: float, shift: float, seed: int,
                motion=None, batch_passes: bool = False, offload_blocks: bool = False,
                attention: str = "sdpa", gpu_memory_gb: float = 0.0, segment_frames: int = DEFAULT_SEGMENT_FRAMES,
                chaining: str = "last_frame", motion_frames: int = DEFAULT_MOTION_FRAMES, color_match: float = 0.0,
                crossfade: bool = False, max_image_frames: int = MAX_IMAGE_FRAMES,
                filename_prefix: str = "FantasyTalking/long", compile: bool = False,
                fp8_matmul: bool = False, step_cache: float = 0.0, parallel: str = "",
                parallel_workers: str = "processes", crf: int = DEFAULT_CRF,
                paste_face_back: bool = True) -> io.NodeOutput:
        device = mm.get_torch_device()
        problem = check_sampler_inputs(  # again: the inputs fed by links were not known at validation
            segment_frames=segment_frames, motion_frames=motion_frames, chaining=chaining, color_match=color_match,
            max_image_frames=max_image_frames, audio_guidance_start=audio_guidance_start,
            audio_guidance_end=audio_guidance_end, attention=attention, compile=compile, parallel=parallel,
            parallel_workers=parallel_workers, filename_prefix=filename_prefix, device_type=device.type,
            output_dir=folder_paths.get_output_directory(),
            writes_file=audio_features.features.num_frames > max_image_frames, attention_device=device)
        if problem:
            raise SettingsError(problem)
        options = segment_options(segment_frames, motion_frames, chaining, color_match, crossfade)
        settings = GenerationSettings(
            seed=seed, steps=steps, shift=shift, cfg=cfg, audio_cfg=audio_cfg, audio_scale=audio_scale,
            audio_guidance_range=(audio_guidance_start, audio_guidance_end), fps=audio_features.features.fps,
            batch_passes=batch_passes, motion=motion, face_box=identity.face_box, attention=attention,
            compile=compile, fp8_matmul=fp8_matmul, step_cache=step_cache)
        text_dim = model.transformer.config.text_dim
        text_pos = conditioning_to_text(positive, "positive", text_dim)
        text_neg = None if cfg == 1.0 else conditioning_to_text(negative, "negative", text_dim)
        bar = comfy.utils.ProgressBar(steps)

        def progress(step: int, total: int) -> None:  # every segment's steps, one bar
            bar.update_absolute(step, total)
            mm.throw_exception_if_processing_interrupted()

        width, height = identity.frame_size
        pool = sampler_pool(model, parallel, device, settings, parallel_workers, offload_blocks, gpu_memory_gb,
                            (segment_plan(audio_features, options).longest, height, width))
        plan, chunks, where = sample_segments(model, text_pos, text_neg, identity, audio_features, settings,
                                              options, device, progress, make_room=mm.unload_all_models,
                                              dit_placement="streamed" if offload_blocks else "resident",
                                              gpu_memory=gpu_memory_gb or None, pool=pool)
        saved: list[ui.SavedResult] = []
        crop = identity.crop if paste_face_back else None
        file_size = (crop.info.image_width, crop.info.image_height) if crop is not None else (width, height)

        def output_path() -> Path:
            folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
                filename_prefix, folder_paths.get_output_directory(), *file_size)
            saved.append(ui.SavedResult(f"{name}_{counter:05}_.mp4", subfolder, io.FolderType.output))
            return Path(folder) / saved[0].filename

        video = render_video(plan, chunks, audio_features, max_image_frames, output_path, crf, crop)
        audio, fps = audio_features.audio, audio_features.features.fps
        images = video.images.to(mm.intermediate_device())
        if video.path is not None:  # a move (--gpu-only) makes a new tensor: the preview tag goes with it
            mark_preview(images, video.path, crop is not None)
        status = ui.PreviewText(describe_sampling(plan, steps, where, video.path,
                                                  file_size if crop is not None else None)).as_dict()
        if video.path is None:
            whole = InputImpl.VideoFromComponents(Types.VideoComponents(images=images, audio=audio,
                                                                        frame_rate=Fraction(fps)))
            return io.NodeOutput(images, audio, fps, whole, ui=status)
        gigabytes = image_gigabytes(plan.num_frames, width, height)
        logger.info("FantasyTalking Sampler: %d frames (%.1f GB as IMAGE, above max_image_frames %d) in %d segments, "
                    "written to %s", plan.num_frames, gigabytes, max_image_frames, len(plan), video.path)
        return io.NodeOutput(images, audio, fps, InputImpl.VideoFromFile(str(video.path)),
                             ui={**ui.PreviewVideo(saved).as_dict(), **status})


NODES = [Sampler]
