"""Command line: ``python -m fantasytalking_core {parity,generate} ...``."""

from __future__ import annotations

import argparse
import errno
import logging
import math
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from .errors import FantasyTalkingError, SettingsError

if TYPE_CHECKING:  # imported where used: `--help` and bad input stay fast
    from .audio.io import DecodedAudio
    from .face.workflow import PreparedJob
    from .loaders.model_paths import ModelFiles
    from .pipeline import FantasyTalkingPipeline
    from .runtime.parallel import ParallelLayout, ParallelRun
    from .sampling.segments import SegmentOptions
    from .settings import GenerationSettings


def _parity(args: argparse.Namespace) -> int:
    from .parity import run_parity

    failed = 0
    for result in run_parity(args.dir):
        print(result.to_json(), flush=True)
        failed += not result.passed
    if failed:
        print(f"parity: {failed} item(s) failed", file=sys.stderr)
    return 1 if failed else 0


def _generate(args: argparse.Namespace) -> int:
    import tempfile

    import numpy as np
    import torch
    from tqdm import tqdm

    from .audio.io import load_audio
    from .audio.rules import SAMPLE_RATE, check_long_enough, frames_for_duration, recording_warnings
    from .face.motion import MotionIntensity
    from .face.workflow import FaceCropOptions, prepare_job, run_job
    from .loaders.model_paths import find_model_files, is_480p, load_models
    from .media.image import load_image
    from .media.video import aac_sample_rate, check_crf, check_output_path
    from .runtime.attention import check_attention
    from .runtime.compile import check_compile
    from .runtime.memory import check_budget, use_expandable_segments
    from .sampling.segments import SegmentOptions
    from .settings import DISTILLED, GenerationSettings

    # cheap checks first: bad settings, a bad image or audio path fail before any model is loaded, and before
    # diffusers and transformers are imported (seconds; none of them is imported yet)
    layout = None
    if args.parallel:
        from .runtime.parallel import parse_parallel

        layout = parse_parallel(args.parallel)
    check_output_path(args.out)
    _check_inputs_are_not_the_output(args)
    _check_no_model_files_with_tiny(args)
    _check_segment_flags_with_one_clip(args)
    check_crf(args.crf)
    _check_device(args.device)
    check_compile(args.compile, torch.device(args.device).type)
    use_expandable_segments(torch.device(args.device))  # before the first CUDA allocation
    settings = GenerationSettings(
        prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
        steps=args.steps if args.steps is not None else DISTILLED["steps"] if args.distilled else GenerationSettings.steps,
        cfg=args.cfg if args.cfg is not None else DISTILLED["cfg"] if args.distilled else GenerationSettings.cfg,
        audio_cfg=args.audio_cfg, audio_scale=args.audio_scale, fps=args.fps,
        max_frames=GenerationSettings.max_frames if args.max_frames is None else args.max_frames,
        image_size=args.image_size, shift=args.shift, batch_passes=args.batch_passes, vae_tile=args.vae_tile,
        audio_guidance_range=(args.audio_guidance_start, args.audio_guidance_end),
        motion=MotionIntensity(args.face_intensity, args.body_intensity, args.motion_audio_cfg),
        attention=args.attention, compile=args.compile, fp8_matmul=args.fp8_matmul, step_cache=args.step_cache,
    )
    check_budget(args.gpu_memory, "--gpu-memory")  # here, before any model loads (the pipeline checks it again when built)
    if torch.device(args.device).type == "cpu" and (args.offload_blocks or args.gpu_memory is not None):
        flag = "--offload-blocks" if args.offload_blocks else "--gpu-memory"
        raise SettingsError(f"{flag} places the DiT on a GPU; with --device cpu it computes in RAM and {flag} would "
                            "do nothing: leave it out, or choose --device cuda.")
    segmented = args.max_frames is None  # --max-frames asks for the official single clip
    try:
        options = SegmentOptions(args.segment_frames, args.motion_frames, args.chaining, args.color_match,
                                 args.crossfade)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    portrait = load_image(args.image)
    recording = load_audio(args.audio)  # decoded once, for these checks and for the run
    check_long_enough(recording.duration_s * SAMPLE_RATE)  # samples at wav2vec2's 16 kHz
    frames = frames_for_duration(recording.duration_s, settings.fps, settings.max_frames if not segmented else None)
    told = recording_warnings(float(recording.waveform.abs().max()), recording.duration_s, settings.fps, frames)
    for warning in told:
        print(f"warning: {warning}.", file=sys.stderr)  # now, not minutes later after the models have loaded
    muxed_rate = aac_sample_rate(recording.sample_rate)
    if muxed_rate != recording.sample_rate:
        print(f"note: the {recording.sample_rate} Hz recording goes into the mp4 at {muxed_rate} Hz (AAC's rates).",
              file=sys.stderr)
    crop = None
    if args.face_crop or args.face_box:
        box = _parse_box(args.face_box, portrait.width, portrait.height) if args.face_box else None
        crop = FaceCropOptions(args.face_index, args.face_margin, args.face_feather, args.face_fallback, box)
    job = prepare_job(portrait, settings, crop)  # the face is found (or not) before any model loads
    if layout is not None:
        _check_parallel_run(layout, args, settings)
        from .media.image import frame_size
        from .runtime.parallel import check_tokens_split

        longest = min(frames, options.segment_frames) if segmented else frames  # every segment is this long
        width, height = frame_size(*job.image.size, image_size=settings.image_size)
        check_tokens_split(layout, longest, height, width)
    # the attention library tried on this process's own GPU (a torchrun rank's is cuda:LOCAL_RANK), not GPU 0
    check_attention(settings.attention, f"cuda:{_local_processes()[1]}" if layout is not None
                    and torch.device(args.device).type == "cuda" else args.device)
    with _said_once(told):  # the audio encoder logs the same warnings minutes later
        loras = _read_loras(args.lora)
        from .loaders.lora import check_lora_fits
        from .pipeline import FantasyTalkingPipeline, save_result

        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        with tempfile.TemporaryDirectory() as scratch:
            if args.tiny:
                from .tiny import make_tiny_models

                print("--tiny: random tiny models; the video will be noise, not a portrait.", file=sys.stderr)
                files = make_tiny_models(scratch)
                dtype = torch.float32
            else:
                explicit = {part: getattr(args, part) for part in EXPLICIT_FILES}
                if not args.models and not any(explicit.values()):
                    raise FantasyTalkingError("--models is required (your ComfyUI/models folder), or use --tiny.")
                files = find_model_files(args.models, EXPLICIT_FLAGS, **explicit)
                if is_480p(files.dit):
                    print(f"note: {files.dit.name} is Wan2.1-I2V-14B-480P; the released FantasyTalking adapter was "
                          "trained on 720P (it runs on 480P, not the released pairing).", file=sys.stderr)
            if layout is not None:
                _check_layout_fits_model(layout, files, settings)  # before minutes of loading on every rank
            # torchrun's ranks on this machine load a copy each: the first of them checks the RAM for all, as
            # they start together (a later check would count copies already being read; rank 0 can still see
            # the first megabytes of the others' reads: a barrier would need the process group, joined after)
            here, local_rank = _local_processes()
            models = load_models(files, compute_dtype=dtype, fp8_storage=args.fp8 or args.fp8_matmul,
                                 processes=here if layout is not None else 1,
                                 check_memory=layout is None or local_rank == 0)
        if loras:
            for lora in loras:
                # a LoRA for another model fails now, not after the encoders
                check_lora_fits(lora, models.dit.transformer)
            models.dit = models.dit.with_loras(loras)
        # joined after loading: model writers (the tiny models' save_pretrained) save on rank 0 only inside a group
        parallel = None if layout is None else _join_parallel_run(layout, args)
        main_rank = parallel is None or parallel.is_main  # the one process that writes and reports
        pipe = FantasyTalkingPipeline(models, args.device, "streamed" if args.offload_blocks else "resident",
                                      args.gpu_memory, parallel)
        if not main_rank:
            _follow_parallel_run(pipe, job, recording, options, segmented)
            return 0
        if segmented:
            from .long_video import write_long_video

            with tqdm(desc="denoising", unit="step") as bar:
                def tick(step: int, total: int) -> None:
                    bar.total = total
                    bar.update(1)

                report = write_long_video(pipe, job, recording, options, args.out,
                                          tick, sample_frames=64 if args.identity_check else 0, crf=args.crf)
            out, shown = report.path, report.samples
            print(f"wrote {out} ({report.plan.num_frames} frames at {report.fps:g} fps, {len(report.plan)} segment(s))")
        else:
            with tqdm(total=settings.steps, desc="denoising", unit="step") as bar:
                result = run_job(pipe, job, recording, progress=lambda i, n: bar.update(1))
            out = save_result(result, args.out, args.crf)
            print(f"wrote {out} ({len(result.frames)} frames at {result.fps:g} fps)")
            shown = result.frames
        if args.identity_check:
            from .face.identity import identity_report

            reference = torch.from_numpy(np.asarray(portrait, dtype=np.float32) / 255)
            # the video is written whatever this finds; segmented runs hand over frames already sampled across it
            print(identity_report(reference, shown, stride=1 if segmented else 4)[1])
        return 0


@contextmanager
def _said_once(warnings: list[str]) -> Iterator[None]:
    """Inside the block, drop the audio encoder's log lines that repeat ``warnings`` (printed before any model
    loaded)."""
    told = {f"Audio: {warning}." for warning in warnings}

    def new(record: logging.LogRecord) -> bool:
        return record.getMessage() not in told

    encoder_log = logging.getLogger("fantasytalking_core.audio.encode")  # by name: importing it loads transformers
    encoder_log.addFilter(new)
    try:
        yield
    finally:
        encoder_log.removeFilter(new)


def _check_device(device: str) -> None:
    """Refuse a ``--device`` this program cannot compute on, before any model loads: ``cpu``, or ``cuda`` /
    ``cuda:N`` with that GPU present."""
    import torch

    try:
        where = torch.device(device)
    except (RuntimeError, ValueError):
        where = None
    if where is None or where.type not in ("cpu", "cuda"):
        raise FantasyTalkingError(f"--device {device}: use cpu, or cuda (cuda:N for the N-th GPU).")
    if where.type == "cuda" and not torch.cuda.is_available():
        raise FantasyTalkingError(f"--device {device}: no CUDA GPU is available here; use --device cpu.")
    if where.type == "cuda" and where.index is not None and where.index >= torch.cuda.device_count():
        raise FantasyTalkingError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), "
                                  f"cuda:0 to cuda:{torch.cuda.device_count() - 1}.")


def _check_parallel_run(layout: ParallelLayout, args: argparse.Namespace, settings: GenerationSettings) -> None:
    """Refuse a ``--parallel`` layout this run cannot use, before any model loads: not started by torchrun, a
    process count other than cfg x ring x ulysses, more cfg ranks than guidance passes, ring/ulysses on the CPU."""
    import os

    import torch

    from .runtime.parallel import (check_layout, check_loras_fit_layout, check_offload_fits_layout,
                                   process_group_backend)

    process_group_backend(torch.device(args.device).type)  # NCCL for GPUs: not in Windows builds of PyTorch
    check_loras_fit_layout(layout, bool(args.lora))
    check_offload_fits_layout(layout, args.offload_blocks and args.gpu_memory is None)
    if torch.device(args.device).type != "cuda" and layout.sequence > 1:
        raise SettingsError(f"--parallel {layout}: ring/ulysses split the video tokens over GPUs (one per process); "
                            "on the CPU use cfg=N alone.")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SettingsError(f"--parallel needs processes started by torchrun, e.g. torchrun --nproc-per-node "
                            f"{layout.world_size} -m fantasytalking_core generate ... --parallel {layout}.")
    check_layout(layout, int(os.environ["WORLD_SIZE"]), settings.max_passes(),
                 attention=settings.attention)
    if torch.device(args.device).type == "cuda":
        here, _ = _local_processes()
        gpus = torch.cuda.device_count()
        if here > gpus:
            raise SettingsError(f"--parallel {layout}: torchrun started {here} processes on this machine, which has "
                                f"{gpus} GPU(s); one GPU per process: start at most {gpus} here (--nproc-per-node), "
                                "the rest on other machines.")


def _local_processes() -> tuple[int, int]:
    """(processes on this machine, this one's index among them) as torchrun sets them; (1, 0) outside torchrun."""
    import os

    return (int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1))),
            int(os.environ.get("LOCAL_RANK", 0)))


def _check_inputs_are_not_the_output(args: argparse.Namespace) -> None:
    """Refuse an ``--out`` that is the ``--image`` or the ``--audio`` file (a finished run replaced it)."""
    out = Path(args.out)
    for flag, value in (("--image", args.image), ("--audio", args.audio)):
        if out.exists() and Path(value).exists() and out.samefile(value):
            raise SettingsError(f"--out is the {flag} file {value}; the video would replace it: write it elsewhere.")


def _check_segment_flags_with_one_clip(args: argparse.Namespace) -> None:
    """Refuse the long-recording flags beside ``--max-frames``, which makes the official single clip: it has no
    segments, so they would do nothing (a run wrote one clip without a word)."""
    from .audio.timeline import DEFAULT_MOTION_FRAMES, DEFAULT_SEGMENT_FRAMES

    if args.max_frames is None:
        return
    defaults = {"segment_frames": DEFAULT_SEGMENT_FRAMES, "chaining": "last_frame",
                "motion_frames": DEFAULT_MOTION_FRAMES, "color_match": 0.0, "crossfade": False}
    given = [f"--{name.replace('_', '-')}" for name, value in defaults.items() if getattr(args, name) != value]
    if given:
        raise SettingsError(f"{', '.join(given)} shape the segments of a long video, but --max-frames makes the "
                            "official single clip, which has none: leave them out, or leave out --max-frames to "
                            "make the whole recording in segments.")


def _check_no_model_files_with_tiny(args: argparse.Namespace) -> None:
    """Refuse model flags beside ``--tiny``, which makes its own models and would not read them (a user would think
    them checked)."""
    if args.tiny:
        given = [flag for flag, value in (("--models", args.models), *((EXPLICIT_FLAGS[part], getattr(args, part))
                                                                         for part in EXPLICIT_FILES)) if value]
        if given:
            raise SettingsError(f"--tiny makes its own random models and would not read {', '.join(given)}: leave "
                                "--tiny out to run your model files, or leave those flags out.")


def _check_layout_fits_model(layout: ParallelLayout, files: ModelFiles, settings: GenerationSettings) -> None:
    """Refuse a ``--parallel`` layout whose Ulysses degree does not divide the DiT's head count (40 for the 14B
    model), read from its config before any weight loads."""
    from .loaders.wan_dit import dit_config
    from .runtime.parallel import check_layout

    heads = dit_config(files.dit, files.configs.get("dit"))["num_attention_heads"]
    check_layout(layout, layout.world_size, settings.max_passes(), heads, settings.attention)


def _join_parallel_run(layout: ParallelLayout, args: argparse.Namespace) -> ParallelRun:
    """This process's place in a ``--parallel`` run started by torchrun: the process group joined (NCCL on GPUs,
    gloo on the CPU), one GPU per process (``args.device`` becomes ``cuda:LOCAL_RANK``)."""
    import os

    import torch

    from .runtime.parallel import ParallelRun, init_process_group_from_env

    device_type = torch.device(args.device).type
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
    init_process_group_from_env(device_type)
    return ParallelRun(layout, device_type)


def _follow_parallel_run(pipe: FantasyTalkingPipeline, job: PreparedJob, recording: DecodedAudio,
                         options: SegmentOptions, segmented: bool) -> None:
    """A rank other than 0 of a parallel run: the same run in lockstep (its passes, its share of the tokens, the
    same segments), its frames dropped: only rank 0 writes the video."""
    from .face.workflow import run_job

    if segmented:
        for _ in pipe.stream(job.image, recording, job.settings, options).frames:
            pass
    else:
        run_job(pipe, job, recording)


# Command-line flag -> model part, for choosing each file explicitly instead of searching --models.
EXPLICIT_FILES = {
    "dit": "the Wan2.1-I2V-14B DiT file (720P is the released pairing), e.g. a .safetensors, .gguf or shard index",
    "adapter": "the FantasyTalking adapter (fantasytalking_model.ckpt or a .safetensors)",
    "wav2vec2": "wav2vec2-base-960h (a folder with config.json, or one .safetensors file)",
    "text_encoder": "the umT5-XXL encoder file",
    "tokenizer": "the umT5 tokenizer folder",
    "image_encoder": "the CLIP ViT-H/14 vision file (clip_vision_h.safetensors)",
    "vae": "the Wan2.1 VAE file",
}
# model part -> its flag
EXPLICIT_FLAGS = {part: "--clip-vision" if part == "image_encoder" else "--" + part.replace("_", "-")
                  for part in EXPLICIT_FILES}


def _read_loras(specs: list[str]) -> list:
    """``--lora FILE[:STRENGTH]`` values -> ``WanLora``s, read (and their format checked) before any model loads;
    names made unique by position."""
    if not specs:
        return []
    from .loaders.lora import read_wan_lora

    loras = []
    for index, spec in enumerate(specs):
        path, strength = spec, 1.0
        head, sep, tail = spec.rpartition(":")
        if sep and head and not Path(spec).exists():  # FILE:STRENGTH (a file whose name has a colon stays whole)
            try:
                path, strength = head, float(tail)
            except ValueError:
                raise FantasyTalkingError(f"--lora takes FILE or FILE:STRENGTH (a number), got '{spec}'.") from None
        if not Path(path).is_file():
            raise FantasyTalkingError(f"--lora: no file '{path}'.")
        if not math.isfinite(strength):
            raise FantasyTalkingError(f"--lora strength must be a finite number, got '{spec}'.")
        loras.append(read_wan_lora(path, strength, name=f"lora{index}_{Path(path).stem}"))
    return loras


def _parse_box(text: str, width: int, height: int) -> tuple[float, float, float, float]:
    """``--face-box`` "x0,y0,x1,y1" -> floats in pixels of the ``width`` x ``height`` portrait. Refused when it has
    no area or misses the portrait (a box in another image's pixels would otherwise crop only edge padding)."""
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
        if not all(map(math.isfinite, (x0, y0, x1, y1))):
            raise ValueError
    except ValueError:
        raise FantasyTalkingError(f"--face-box takes x0,y0,x1,y1 in pixels of the portrait, got '{text}'.") from None
    if not (x1 > x0 and y1 > y0):
        raise FantasyTalkingError(f"--face-box needs x1 > x0 and y1 > y0, got '{text}'.")
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise FantasyTalkingError(f"--face-box {text} lies outside the {width}x{height} portrait: give the face in "
                                  f"its pixels (x from 0 to {width}, y from 0 to {height}).")
    return x0, y0, x1, y1


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other bad input (not the usage block and a line)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="python -m fantasytalking_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    parity = sub.add_parser("parity", help="recompute a fixture set of the official implementation and compare")
    parity.add_argument("dir", help="directory laid out like tests/fixtures/official or tests/fixtures/official_bf16")
    parity.set_defaults(func=_parity)

    from .media.video import DEFAULT_CRF
    from .sampling.step_cache import FIRST_STEPS, LAST_STEPS
    from .settings import DEFAULT_NEGATIVE_PROMPT, GenerationSettings

    d = GenerationSettings()
    gen = sub.add_parser("generate", help="portrait + voice -> talking video (mp4 with sound)")
    gen.add_argument("--image", required=True, help="the portrait (PNG, JPEG, WebP, ...)")
    gen.add_argument("--audio", required=True, help="the voice (wav, flac, mp3, ogg, m4a, or a video with sound)")
    gen.add_argument("--out", required=True, help="output .mp4 path")
    gen.add_argument("--models", help="ComfyUI models/ folder (or the official FantasyTalking models/ folder)")
    gen.add_argument("--tiny", action="store_true", help="check the installation with tiny random models (output is noise)")
    files = gen.add_argument_group("model files, each chosen explicitly (overrides what --models finds)")
    for part, what in EXPLICIT_FILES.items():
        files.add_argument(EXPLICIT_FLAGS[part], dest=part, help=what)
    gen.add_argument("--prompt", default=d.prompt)
    gen.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE_PROMPT)
    gen.add_argument("--seed", type=int, default=d.seed)
    gen.add_argument("--attention", default=d.attention,
                     help="the DiT's attention kernels, the audio branch's included: sdpa (default), flash, sage or "
                          "xformers (when installed; tried once on the run's device before any model loads)")
    gen.add_argument("--steps", type=int, default=None, help=f"denoising steps ({d.steps}; 4 with --distilled)")
    gen.add_argument("--shift", type=float, default=d.shift)
    gen.add_argument("--cfg", type=float, default=None, help=f"text guidance scale ({d.cfg}; 1 with --distilled)")
    gen.add_argument("--audio-cfg", type=float, default=d.audio_cfg, help="audio guidance scale")
    gen.add_argument("--audio-scale", type=float, default=d.audio_scale, help="strength of the audio branch")
    gen.add_argument("--audio-guidance-start", type=float, default=0.0, help="fraction of the steps where audio guidance starts")
    gen.add_argument("--audio-guidance-end", type=float, default=1.0, help="fraction of the steps where it ends")
    gen.add_argument("--fps", type=float, default=d.fps)
    gen.add_argument("--max-frames", type=int, default=None,
                     help="make the official single clip, capped at this many frames (4n+1, e.g. 81; the segment "
                          "flags do not apply); without it a recording of any length is generated in segments")
    gen.add_argument("--image-size", type=int, default=d.image_size, help="longest edge of the video in pixels")
    gen.add_argument("--device", default="cuda" if _cuda() else "cpu")
    gen.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                     help="compute precision of the DiT and umT5 whatever the files store (bf16: the official setting)")
    gen.add_argument("--fp8", action="store_true",
                     help="keep the DiT's block weights in fp8 (half the memory); an fp8 file stays fp8 without it")
    gen.add_argument("--fp8-matmul", action="store_true",
                     help="fp8 weights (implies --fp8) computed with real fp8 matrix multiplies on GPUs of compute "
                          "capability 8.9+ (RTX 40xx, H100): faster, a little less exact; elsewhere as --fp8")
    gen.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                     help="a Wan 2.1 LoRA (ComfyUI/kijai, musubi or diffusers format) at a strength (default 1); "
                          "repeat for several")
    gen.add_argument("--distilled", action="store_true",
                     help="settings for a step-distillation LoRA (lightx2v): 4 steps and cfg 1 unless --steps / --cfg "
                          "are given; audio guidance stays (two passes per step)")
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile the DiT blocks for this run: faster steps after a one-off compile")
    gen.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                     help="GPU memory budget in GiB: the DiT stays whole on the GPU when the run fits, else its "
                          "blocks stream (overrides --offload-blocks)")
    gen.add_argument("--offload-blocks", action="store_true",
                     help="stream the DiT's blocks to the GPU one at a time (the 14B model in about 5 GB of GPU "
                          "memory, slower; needs the DiT's size in CPU memory)")
    gen.add_argument("--batch-passes", action="store_true",
                     help="run the guidance passes as one batch (with --gpu-memory they run one after another "
                          "where that keeps the DiT whole on the GPU and the batch would not)")
    gen.add_argument("--step-cache", type=float, default=d.step_cache, metavar="THRESHOLD",
                     help="opt-in first-block cache: a step skips DiT blocks 1..N-1 of a guidance pass when block 0's "
                          "residual changed by less than THRESHOLD (relative) since that pass last ran them all; "
                          f"0 = off (default), typical 0.05-0.1; faster, not the official output; the first "
                          f"{FIRST_STEPS} and last {LAST_STEPS} steps always run every block")
    gen.add_argument("--parallel", metavar="LAYOUT",
                     help="spread the run over the processes torchrun starts, e.g. cfg=3 (the 3 guidance passes on "
                          "3 GPUs) or cfg=3,ulysses=2 (each pass's video tokens over 2 of 6 GPUs); axes cfg, ring, "
                          "ulysses, their product = the process count; add ,fsdp to shard the DiT's weights over "
                          "each group's ring/ulysses GPUs; only rank 0 writes the video")
    gen.add_argument("--crf", type=int, default=DEFAULT_CRF,
                     help="H.264 quality of the mp4: 0 (lossless, for upscaling or editing; not every player "
                          f"plays it) to 51 (smallest file); {DEFAULT_CRF} looks lossless for most content")
    gen.add_argument("--vae-tile", type=int, default=None, help="decode in tiles of this many pixels")
    from .audio.timeline import DEFAULT_MOTION_FRAMES, DEFAULT_SEGMENT_FRAMES
    from .sampling.segments import CHAININGS

    long = gen.add_argument_group("long recordings, generated in segments on one frame grid (see sampling/segments.py)")
    long.add_argument("--segment-frames", type=int, default=DEFAULT_SEGMENT_FRAMES,
                      help="frames per segment (4n+1; 81 = the trained clip length)")
    long.add_argument("--chaining", choices=CHAININGS, default="last_frame",
                      help="last_frame: the previous segment's last frame starts the next (as trained); "
                           "motion_frames: its last --motion-frames frames are given as known frames; "
                           "pinned_latents: those frames' latents are also held at each step's noise level "
                           "(InfiniteTalk's way). No quality comparison on the real weights exists yet")
    long.add_argument("--motion-frames", type=int, default=DEFAULT_MOTION_FRAMES,
                      help="frames given to the next segment with --chaining motion_frames or pinned_latents (4m+1)")
    long.add_argument("--color-match", type=float, default=0.0,
                      help="pull each segment's Lab colour statistics toward the portrait's, 0 (off) .. 1")
    long.add_argument("--crossfade", action="store_true", help="blend the frames two segments share")
    face = gen.add_argument_group("face crop, motion and identity (training-free; see README)")
    face.add_argument("--face-crop", action="store_true", help="generate on a square around the face, paste back")
    face.add_argument("--face-box", help="x0,y0,x1,y1: the face in portrait pixels, instead of detection (implies --face-crop)")
    face.add_argument("--face-index", type=int, default=0, help="which face, 0 = largest")
    face.add_argument("--face-margin", type=float, default=0.6, help="space around the face, x face size per side")
    face.add_argument("--face-feather", type=int, default=16, help="paste-back blend width in pixels")
    face.add_argument("--face-fallback", action="store_true", help="use the whole image when no face is found")
    face.add_argument("--face-intensity", type=float, default=0.5, help="lip/expression motion, 0..1 (0.5 = official)")
    face.add_argument("--body-intensity", type=float, default=0.5, help="head/body motion, 0..1 (0.5 = official)")
    face.add_argument("--motion-audio-cfg", action="store_true", help="let the intensities scale audio guidance too")
    face.add_argument("--identity-check", action="store_true", help="print face similarity of output to reference")
    gen.set_defaults(func=_generate)
    return parser


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


PATH_HINTS = {
    errno.ENAMETOOLONG: "; use a shorter name (at most 255 bytes per name on most file systems).",
    errno.ENOENT: "; check the path.",
    errno.ENOTDIR: "; a part of the path is a file, not a folder.",
    errno.EACCES: "; this user may not read or write there: choose another place or change its permissions.",
}
"""What to do about the errors of a path the user gave (the system's own text says what happened)."""


def _in_flag_terms(message: str, args: argparse.Namespace) -> str:
    """``message`` with a leading setting name as the library spells it (``max_frames must be ...``, ``image_size
    16385 is above ...``) written as the flag the user typed (``--max-frames``)."""
    name, _, rest = message.partition(" ")
    if name in vars(args) and name != "func" and (rest.startswith(("must ", "skips ")) or rest[:1].isdigit()):
        flag = f"--{name.replace('_', '-')}"
        return f"{flag} {rest.replace(f'Set {name} ', f'Set {flag} ')}"  # a value of another setting stays
    return message


class Terminated(BaseException):
    """SIGTERM arrived (``kill``, ``timeout``, a job scheduler, ``docker stop``, torchrun stopping its workers).
    A BaseException, as KeyboardInterrupt: the loaders' ``except Exception`` must not turn it into a bad file."""


def _terminate(signum: int, frame: object) -> NoReturn:
    # a second SIGTERM kills at once: the first waits for Python's next bytecode, which a rank blocked in a
    # collective or a long C call may never reach
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the writers drop their partial files on the way out (it killed the process
    # with them left behind); only the main thread may set a handler
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return args.func(args)
    except (FantasyTalkingError, FileNotFoundError) as exc:
        # bad input: one clear line, no traceback
        print(f"error: {_in_flag_terms(str(exc), args)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:  # not about a path the user gave: a fault to see whole
            raise
        hint = PATH_HINTS.get(exc.errno, "")
        print(f"error: {exc.strerror}: {exc.filename}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the writers have dropped their partial files on the way out
        print("interrupted: stopped by the user (no partial video is left).", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated: stopped by SIGTERM (no partial video is left).", file=sys.stderr)
        return 143  # 128 + SIGTERM, as the shell reports it
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _leave_process_group()


def _leave_process_group() -> None:
    """Tear down a ``--parallel`` run's process group (if this process joined one)."""
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
