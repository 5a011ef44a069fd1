"""The persistent worker pool (one process per GPU; gloo on CPU here) against the single-process sampler."""

from __future__ import annotations

import pytest
import torch
from parallel_cases import failing_load, load_model, sample, sample_in_pool

from fantasytalking_core.errors import SettingsError
from fantasytalking_core.runtime.parallel import ParallelLayout
from fantasytalking_core.runtime.pool import SamplerPool, WorkerError


def test_a_pool_of_two_guidance_workers_samples_as_one_process_and_stays():
    """cfg=2 over 2 workers, two calls on the same workers (the models load once): both equal one process."""
    reference = sample(load_model())
    with SamplerPool(ParallelLayout(cfg=2), load_model, "cpu", timeout_s=300) as pool:
        pids = [p.pid for p in pool._processes]
        first = pool.call(sample_in_pool)
        second = pool.call(sample_in_pool, batch_passes=True)
        assert [p.pid for p in pool._processes] == pids and all(p.is_alive() for p in pool._processes)
    torch.testing.assert_close(first, reference, rtol=0, atol=1e-5)  # the workers may use other thread counts
    torch.testing.assert_close(second, sample(load_model(), batch_passes=True), rtol=0, atol=1e-5)
    assert not any(p.is_alive() for p in pool._processes)


def test_a_layout_that_does_not_fit_the_gpus_present_is_refused_before_starting():
    with pytest.raises(SettingsError, match=r"needs 6 GPUs \(cfg x ring x ulysses, one per worker\); this machine "
                                            r"has 0"):
        SamplerPool(ParallelLayout(cfg=3, ulysses=2), load_model, "cuda")
    with pytest.raises(SettingsError, match="ring/ulysses split the video tokens over GPUs; on the CPU use cfg=N"):
        SamplerPool(ParallelLayout(ulysses=2), load_model, "cpu")


def test_a_failing_worker_names_its_rank_and_error():
    with pytest.raises(WorkerError, match=r"pool worker \d failed: FileNotFoundError: no DiT at /nowhere"):
        SamplerPool(ParallelLayout(cfg=2), failing_load, "cpu", timeout_s=120)
