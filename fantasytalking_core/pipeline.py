"""``FantasyTalkingPipeline``: portrait + voice in, frames + the matching audio out.

The pipeline composes the parts and owns no maths: audio features (``audio/``), the encoders (``encoders/``), the
DiT with its audio adapter (``model/``) and the denoising run (``sampling/``). Each model sits on the compute
device only while it works (``runtime/placement.py``). :func:`sample_latents` is the one place where the user's
:class:`GenerationSettings` become the sampler's arguments; the face-crop workflow around a run is in
``face/workflow.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .audio.encode import AudioFeatures, extract_audio_features
from .audio.io import DecodedAudio, load_audio
from .audio.rules import crop_samples_for_frames
from .audio.timeline import SegmentPlan, plan_segments
from .encoders.image import encode_image_clip
from .encoders.text import encode_prompt
from .encoders.vae import decode_latents, image_to_video_condition, known_frames_condition
from .errors import SettingsError
from .face.motion import audio_cfg_for, audio_scale_map
from .media.image import comfy_image_to_pil, image_to_tensor, load_image
from .media.video import DEFAULT_CRF, write_video
from .model.transformer import FantasyTalkingModel
from .runtime.attention import using_attention
from .runtime.compile import compiled_blocks
from .runtime.fp8 import check_fp8_matmul_model, fp8_matmuls
from .runtime.memory import (
    InsufficientMemoryError,
    bytes_on,
    check_budget,
    check_gpu_memory,
    choose_placement,
    estimate_dit_memory,
)
from .runtime.parallel import (CLI_NAMES, NODE_NAMES, ParallelLayout, ParallelRun, check_loras_fit_layout,
                               check_offload_fits_layout)
from .runtime.placement import PLACEMENTS, dit_on_device, on_device
from .sampling.denoise import generate_latents
from .sampling.euler import PassMap
from .sampling.guidance import GuidanceConfig
from .sampling.schedule import flow_match_sigmas
from .sampling.segments import SegmentOptions, generate_segments, segment_seed
from .settings import GenerationSettings

ProgressFn = Callable[[int, int], None]


@dataclass
class GenerationResult:
    """frames: [F, H, W, 3] float32 in 0..1 (ComfyUI IMAGE layout); audio: [C, T] float32, the part of the
    recording the video shows, at its own rate and channels; sample_rate in Hz; fps in frames/s."""

    frames: torch.Tensor
    audio: torch.Tensor
    sample_rate: int
    fps: float


@dataclass
class StreamedVideo:
    """A long video made segment by segment (:meth:`FantasyTalkingPipeline.stream`).

    frames: iterator of float32 [f, H, W, 3] chunks in 0..1, in order, ``plan.num_frames`` frames in all; the
    work happens while it is consumed. audio, sample_rate, fps: as in :class:`GenerationResult`.
    """

    plan: SegmentPlan
    frames: Iterator[torch.Tensor]
    audio: torch.Tensor
    sample_rate: int
    fps: float


@dataclass
class FantasyTalkingModels:
    """The loaded parts. ``tokenizer`` is the umT5 tokenizer; ``wav2vec2`` the audio encoder."""

    dit: FantasyTalkingModel
    vae: Any
    text_encoder: Any
    tokenizer: Any
    image_encoder: Any
    wav2vec2: Any
    extra: dict = field(default_factory=dict)


class FantasyTalkingPipeline:
    """Portrait + voice -> talking video frames.

    Args:
        models: the loaded parts (see :func:`fantasytalking_core.loaders.model_paths.load_models`).
        device: where the models compute; they wait on their own device (usually the CPU) in between.
        dit_placement: ``"resident"`` (the whole DiT on ``device`` while it samples) or ``"streamed"`` (its blocks
            stream from the CPU one at a time: a 14B DiT on a card that cannot hold it, at some speed cost).
        gpu_memory: a budget in GiB: each run picks resident or streamed to fit it (``dit_placement`` is then
            ignored); None: ``dit_placement`` as given.
        parallel: this process's place in a multi-process run (``runtime/parallel.py``): its guidance passes are
            shared out over the ranks, and the DiT's video tokens split when the layout has ring/ulysses ranks.
            Every rank runs the whole pipeline in lockstep and gets the same frames; None: one process.
    """

    def __init__(self, models: FantasyTalkingModels, device: str | torch.device = "cpu",
                 dit_placement: str = "resident", gpu_memory: float | None = None,
                 parallel: ParallelRun | None = None):
        if dit_placement not in PLACEMENTS:
            raise SettingsError(f"dit_placement must be one of {PLACEMENTS}, got {dit_placement!r}.")
        self.models = models
        self.device = torch.device(device)
        self.dit_placement = dit_placement
        self.gpu_memory = check_budget(gpu_memory)
        self.parallel = parallel
        if parallel is not None:
            parallel.prepare(models.dit.transformer)

    @property
    def map_passes(self) -> PassMap | None:
        """Where each step's guidance passes run: shared over the ranks of a parallel run, else all here."""
        return None if self.parallel is None else self.parallel.map_passes

    def reference_image(self, image: str | os.PathLike | Image.Image | torch.Tensor, image_size: int) -> torch.Tensor:
        """A file path, PIL image or ComfyUI IMAGE -> [3, H, W] in -1..1 at the video size."""
        if isinstance(image, torch.Tensor):
            image = comfy_image_to_pil(image)
        elif not isinstance(image, Image.Image):
            image = load_image(image)
        return image_to_tensor(image, image_size)

    @torch.no_grad()
    def audio_features(self, audio: str | os.PathLike | Mapping | DecodedAudio,
                       settings: GenerationSettings) -> AudioFeatures:
        with on_device(self.models.wav2vec2, self.device):
            return extract_audio_features(self.models.wav2vec2, audio, settings.fps, settings.max_frames)

    @torch.no_grad()
    def __call__(
        self,
        image: str | os.PathLike | Image.Image | torch.Tensor,
        audio: str | os.PathLike | Mapping | DecodedAudio,
        settings: GenerationSettings | None = None,
        progress: ProgressFn | None = None,
    ) -> GenerationResult:
        """Generate. ``progress(step, total)`` is called after every denoising step and may raise to interrupt."""
        settings = settings or GenerationSettings()
        m = self.models
        pixels = self.reference_image(image, settings.image_size)  # validate the cheap input first
        recording = load_audio(audio)  # decoded once: the features and the muxed sound come from it
        voice = self.audio_features(recording, settings)
        settings = budget_settings(m.dit, voice.num_frames, pixels.shape[1], pixels.shape[2], settings,
                                   self.gpu_memory, self.parallel and self.parallel.layout)
        placement = self._check_dit_fits(voice.num_frames, pixels.shape[1], pixels.shape[2], settings)
        text_pos, text_neg, clip_tokens = self._prompt_and_identity(pixels, settings)
        tile = (settings.vae_tile, settings.vae_tile) if settings.vae_tile else None
        with on_device(m.vae, self.device):
            y = image_to_video_condition(m.vae, pixels, voice.num_frames, tile_size=tile)

        with self._dit_on_device(placement):
            latents = sample_latents(m.dit, text_pos, text_neg, clip_tokens, y, voice.features, voice.num_frames,
                                     settings, progress, map_passes=self.map_passes)

        frames = self._decode(latents, tile)
        # the recording itself (its own rate and channels), cut where the features were cut
        cut = crop_samples_for_frames(voice.num_frames, voice.fps, recording.sample_rate)
        return GenerationResult(frames, recording.waveform[:, :cut], recording.sample_rate, voice.fps)

    @torch.no_grad()
    def stream(
        self,
        image: str | os.PathLike | Image.Image | torch.Tensor,
        audio: str | os.PathLike | Mapping | DecodedAudio,
        settings: GenerationSettings | None = None,
        options: SegmentOptions | None = None,
        progress: ProgressFn | None = None,
    ) -> StreamedVideo:
        """Generate a recording of any length in segments (``sampling/segments.py``), frames streamed out.

        The audio features cover the whole recording (``settings.max_frames`` does not apply: the segment length
        does); segment i is a single-clip run with seed ``settings.seed + i``. A recording that fits one segment
        gives the frames of ``self(image, audio, settings)`` bit for bit. ``progress(step, total)`` counts the
        steps of all segments and may raise to interrupt.
        """
        settings = settings or GenerationSettings()
        options = options or SegmentOptions()
        m = self.models
        pixels = self.reference_image(image, settings.image_size)
        recording = load_audio(audio)
        with on_device(m.wav2vec2, self.device):
            voice = extract_audio_features(m.wav2vec2, recording, settings.fps, None)  # bounded chunks
        plan = plan_segments(voice.num_frames, voice.fps, voice.num_tokens, options.segment_frames, options.overlap)
        settings = budget_settings(m.dit, plan.longest, pixels.shape[1], pixels.shape[2], settings, self.gpu_memory,
                                   self.parallel and self.parallel.layout)
        placement = self._check_dit_fits(plan.longest, pixels.shape[1], pixels.shape[2], settings)
        text_pos, text_neg, clip_tokens = self._prompt_and_identity(pixels, settings)  # identity: the portrait
        tile = (settings.vae_tile, settings.vae_tile) if settings.vae_tile else None

        def condition(known: torch.Tensor, num_frames: int) -> torch.Tensor:
            with on_device(m.vae, self.device):
                return known_frames_condition(m.vae, known, num_frames, tile_size=tile)

        def sample(index: int, y: torch.Tensor, features: torch.Tensor, num_frames: int, num_tokens: int,
                   report: ProgressFn | None, pinned: torch.Tensor | None) -> torch.Tensor:
            with self._dit_on_device(placement):
                return sample_latents(m.dit, text_pos, text_neg, clip_tokens, y, features, num_frames,
                                      replace(settings, seed=segment_seed(settings.seed, index)), report, num_tokens, pinned,
                                      self.map_passes)

        frames = generate_segments(plan, voice.features, pixels, options, condition=condition, sample=sample,
                                   decode=lambda latents: self._decode(latents, tile), steps=settings.steps,
                                   progress=progress)
        cut = crop_samples_for_frames(voice.num_frames, voice.fps, recording.sample_rate)
        return StreamedVideo(plan, frames, recording.waveform[:, :cut], recording.sample_rate, voice.fps)

    def _check_dit_fits(self, num_frames: int, height: int, width: int, settings: GenerationSettings) -> str:
        """The DiT's placement for a run (:func:`check_dit_fits`), checked before the encoders run; in a parallel
        run each rank checks its own GPU and all ranks agree (a DiT whose weights the run has sharded stays where
        they are: ``"sharded"``)."""
        def check() -> str:
            return check_dit_fits(self.models.dit, self.device, num_frames, height, width, settings,
                                  self.dit_placement, self.gpu_memory, self.parallel and self.parallel.layout)

        if self.parallel is None:
            return check()
        check_loras_fit_layout(self.parallel.layout, bool(self.models.dit.loras))
        return self.parallel.agree(check)

    def _dit_on_device(self, placement: str) -> AbstractContextManager:
        """The DiT on the compute device for a run in ``placement``; sharded weights stay on their device (FSDP
        gathers each block where it runs), only the audio projection moves."""
        if placement == "sharded":
            return on_device(self.models.dit.audio_proj, self.device)
        return dit_on_device(self.models.dit, self.device, placement)

    def _prompt_and_identity(self, pixels: torch.Tensor, settings: GenerationSettings
                             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(text_pos, text_neg or None when cfg is 1, CLIP tokens of the portrait [1, 257, 1280])."""
        m = self.models
        with on_device(m.text_encoder, self.device):
            text_pos = encode_prompt(m.text_encoder, m.tokenizer, settings.prompt)[None]
            text_neg = encode_prompt(m.text_encoder, m.tokenizer, settings.negative_prompt)[None] if settings.cfg != 1 else None
        with on_device(m.image_encoder, self.device):
            clip_tokens = encode_image_clip(m.image_encoder, pixels[None])
        return text_pos, text_neg, clip_tokens

    def _decode(self, latents: torch.Tensor, tile: tuple[int, int] | None) -> torch.Tensor:
        """Latents -> frames [F, H, W, 3] float32 in 0..1 on the CPU."""
        with on_device(self.models.vae, self.device):
            video = decode_latents(self.models.vae, latents, tile_size=tile)  # [1, 3, F, H, W] in -1..1
        return ((video[0].permute(1, 2, 3, 0).float().cpu() + 1) / 2).clamp(0, 1)


def _passes_here(settings: GenerationSettings, layout: ParallelLayout) -> tuple[int, int]:
    """(guidance passes of a step this process computes, passes whose residuals its step cache keeps): its share
    of the run's passes over the ``cfg`` groups, rounded up."""
    passes = -(-settings.max_passes() // layout.cfg)
    return passes, passes if settings.step_cache > 0 else 0


def budget_settings(dit: FantasyTalkingModel, num_frames: int, height: int, width: int,
                    settings: GenerationSettings, gpu_memory: float | None,
                    layout: ParallelLayout | None = None) -> GenerationSettings:
    """``settings`` for a run under a ``gpu_memory`` budget (GiB): with ``batch_passes``, the guidance passes one
    after another when that keeps the DiT whole on the GPU and the batch would not (streaming the blocks costs more
    than batching gains: 13-27% against nothing measured on an H100/H200, ``docs/benchmarks.md``); otherwise as
    given (batched passes also stream fine: the blocks are fetched once per batch)."""
    layout = layout or ParallelLayout()
    passes, cached = _passes_here(settings, layout)
    if gpu_memory is None or not settings.batch_passes or passes < 2 or layout.fsdp:
        return settings

    def placement(rows: int) -> str | None:
        try:
            return choose_placement(dit.transformer, num_frames, height, width, gpu_memory, rows, dit.dtype.itemsize,
                                    cached, layout.sequence)[0]
        except InsufficientMemoryError:
            return None

    if placement(passes) != "resident" and placement(1) == "resident":
        return replace(settings, batch_passes=False)
    return settings


def check_dit_fits(dit: FantasyTalkingModel, device: torch.device, num_frames: int, height: int, width: int,
                   settings: GenerationSettings, placement: str = "resident", gpu_memory: float | None = None,
                   layout: ParallelLayout | None = None, names: Mapping[str, str] = CLI_NAMES) -> str:
    """Where the DiT will compute for this run, checked before any model moves (``runtime/memory.py``).

    With a ``gpu_memory`` budget (GiB): resident when it fits, else streamed, else an error. Without: ``placement``
    as given, refused when it cannot fit in the free memory of a CUDA ``device`` (weights already there count as
    free: a pool worker keeps them there between runs). ``height`` x ``width`` are the video's pixels. In a
    parallel ``layout`` the check is one process's: its share of the passes and of the video tokens; with
    ``fsdp`` the weights are ``"sharded"`` (the one placement then; blocks cannot also stream). ``names``: how a
    refusal spells the options (``runtime.parallel.CLI_NAMES`` or ``NODE_NAMES``).
    """
    check_fp8_matmul_model(dit, settings.fp8_matmul)
    layout = layout or ParallelLayout()
    check_offload_fits_layout(layout, placement == "streamed" and gpu_memory is None, names)  # a budget picks it
    passes, cached = _passes_here(settings, layout)
    rows = passes if settings.batch_passes else 1
    shape = (dit.transformer, num_frames, height, width)
    try:
        if gpu_memory is not None:
            placement, estimate = choose_placement(*shape, gpu_memory, rows, dit.dtype.itemsize, cached,
                                                   layout.sequence, layout.fsdp)
        else:
            placement = "sharded" if layout.fsdp else placement
            estimate = estimate_dit_memory(*shape, rows, placement, dit.dtype.itemsize, cached, layout.sequence)
        present = bytes_on(dit, device) if torch.device(device).type == "cuda" else 0  # only CUDA memory is checked
        check_gpu_memory(estimate, device, f"{num_frames} frames at {width}x{height}", present)
    except InsufficientMemoryError as exc:  # the options that cost memory and are the user's to turn off
        costly = [f"{names['batch_passes_off']} (the passes one after another)" if rows > 1 else "",
                  f"{names['step_cache_off']} (no stored residuals)" if cached else ""]
        if not any(costly):
            raise
        raise InsufficientMemoryError(f"{exc} Less memory too: {' and '.join(filter(None, costly))}.") from None
    return placement


def sample_latents_in_worker(
    dit: FantasyTalkingModel,
    run: ParallelRun,
    text_pos: torch.Tensor,
    text_neg: torch.Tensor | None,
    clip_tokens: torch.Tensor,
    image_latents: torch.Tensor,
    audio_features: torch.Tensor,
    num_frames: int,
    settings: GenerationSettings,
    num_audio_tokens: int | None = None,
    pinned_latents: torch.Tensor | None = None,
    loras: tuple = (),
    progress: ProgressFn | None = None,
    placement: str = "resident",
    gpu_memory: float | None = None,
) -> torch.Tensor:
    """One clip in a :class:`~.runtime.pool.SamplerPool` worker (``pool.call(sample_latents_in_worker, ...)``):
    :func:`sample_latents` on the worker's DiT, with ``loras`` applied for this call and the guidance passes shared
    over the pool (``run.map_passes``). The DiT waits on the worker's GPU (whole, or sharded with ``fsdp``) or, in
    a pool started with ``keep_on_device=False``, on the CPU, placed for the call as ``placement`` and
    ``gpu_memory`` say (:func:`check_dit_fits`). Each worker checks its own GPU's memory before sampling and all
    agree (a refusal reaches the host in one line). Arguments as in :func:`sample_latents`, on the CPU; returns
    the latents on the CPU (rank 0's are kept)."""
    check_loras_fit_layout(run.layout, bool(loras), NODE_NAMES)  # the pool is the sampler node's route
    height, width = image_latents.shape[3] * 8, image_latents.shape[4] * 8
    placement = run.agree(lambda: check_dit_fits(dit, run.device, num_frames, height, width, settings, placement,
                                                 gpu_memory, run.layout, NODE_NAMES))
    model = dit.with_loras(loras) if loras else dit
    home = next(dit.parameters()).device
    placed = (on_device(model.audio_proj, run.device) if placement == "sharded"
              else dit_on_device(model, run.device, placement))
    try:
        with placed:
            return sample_latents(model, text_pos, text_neg, clip_tokens, image_latents, audio_features, num_frames,
                                  settings, progress, num_audio_tokens, pinned_latents, run.map_passes).cpu()
    finally:
        if placement == "streamed" and home.type != "cpu":
            dit.to(home)  # streaming leaves the blocks on the CPU; a DiT kept on the GPU waits there again


def sample_latents(
    dit: FantasyTalkingModel,
    text_pos: torch.Tensor,
    text_neg: torch.Tensor | None,
    clip_tokens: torch.Tensor,
    image_latents: torch.Tensor,
    audio_features: torch.Tensor,
    num_frames: int,
    settings: GenerationSettings,
    progress: ProgressFn | None = None,
    num_audio_tokens: int | None = None,
    pinned_latents: torch.Tensor | None = None,
    map_passes: PassMap | None = None,
) -> torch.Tensor:
    """:func:`~.sampling.denoise.generate_latents` with a user's settings: the one place where settings become the
    guidance config, the sigma schedule, the seed and the (motion-shaped) audio strength. Shared by the pipeline
    and the ComfyUI sampler node; tensor arguments (and ``num_audio_tokens``, ``pinned_latents`` for a long
    recording's segments, ``map_passes`` for a parallel run) as in ``generate_latents``. Runs where ``dit`` is."""
    frames, height, width = image_latents.shape[2], image_latents.shape[3] * 8, image_latents.shape[4] * 8
    start, end = settings.audio_guidance_range
    with (using_attention(settings.attention, dit.device), compiled_blocks(dit.transformer, settings.compile),
          fp8_matmuls(dit, dit.device, settings.fp8_matmul)):
        return generate_latents(
            dit, text_pos, text_neg, clip_tokens, image_latents, audio_features, num_frames,
            guidance=GuidanceConfig(settings.cfg, audio_cfg_for(settings.motion, settings.audio_cfg), start, end),
            sigmas=flow_match_sigmas(settings.steps, settings.shift),
            seed=settings.seed,
            audio_scale=audio_scale_map(settings.motion, settings.audio_scale, frames, height, width,
                                        settings.face_box),
            batch_passes=settings.batch_passes,
            progress=progress,
            num_audio_tokens=num_audio_tokens,
            pinned_latents=pinned_latents,
            step_cache=settings.step_cache,
            map_passes=map_passes,
        )


def save_result(result: GenerationResult, path: str | Path, crf: int = DEFAULT_CRF) -> Path:
    """Write ``result`` as an H.264 mp4 (quality ``crf``, see ``media.video.write_video``) with the voice muxed
    as AAC."""
    return write_video(path, result.frames, result.fps, result.audio, result.sample_rate, crf)
