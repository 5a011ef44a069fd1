"""The sampler's worker processes for a ``parallel`` layout, one per GPU, kept between runs.

Starting the workers costs a model load each (minutes for the 14B model), so the pool stays for the next run with
the same model files and layout, and is closed when either changes, when a run leaves it stuck, when ComfyUI
exits, or when the model it was started for is dropped (ComfyUI's "Free model and node cache"). One pool at a
time: a second layout would need the same GPUs.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from pathlib import Path

import torch

from fantasytalking_core.errors import FantasyTalkingError, SettingsError, reworded
from fantasytalking_core.loaders.wan_dit import loaded_bytes
from fantasytalking_core.model.transformer import FantasyTalkingModel
from fantasytalking_core.pipeline import GenerationSettings, budget_settings, check_dit_fits
from fantasytalking_core.runtime.memory import check_host_memory
from fantasytalking_core.runtime.parallel import (
    NODE_NAMES,
    check_layout,
    check_loras_fit_layout,
    check_offload_fits_layout,
    check_tokens_split,
    parse_parallel,
)
from fantasytalking_core.runtime.pool import SamplerPool, check_layout_fits

logger = logging.getLogger(__name__)
_pool: tuple[tuple, SamplerPool, weakref.finalize] | None = None  # (started for, the pool, its model's finalizer)


def check_parallel_text(text: str) -> str | None:
    """The sampler's ``parallel`` input checked for its form (before the run): None when fine, else the message."""
    if not text.strip():
        return None
    try:
        parse_parallel(text, NODE_NAMES)
    except SettingsError as exc:
        return f"FantasyTalking Sampler: {exc}"
    return None


def sampler_pool(model: FantasyTalkingModel, text: str, device: torch.device, settings: GenerationSettings,
                 backend: str = "processes", offload_blocks: bool = False, gpu_memory_gb: float = 0.0,
                 video: tuple[int, int, int] | None = None) -> SamplerPool | None:
    """The worker pool for ``text`` (e.g. ``"cfg=3"``, ``"cfg=3,ulysses=2"``), started or reused; None (and any
    pool closed) when ``text`` is empty. ``backend``: ``"processes"`` on this machine's GPUs, or ``"ray"`` (Ray
    actors, on the GPUs of the Ray cluster this process joins).

    With ``offload_blocks`` or a ``gpu_memory_gb`` budget each worker keeps its DiT on the CPU and places it for
    every clip (streamed, or as the budget allows on its GPU); otherwise the DiT waits on each worker's GPU.
    Refuses, in one line and before any worker starts, a layout this run or the GPUs cannot use: more GPUs than
    present, more cfg ranks than guidance passes, LoRAs or offload_blocks with ``fsdp``, a model that was not
    loaded from files, Ray without the ray package, and a run that even streamed exceeds the budget (``video``:
    frames of the longest segment, height and width in pixels, when known)."""
    global _pool
    if not text.strip():
        close_sampler_pool()
        return None
    layout = parse_parallel(text, NODE_NAMES)
    where = f"FantasyTalking Sampler: parallel {layout}"
    try:
        check_layout(layout, layout.world_size, settings.max_passes(),
                     model.transformer.config.num_attention_heads, settings.attention, NODE_NAMES)
        if backend == "processes":  # a Ray pool checks its cluster's GPUs as it starts
            check_layout_fits(layout, device.type)
        check_loras_fit_layout(layout, bool(model.loras), NODE_NAMES)
        check_offload_fits_layout(layout, offload_blocks and not gpu_memory_gb, NODE_NAMES)
        if video is not None:
            check_tokens_split(layout, *video, NODE_NAMES)
    except SettingsError as exc:
        raise reworded(exc, f"FantasyTalking Sampler: {exc}") from None
    if model.source is None:
        raise SettingsError(f"{where}: each worker loads the model from its files, and this model did not come "
                            "from FantasyTalking Model Loader; load it there.")
    if gpu_memory_gb and video is not None:  # the budget, known before the workers load (their GPUs: per clip)
        try:
            settings = budget_settings(model, *video, settings, gpu_memory_gb, layout)  # as the run will use them
            check_dit_fits(model, torch.device("cpu"), *video, settings, gpu_memory=gpu_memory_gb, layout=layout,
                           names=NODE_NAMES)
        except FantasyTalkingError as exc:
            raise reworded(exc, f"{where}: {exc}") from None
    keep_on_device = not (offload_blocks or gpu_memory_gb)
    key = (model.source, str(layout), device.type, backend, keep_on_device)
    if _pool is not None and _pool[0] == key and _pool[1].alive:
        _pool = (key, _pool[1], _closed_with(model, _pool[1], _pool[2]))
        return _pool[1]
    close_sampler_pool()
    if backend == "processes":  # every worker loads its own copy into this machine's RAM, all at once
        source = model.source
        check_host_memory(layout.world_size * loaded_bytes(source.dit, source.weight_dtype, source.compute_dtype),
                          f"{where}: {layout.world_size} workers, each loading {Path(source.dit).name},",
                          "weight_dtype fp8_e4m3fn or a GGUF file needs less, fsdp does not (each worker loads the "
                          "whole model before it keeps its share); or fewer workers, or Ray workers on other "
                          "machines.")
    logger.info("%s: starting %d workers (%s), each loading %s", where, layout.world_size, backend,
                model.source.dit)
    try:
        pool = SamplerPool(layout, model.source.load, device.type, backend=backend, keep_on_device=keep_on_device)
    except FantasyTalkingError as exc:  # a refusal, or a worker that could not load the model
        raise reworded(exc, f"FantasyTalking Sampler: {exc}") from None
    _pool = (key, pool, _closed_with(model, pool))
    return pool


def _closed_with(model: FantasyTalkingModel, pool: SamplerPool, finalizer: weakref.finalize | None = None
                 ) -> weakref.finalize:
    """Close ``pool`` when ``model``'s weights are dropped (ComfyUI's "Free model and node cache", or another model
    loaded in the Model Loader), so that its workers' GPU memory goes with the model they copy; moved from the
    weights ``finalizer`` watches when a pool is reused for a newly loaded model of the same files. The weights,
    not the model object: a LoRA node's model is a new object over the same weights, dropped whenever the LoRA
    changes, while the pool stays right for it."""
    if finalizer is not None:
        watched = finalizer.peek()
        if watched is not None and watched[0] is model.transformer:
            return finalizer
        finalizer.detach()
    return weakref.finalize(model.transformer, _close_if_current, pool)


def _close_if_current(pool: SamplerPool) -> None:
    if _pool is not None and _pool[1] is pool:
        close_sampler_pool()


def close_sampler_pool() -> None:
    """Stop the workers, if any (their models go with them)."""
    global _pool
    if _pool is not None:
        _, pool, finalizer = _pool
        _pool = None
        finalizer.detach()
        pool.close()


atexit.register(close_sampler_pool)
