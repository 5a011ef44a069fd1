"""A persistent pool of worker processes, one per GPU, that run the same sampling code under a parallel layout.

For hosts like ComfyUI, where one long-lived process takes requests and ``torchrun`` does not start the run: the
pool starts ``cfg x ring x ulysses`` processes once (spawned, one GPU each), each joins one process group, loads
its own copy of the DiT through a picklable ``load`` function, and prepares it for the layout
(:meth:`~.parallel.ParallelRun.prepare`). Each :meth:`SamplerPool.call` then runs one function in every worker in
lockstep and returns rank 0's result; the workers and their models stay for the next call until :meth:`close`.

A call can report progress: rank 0 sends each step to the host and waits for its answer, and the host's
``progress(step, total)`` may raise to stop the run (ComfyUI's Cancel). The workers then agree, by an all-reduce
at that same step, to stop together, so none waits in a collective the others left; they stay ready for the next
call, and the host re-raises its exception.
A worker's own user-facing error (a :class:`~..errors.FantasyTalkingError`: a layout, memory or LoRA refusal)
reaches the host as that error, in one line; anything else as :class:`WorkerError` with the worker's traceback.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from datetime import timedelta
from typing import Any

import torch
import torch.multiprocessing as mp

from ..errors import FantasyTalkingError, SettingsError
from .parallel import ParallelLayout, ParallelRun

FAILURE_GRACE_S = 30.0
"""How long the other workers get to answer once one has failed, before the pool is closed as stuck."""

# (model, run, *args, **kwargs) -> result: what every worker runs for one call; rank 0's result is returned
PoolFn = Callable[..., Any]


class WorkerError(FantasyTalkingError, RuntimeError):
    """A pool worker failed; the message names the rank and its error, the traceback follows on the next lines."""


class Cancelled(RuntimeError):
    """Raised in every worker at the step where the host asked the call to stop."""


class WorkerProgress:
    """The ``progress(step, total)`` a worker's call gets: rank 0 reports the step to the host and waits for its
    answer (go on or stop), then all workers agree by an all-reduce of the stop flag (which a failed worker can
    also set) and raise :class:`Cancelled` together if any says stop."""

    def __init__(self, rank: int, results: Any, answers: Any, cancel: Any, device: torch.device):
        self.rank, self.results, self.answers, self.cancel, self.device = rank, results, answers, cancel, device

    def __call__(self, step: int, total: int) -> None:
        import torch.distributed as dist

        stop = False
        if self.rank == 0:
            self.results.put(("step", 0, (step, total)))
            stop = not self.answers.get()
        flag = torch.tensor([1.0 if stop or self.cancel.is_set() else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            raise Cancelled(f"stopped by the host after step {step} of {total}")


def _failure(rank: int, exc: BaseException) -> tuple:
    """What a worker sends for its failure: the error itself when it is a user-facing one (one line), else its
    traceback."""
    if isinstance(exc, Cancelled):
        return ("cancelled", rank, None)
    if isinstance(exc, FantasyTalkingError):
        try:
            import pickle

            pickle.dumps(exc)
            return ("refused", rank, exc)
        except Exception:  # noqa: BLE001 - an error that cannot cross processes goes as its traceback
            pass
    return ("error", rank, traceback.format_exc())


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


@contextmanager
def _spawnable_from_any_host() -> Iterator[None]:
    """While workers start: the folder holding ``fantasytalking_core`` on the path they inherit (a host may have
    bound the engine by name without it, as ComfyUI's custom-node import does), and a bare ``__main__``, so that
    they do not re-run the host's main script (ComfyUI's main.py would run its start-up again in every worker)."""
    root = str(Path(__file__).resolve().parents[2])
    added = root not in sys.path
    if added:
        sys.path.append(root)
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main
        if added and root in sys.path:
            sys.path.remove(root)


def _worker(rank: int, world: int, port: int, layout: ParallelLayout, device_type: str, load: Callable,
            jobs: Any, results: Any, answers: Any, cancel: Any) -> None:
    """One pool worker: join the group, load and prepare the model, then run calls until told to stop."""
    import torch.distributed as dist

    try:
        if device_type == "cuda":
            torch.cuda.set_device(rank)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(minutes=30))
        run = ParallelRun(layout, device_type)
        device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
        model = load()
        run.prepare(model.transformer)
        if not run.weights_sharded:
            model.to(device)
        results.put(("ready", rank, None))
    except BaseException as exc:
        results.put(_failure(rank, exc))
        return
    while True:
        job = jobs.get()
        if job is None:
            break
        fn, args, kwargs, report = job
        try:
            if report:
                kwargs = {**kwargs, "progress": WorkerProgress(rank, results, answers, cancel, device)}
            with torch.no_grad():
                out = fn(model, run, *args, **kwargs)
            results.put(("done", rank, out if rank == 0 else None))
        except BaseException as exc:
            results.put(_failure(rank, exc))
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
        self._answers = context.Queue()  # the host's go-on (True) or stop (False) after each reported step
        self._cancel = context.Event()
        port = _free_port()
        self._processes = [
            context.Process(target=_worker, daemon=True,
                            args=(rank, layout.world_size, port, layout, device_type, load, self._jobs[rank],
                                  self._results, self._answers, self._cancel))
            for rank in range(layout.world_size)
        ]
        with _spawnable_from_any_host():
            for process in self._processes:
                process.start()
        try:
            self._collect()
        except BaseException:
            self.close()
            raise

    def _collect(self, progress: Callable[[int, int], None] | None = None) -> Any:
        """Wait until every worker has answered; rank 0's payload. ``progress`` gets rank 0's steps; when it raises,
        the workers are told to stop and its exception is raised once they all have. A worker's failure is raised
        once every worker has answered (the others stop at their next collective or finish)."""
        import queue
        import time

        payload, answered, stop, failure = None, 0, None, None
        deadline = time.monotonic() + self.timeout_s
        while answered < self.layout.world_size:
            try:
                status, rank, value = self._results.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                dead = [(rank, p.exitcode) for rank, p in enumerate(self._processes) if p.exitcode is not None]
                if not dead and time.monotonic() < deadline:
                    continue
                self.close()  # a worker died, or is stuck (in a collective a failed one left): the pool cannot go on
                if failure is not None:
                    raise failure from None
                if dead:
                    raise WorkerError(f"pool worker {dead[0][0]} exited (code {dead[0][1]}) without an answer; its "
                                      "error is in the log above") from None
                raise WorkerError(f"the pool's workers gave no answer within {self.timeout_s:g} s") from None
            if status == "step":
                if progress is not None and stop is None:
                    try:
                        progress(*value)
                    except BaseException as exc:  # noqa: BLE001 - re-raised below, once the workers have stopped
                        stop = exc
                self._answers.put(stop is None and failure is None)
                continue
            answered += 1
            if status in ("refused", "error") and failure is None:
                failure = value if status == "refused" else WorkerError(
                    f"pool worker {rank} failed: {value.strip().splitlines()[-1]}\n{value}")
                self._cancel.set()  # the others stop at their next step instead of waiting for this one
                deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
            elif rank == 0:
                payload = value
        if stop is not None:
            raise stop
        if failure is not None:
            raise failure
        return payload

    def call(self, fn: PoolFn, *args: Any, progress: Callable[[int, int], None] | None = None,
             **kwargs: Any) -> Any:
        """Run ``fn(model, run, *args, **kwargs)`` in every worker (``run``: its
        :class:`~.parallel.ParallelRun`, whose ``map_passes`` shares the guidance passes); rank 0's result.
        ``fn`` must be picklable and the arguments CPU tensors or plain data.

        With ``progress``, ``fn`` also gets a ``progress`` keyword (:class:`WorkerProgress`) to call after each
        step; the host's ``progress(step, total)`` then sees rank 0's steps and may raise to stop the call."""
        self._cancel.clear()
        for jobs in self._jobs:
            jobs.put((fn, args, kwargs, progress is not None))
        return self._collect(progress)

    @property
    def alive(self) -> bool:
        """True while every worker runs (a pool closed after a stuck call is not)."""
        return all(process.is_alive() for process in self._processes)

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
