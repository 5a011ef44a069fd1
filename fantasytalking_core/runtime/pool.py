"""A persistent pool of worker processes, one per GPU, that run the same sampling code under a parallel layout.

For hosts like ComfyUI, where one long-lived process takes requests and ``torchrun`` does not start the run: the
pool starts ``cfg x ring x ulysses`` processes once (spawned, one GPU each), each joins one process group, loads
its own copy of the DiT through a picklable ``load`` function, and prepares it for the layout
(:meth:`~.parallel.ParallelRun.prepare`). Each :meth:`SamplerPool.call` then runs one function in every worker in
lockstep and returns rank 0's result; the workers and their models stay for the next call until :meth:`close`.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.multiprocessing as mp

from ..errors import FantasyTalkingError, SettingsError
from .parallel import ParallelLayout, ParallelRun

# (model, run, *args, **kwargs) -> result: what every worker runs for one call; rank 0's result is returned
PoolFn = Callable[..., Any]


class WorkerError(FantasyTalkingError, RuntimeError):
    """A pool worker failed; the message names the rank and its error, the traceback follows on the next lines."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_layout_fits(layout: ParallelLayout, device_type: str) -> None:
    """Refuse a layout that needs more GPUs than this machine has (one GPU per worker)."""
    if device_type == "cuda":
        gpus = torch.cuda.device_count()
        if layout.world_size > gpus:
            raise SettingsError(f"parallel layout {layout} needs {layout.world_size} GPUs (cfg x ring x ulysses, one "
                                f"per worker); this machine has {gpus}.")
    elif layout.sequence > 1 and torch.accelerator.device_count() == 0:
        raise SettingsError(f"parallel layout {layout}: ring/ulysses split the video tokens over GPUs; on the CPU "
                            "use cfg=N alone.")


def _worker(rank: int, world: int, port: int, layout: ParallelLayout, device_type: str, load: Callable,
            jobs: Any, results: Any) -> None:
    """One pool worker: join the group, load and prepare the model, then run calls until told to stop."""
    import torch.distributed as dist

    try:
        if device_type == "cuda":
            torch.cuda.set_device(rank)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(minutes=30))
        run = ParallelRun(layout, device_type)
        model = load()
        run.prepare(model.transformer)
        if not run.weights_sharded:
            model.to(torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu"))
        results.put(("ready", rank, None))
    except BaseException:
        results.put(("error", rank, traceback.format_exc()))
        return
    while True:
        job = jobs.get()
        if job is None:
            break
        fn, args, kwargs = job
        try:
            with torch.no_grad():
                out = fn(model, run, *args, **kwargs)
            results.put(("done", rank, out if rank == 0 else None))
        except BaseException:
            results.put(("error", rank, traceback.format_exc()))
    dist.destroy_process_group()


class SamplerPool:
    """Worker processes, one per GPU, holding a prepared DiT each, for repeated parallel calls.

    Args:
        layout: the cfg x ring x ulysses layout; its world size is the number of workers (and GPUs).
        load: a picklable function (module level, or a ``functools.partial`` of one) returning the
            :class:`~..model.transformer.FantasyTalkingModel` on the CPU; run once in every worker.
        device_type: ``"cuda"`` (worker r on GPU r, NCCL) or ``"cpu"`` (gloo; cfg layouts).
        timeout_s: how long to wait for the workers to start and for each call.
    """

    def __init__(self, layout: ParallelLayout, load: Callable, device_type: str = "cuda", timeout_s: float = 3600):
        check_layout_fits(layout, device_type)
        self.layout = layout
        self.timeout_s = timeout_s
        context = mp.get_context("spawn")
        self._jobs = [context.Queue() for _ in range(layout.world_size)]
        self._results = context.Queue()
        port = _free_port()
        self._processes = [
            context.Process(target=_worker, daemon=True,
                            args=(rank, layout.world_size, port, layout, device_type, load, self._jobs[rank],
                                  self._results))
            for rank in range(layout.world_size)
        ]
        for process in self._processes:
            process.start()
        try:
            self._collect("ready")
        except BaseException:
            self.close()
            raise

    def _collect(self, kind: str) -> Any:
        """Wait for every worker's ``kind`` message; rank 0's payload, or WorkerError on the first failure."""
        import queue

        payload = None
        for _ in range(self.layout.world_size):
            try:
                status, rank, value = self._results.get(timeout=self.timeout_s)
            except queue.Empty:
                raise WorkerError(f"the pool's workers gave no answer within {self.timeout_s:g} s") from None
            if status == "error":
                last = value.strip().splitlines()[-1]
                raise WorkerError(f"pool worker {rank} failed: {last}\n{value}")
            if rank == 0:
                payload = value
        return payload

    def call(self, fn: PoolFn, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(model, run, *args, **kwargs)`` in every worker (``run``: its
        :class:`~.parallel.ParallelRun`, whose ``map_passes`` shares the guidance passes); rank 0's result.
        ``fn`` must be picklable and the arguments CPU tensors or plain data."""
        for jobs in self._jobs:
            jobs.put((fn, args, kwargs))
        return self._collect("done")

    def close(self) -> None:
        """Stop the workers (their models go with them)."""
        for jobs, process in zip(self._jobs, self._processes):
            if process.is_alive():
                jobs.put(None)
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()

    def __enter__(self) -> SamplerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
