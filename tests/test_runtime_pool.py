"""The persistent worker pool (one worker per GPU; gloo on CPU here) against the single-process sampler, with its
workers as spawned processes and as Ray actors (a local Ray instance, started here)."""

from __future__ import annotations

import pytest
import torch
from parallel_cases import (agree_on_rank, check_fails_on_rank_1, dying_load, fail_on_rank_1, failing_load,
                            load_model, refuse_in_pool, sample, sample_in_pool,
                            sample_in_pool_with_progress, worker_pid)

from fantasytalking_core.errors import SettingsError
from fantasytalking_core.runtime.parallel import ParallelLayout
from fantasytalking_core.runtime.pool import SamplerPool, WorkerError

BACKENDS = ["processes", "ray"]


pytestmark = pytest.mark.usefixtures("ray_instance")


def worker_ids(pool: SamplerPool) -> int:
    """Rank 0's process id, asked of the worker itself: another one after a restart."""
    return pool.call(worker_pid)


@pytest.fixture(scope="module", params=BACKENDS)
def pool(request):
    """One cfg=2 pool of the fixture's float32 model per backend, shared by the tests below (starting workers
    costs seconds, Ray actors more); closed, and checked closed, after them."""
    with SamplerPool(ParallelLayout(cfg=2), load_model, "cpu", timeout_s=300, backend=request.param) as started:
        yield started
    assert not started.alive


def test_a_pool_of_two_guidance_workers_samples_as_one_process_and_stays(pool):
    """cfg=2 over 2 workers, two calls on the same workers (the models load once): both equal one process."""
    workers = worker_ids(pool)
    first = pool.call(sample_in_pool)
    second = pool.call(sample_in_pool, batch_passes=True)
    assert worker_ids(pool) == workers and pool.alive
    torch.testing.assert_close(first, sample(load_model()), rtol=0, atol=1e-5)  # workers may use other threads
    torch.testing.assert_close(second, sample(load_model(), batch_passes=True), rtol=0, atol=1e-5)


def test_a_layout_that_does_not_fit_the_gpus_present_is_refused_before_starting():
    with pytest.raises(SettingsError, match=r"needs 6 GPUs \(cfg x ring x ulysses, one per worker\); 0 are "
                                            r"available"):
        SamplerPool(ParallelLayout(cfg=3, ulysses=2), load_model, "cuda")
    with pytest.raises(SettingsError, match=r"needs 2 GPUs .*; 0 are available"):  # the Ray cluster's GPUs
        SamplerPool(ParallelLayout(cfg=2), load_model, "cuda", backend="ray")
    with pytest.raises(SettingsError, match="ring/ulysses split the video tokens over GPUs; on the CPU use cfg=N"):
        SamplerPool(ParallelLayout(ulysses=2), load_model, "cpu")
    with pytest.raises(SettingsError, match="workers run on CUDA GPUs or on the CPU, not on mps; leave parallel empty"):
        SamplerPool(ParallelLayout(cfg=2), load_model, "mps")  # a Mac's one GPU, no process-group backend for it
    with pytest.raises(SettingsError, match=r"backend must be one of \('processes', 'ray'\), got 'threads'"):
        SamplerPool(ParallelLayout(cfg=2), load_model, "cpu", backend="threads")


@pytest.mark.parametrize("backend, how", [("processes", r"exited \(code 3\)"), ("ray", "its Ray actor ended")])
def test_a_worker_that_dies_without_a_word_is_reported_at_once_not_after_the_timeout(backend, how):
    import time

    started = time.monotonic()
    with pytest.raises(WorkerError, match=rf"pool worker \d {how} without an answer"):
        SamplerPool(ParallelLayout(cfg=2), dying_load, "cpu", timeout_s=600, backend=backend)
    assert time.monotonic() - started < 120


def test_a_worker_failing_mid_call_while_another_waits_in_a_collective_closes_the_pool_after_the_grace():
    """The waiting worker can neither finish nor hear the stop: after failure_grace_s the pool is closed (both
    workers gone) and the failure is raised, naming the rank that failed."""
    import time

    pool = SamplerPool(ParallelLayout(cfg=2), load_model, "cpu", timeout_s=300, failure_grace_s=3)
    started = time.monotonic()
    with pytest.raises(WorkerError, match=r"pool worker 1 failed: RuntimeError: rank 1 broke"):
        pool.call(fail_on_rank_1)
    assert not pool.alive and time.monotonic() - started < 60


def test_a_failing_worker_names_its_rank_and_error():
    with pytest.raises(WorkerError, match=r"pool worker \d failed: FileNotFoundError: no DiT at /nowhere"):
        SamplerPool(ParallelLayout(cfg=2), failing_load, "cpu", timeout_s=120)


def test_a_worker_that_cannot_find_the_model_files_names_its_machine():
    """On a Ray cluster every machine needs the model files at the host's paths: the one-line refusal of a
    worker whose machine lacks them says which machine."""
    import re
    import socket

    from fantasytalking_core.errors import ModelNotFoundError
    from fantasytalking_core.loaders.model_source import ModelSource

    missing = ModelSource("/nowhere/dit.safetensors", "/nowhere/fantasytalking.ckpt")
    with pytest.raises(ModelNotFoundError, match=rf"^pool worker \d on {re.escape(socket.gethostname())}: "
                                                 r"Diffusion model not found: /nowhere/dit.safetensors\."):
        SamplerPool(ParallelLayout(cfg=2), missing.load, "cpu", timeout_s=120)


class Interrupted(Exception):
    """Stands in for ComfyUI's InterruptProcessingException."""


def test_progress_reaches_the_host_and_a_raise_stops_every_worker_at_that_step(pool):
    """The host sees rank 0's steps in order; raising in its progress stops all workers at the same step (none is
    left in a collective), the host gets its own exception back, and the same workers then run the next call."""
    reference = sample(load_model())
    steps = []
    workers = worker_ids(pool)
    first = pool.call(sample_in_pool_with_progress, progress=lambda step, total: steps.append((step, total)))
    assert steps == [(1, 2), (2, 2)]

    def stop(step, total):
        steps.append(step)
        raise Interrupted

    steps.clear()
    with pytest.raises(Interrupted):
        pool.call(sample_in_pool_with_progress, progress=stop)
    assert steps == [1]  # no step reported after the one that raised
    again = pool.call(sample_in_pool_with_progress, progress=lambda step, total: None)
    assert pool.alive and worker_ids(pool) == workers
    torch.testing.assert_close(first, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, reference, rtol=0, atol=1e-5)


def test_a_refusal_in_the_workers_reaches_the_host_as_that_error_in_one_line(pool):
    with pytest.raises(SettingsError) as refused:
        pool.call(refuse_in_pool)
    assert "\n" not in str(refused.value) and "not enough GPU memory for 4093 frames" in str(refused.value)
    assert pool.alive  # a refusal leaves the workers ready


def test_a_refusal_of_one_worker_alone_is_agreed_by_all_instead_of_leaving_the_others_waiting(pool):
    """Only rank 1 refuses (its GPU alone lacks memory): rank 0 does not go on into the run's first collective;
    both raise rank 1's refusal, named by its rank, the host gets it at once (not after failure_grace_s), and
    the workers stay ready. The same for a check that breaks on rank 1 alone."""
    import time

    from fantasytalking_core.runtime.memory import InsufficientMemoryError

    started = time.monotonic()
    with pytest.raises(InsufficientMemoryError, match=r"^rank 1: This run needs about 40.1 GiB of GPU memory"):
        pool.call(check_fails_on_rank_1, InsufficientMemoryError("This run needs about 40.1 GiB of GPU memory but "
                                                                 "GPU 1 has 12.0 GiB free."))
    assert time.monotonic() - started < pool.failure_grace_s and pool.alive
    started = time.monotonic()  # an error that is no refusal, on rank 1 alone: shared the same way
    with pytest.raises(WorkerError, match=r"ValueError: cudaMemGetInfo failed on rank 1"):
        pool.call(check_fails_on_rank_1, ValueError("cudaMemGetInfo failed on rank 1"))
    assert time.monotonic() - started < pool.failure_grace_s and pool.alive
    assert pool.call(agree_on_rank) == "fine on rank 0"


def test_a_clip_in_the_workers_with_a_lora_is_the_one_process_clip(pool, tmp_path):
    """pipeline.sample_latents_in_worker: the workers' model with a LoRA for this call (none left afterwards), the
    passes shared over cfg=2, equals sample_latents in one process with the same LoRA."""
    from parallel_cases import NUM_FRAMES, run_inputs
    from test_loaders_lora import kijai_lora

    from fantasytalking_core.loaders.lora import read_wan_lora
    from fantasytalking_core.pipeline import GenerationSettings, sample_latents, sample_latents_in_worker
    from fantasytalking_core.runtime.placement import dit_on_device

    lora = read_wan_lora(kijai_lora(tmp_path / "lora.safetensors")[0], 0.8, name="talk")
    x = run_inputs()
    args = (x["text_pos"], x["text_neg"], x["clip_tokens"], x["image_latents"], x["audio_features"], NUM_FRAMES,
            GenerationSettings(steps=2, seed=3, audio_guidance_range=(0.0, 0.5)))
    model = load_model().with_loras([lora])
    with dit_on_device(model, torch.device("cpu")):
        reference = sample_latents(model, *args)
    plain = sample_latents(load_model(), *args)
    with_lora = pool.call(sample_latents_in_worker, *args, loras=(lora,))
    without = pool.call(sample_latents_in_worker, *args)  # the LoRA was for that call only
    torch.testing.assert_close(with_lora, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(without, plain, rtol=0, atol=1e-5)
    assert (reference - plain).abs().max() > 1e-2  # the LoRA changes the clip


def test_a_clip_in_the_workers_streamed_or_within_a_budget_is_the_one_process_clip(pool):
    """sample_latents_in_worker places each worker's DiT as the node's offload_blocks / gpu_memory_gb say:
    streamed block by block it gives the resident clip; a budget that even streaming exceeds is refused in every
    worker before sampling, in one line, and the workers stay ready."""
    from parallel_cases import NUM_FRAMES, run_inputs

    from fantasytalking_core.pipeline import GenerationSettings, sample_latents, sample_latents_in_worker
    from fantasytalking_core.runtime.memory import InsufficientMemoryError

    x = run_inputs()
    args = (x["text_pos"], x["text_neg"], x["clip_tokens"], x["image_latents"], x["audio_features"], NUM_FRAMES,
            GenerationSettings(steps=2, seed=3, audio_guidance_range=(0.0, 0.5)))
    streamed = pool.call(sample_latents_in_worker, *args, placement="streamed")
    torch.testing.assert_close(streamed, sample_latents(load_model(), *args), rtol=0, atol=1e-5)
    with pytest.raises(InsufficientMemoryError) as refused:
        pool.call(sample_latents_in_worker, *args, gpu_memory=1e-4)
    assert str(refused.value).startswith("Even streaming the DiT's blocks this run needs about") and pool.alive
