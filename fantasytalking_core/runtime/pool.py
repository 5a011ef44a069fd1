"""A persistent pool of worker processes, one per GPU, that run the same sampling code under a parallel layout.

For hosts like ComfyUI, where one long-lived process takes requests and ``torchrun`` does not start the run: the
pool starts ``cfg x ring x ulysses`` workers once (one GPU each), each joins one process group, loads its own copy
of the DiT through a picklable ``load`` function, and prepares it for the layout
(:meth:`~.parallel.ParallelRun.prepare`). Each :meth:`SamplerPool.call` then runs one function in every worker in
lockstep and returns rank 0's result; the workers and their models stay for the next call until :meth:`close`.

Two ways to start the workers, one protocol: ``"processes"`` spawns them on this machine (torch.multiprocessing);
``"ray"`` starts them as Ray actors (the optional ``ray`` package), on this machine or on the GPUs of a Ray
cluster the host has joined (``RAY_ADDRESS``), so one run can span several machines.

A call can report progress: rank 0 sends each step to the host and waits for its answer, and the host's
``progress(step, total)`` may raise to stop the run (ComfyUI's Cancel). The workers then agree, by an all-reduce
at that same step, to stop together, so none waits in a collective the others left; they stay ready for the next
call, and the host re-raises its exception.
A worker's own user-facing error (a :class:`~..errors.FantasyTalkingError`, e.g. a LoRA refusal) reaches the
host as that error, in one line (``pipeline.sample_latents_in_worker`` checks each worker's GPU memory before a
clip, and all workers agree on a refusal); anything else as :class:`WorkerError` with the worker's traceback.
The others may then wait in a collective the failed worker left: after ``failure_grace_s`` the pool is closed
and must be started again.
Workers die with the process that started them (Linux; Ray actors with their owner).
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from ..errors import FantasyTalkingError, MissingDependencyError, SettingsError, reworded
from .parallel import ParallelLayout, ParallelRun, process_group_backend

POOL_BACKENDS = ("processes", "ray")
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
    answer (go on, or stop: the host's progress raised, or another worker failed), then all workers agree by an
    all-reduce and raise :class:`Cancelled` together when the answer was stop."""

    def __init__(self, call: int, rank: int, results: Any, answers: Any, device: torch.device):
        self.call, self.rank, self.results, self.answers, self.device = call, rank, results, answers, device

    def __call__(self, step: int, total: int) -> None:
        import torch.distributed as dist

        stop = 0.0
        if self.rank == 0:
            self.results.put((self.call, "step", 0, (step, total)))
            call, go_on = self.answers.get()
            while call != self.call:  # an answer meant for an earlier call that ended without reading it
                call, go_on = self.answers.get()
            stop = 0.0 if go_on else 1.0
        flag = torch.tensor([stop], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            raise Cancelled(f"stopped by the host after step {step} of {total}")


def _failure(call: int, rank: int, exc: BaseException) -> tuple:
    """What a worker sends for its failure in ``call``: the error itself when it is a user-facing one (one line),
    else its traceback."""
    if isinstance(exc, Cancelled):
        return (call, "cancelled", rank, None)
    if isinstance(exc, FantasyTalkingError):
        try:
            pickle.dumps(exc)
            return (call, "refused", rank, exc)
        except Exception:  # noqa: BLE001 - an error that cannot cross processes goes as its traceback
            pass
    return (call, "error", rank, traceback.format_exc())


def _die_with_parent() -> None:
    """Linux: this worker gets SIGTERM when the process that started it dies (a crashed ComfyUI), instead of
    keeping a model on its GPU with nobody to give it work."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def first_line(error: Any, last: bool = False) -> str:
    """The first (or last) non-empty line of an error or traceback text, or its type's name."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if last else lines[0]) if lines else type(error).__name__


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def check_layout_fits(layout: ParallelLayout, device_type: str, available: int | None = None) -> None:
    """Refuse a layout that needs more devices than there are (one per worker): ``available`` GPUs (CPUs for CPU
    workers) the workers can use; default: this machine's GPUs, and CPU workers are not counted, and the workers
    being on this machine, its PyTorch must have their process-group backend (NCCL for GPUs)."""
    if device_type not in ("cuda", "cpu"):  # e.g. Apple's MPS: one GPU, no process-group backend for it
        raise SettingsError(f"parallel layout {layout}: workers run on CUDA GPUs or on the CPU, not on "
                            f"{device_type}; leave parallel empty.")
    if device_type == "cuda":
        gpus = torch.cuda.device_count() if available is None else available
        if layout.world_size > gpus:
            raise SettingsError(f"parallel layout {layout} needs {layout.world_size} GPUs (cfg x ring x ulysses, one "
                                f"per worker); {gpus} are available.")
        if available is None:
            process_group_backend(device_type)
        return
    if layout.sequence > 1 and torch.accelerator.device_count() == 0:
        raise SettingsError(f"parallel layout {layout}: ring/ulysses split the video tokens over GPUs; on the CPU "
                            "use cfg=N alone.")
    if available is not None and layout.world_size > available:
        raise SettingsError(f"parallel layout {layout} needs {layout.world_size} CPUs (one per worker); "
                            f"{available} are available.")


def _worker(rank: int, world: int, master: tuple[str, int], layout: ParallelLayout, device_type: str, gpu: int,
            load: Callable, keep_on_device: bool, jobs: Any, results: Any, answers: Any) -> None:
    """One pool worker: join the group (rank 0 at ``master``), load and prepare the model (on GPU ``gpu`` when
    ``keep_on_device`` or sharded; else it waits on the CPU), then run calls until told to stop."""
    import torch.distributed as dist

    try:
        _die_with_parent()
        if device_type == "cuda":
            torch.cuda.set_device(gpu)
        os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
        dist.init_process_group(process_group_backend(device_type), rank=rank, world_size=world,
                                timeout=timedelta(minutes=30))
        run = ParallelRun(layout, device_type)
        model = load()
        run.prepare(model.transformer)
        if keep_on_device and not run.weights_sharded:
            model.to(run.device)
        results.put((0, "ready", rank, None))
    except FantasyTalkingError as exc:  # e.g. its machine lacks the model files: say which machine
        results.put(_failure(0, rank, reworded(exc, f"pool worker {rank} on {socket.gethostname()}: {exc}")))
        return
    except BaseException as exc:
        results.put(_failure(0, rank, exc))
        return
    while True:
        job = jobs.get()
        if job is None:
            break
        call, fn, args, kwargs, report = job
        try:
            if report:
                kwargs = {**kwargs, "progress": WorkerProgress(call, rank, results, answers, run.device)}
            with torch.no_grad():
                out = fn(model, run, *args, **kwargs)
            results.put((call, "done", rank, out if rank == 0 else None))
        except BaseException as exc:
            results.put(_failure(call, rank, exc))
    dist.destroy_process_group()


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


def _ray():
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("the ray worker pool needs the ray package (pip install ray); or use the "
                                     "processes pool, on this machine's GPUs.") from None
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=True)  # RAY_ADDRESS: a cluster
    return ray


def _free_ray_devices(ray: Any, resource: str, wanted: int, wait_s: float = 5.0) -> int:
    """How many ``resource`` ("GPU" or "CPU") the Ray cluster has free, waiting up to ``wait_s`` seconds for
    ``wanted``: the actors of a pool closed just before release theirs a moment after ``ray.kill``."""
    deadline = time.monotonic() + wait_s
    while True:
        free = int(ray.available_resources().get(resource, 0))
        if free >= wanted or time.monotonic() >= deadline:
            return free
        time.sleep(0.1)


class _RayWorker:
    """A pool worker as a Ray actor: :func:`_worker` in one long call (``serve``), fed through Ray queues."""

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), _free_port()

    def serve(self, *args: Any) -> None:
        _worker(*args)


class SamplerPool:
    """Workers, one per GPU, holding a prepared DiT each, for repeated parallel calls.

    Args:
        layout: the cfg x ring x ulysses layout; its world size is the number of workers (and GPUs).
        load: a picklable function (module level, or a ``functools.partial`` or bound method of a picklable
            object such as :class:`~..loaders.model_source.ModelSource`) returning the
            :class:`~..model.transformer.FantasyTalkingModel` on the CPU; run once in every worker.
        device_type: ``"cuda"`` (one GPU per worker, NCCL) or ``"cpu"`` (gloo; cfg layouts).
        timeout_s: the longest the workers may stay silent: to start, or between two steps of a call (or for a
            whole call that reports no progress).
        backend: ``"processes"`` (spawned on this machine, worker r on GPU r) or ``"ray"`` (Ray actors with one
            GPU each, or one CPU for CPU workers, wherever the Ray cluster has them free; refused when it has
            fewer).
        failure_grace_s: once a worker has failed, how long the others get to answer before the pool is closed
            as stuck (they may wait in a collective the failed one left).
        keep_on_device: each worker's DiT waits on its GPU between calls; False: on the CPU, for calls that
            place it themselves (streamed block by block, or as a memory budget allows). Sharded weights (``fsdp``)
            stay on the GPUs either way.
    """

    def __init__(self, layout: ParallelLayout, load: Callable, device_type: str = "cuda", timeout_s: float = 3600,
                 backend: str = "processes", failure_grace_s: float = FAILURE_GRACE_S, keep_on_device: bool = True):
        if backend not in POOL_BACKENDS:
            raise SettingsError(f"worker pool backend must be one of {POOL_BACKENDS}, got {backend!r}.")
        self.layout, self.timeout_s, self.backend = layout, timeout_s, backend
        self.keep_on_device, self.device_type = keep_on_device, device_type
        self.failure_grace_s = failure_grace_s
        self._call = 0  # the id of the current call (0: start-up); messages of other calls are stale
        self._pending = False
        self._processes: list = []  # processes backend
        self._actors: list = []  # ray backend: the actors, and their serve() calls
        self._served: list = []
        self._jobs: list = []  # one queue per worker; results and answers shared
        self._results = self._answers = None
        start = self._start_ray if backend == "ray" else self._start_processes
        try:
            start(load, device_type)
            self._collect()
        except BaseException:
            self.close()
            raise

    def _start_processes(self, load: Callable, device_type: str) -> None:
        check_layout_fits(self.layout, device_type)
        context = mp.get_context("spawn")
        world = self.layout.world_size
        self._jobs = [context.Queue() for _ in range(world)]
        self._results = context.Queue()
        self._answers = context.Queue()  # the host's go-on (True) or stop (False) after each reported step
        master = ("127.0.0.1", _free_port())
        self._processes = [
            context.Process(target=_worker, daemon=True,
                            args=(rank, world, master, self.layout, device_type, rank, load, self.keep_on_device,
                                  self._jobs[rank], self._results, self._answers))
            for rank in range(world)
        ]
        with _spawnable_from_any_host():
            for process in self._processes:
                process.start()

    def _start_ray(self, load: Callable, device_type: str) -> None:
        ray = _ray()
        from ray.util.queue import Queue

        # one GPU (CPU workers: one CPU) per actor, so that Ray places them where those are free, over the
        # cluster's machines; devices other work holds would leave actors waiting
        resource = "GPU" if device_type == "cuda" else "CPU"
        check_layout_fits(self.layout, device_type, _free_ray_devices(ray, resource, self.layout.world_size))
        world = self.layout.world_size
        # the workers, and the queue actors that unpickle what passes through them, import what the host imports
        # (as spawned processes inherit its sys.path)
        path = os.pathsep.join([str(Path(__file__).resolve().parents[2]), *filter(None, sys.path)])
        env = {"runtime_env": {"env_vars": {"PYTHONPATH": path}}}
        self._jobs = [Queue(actor_options={**env, "num_cpus": 0}) for _ in range(world)]
        self._results, self._answers = (Queue(actor_options={**env, "num_cpus": 0}) for _ in range(2))
        actor = ray.remote(_RayWorker).options(num_gpus=int(resource == "GPU"), num_cpus=int(resource == "CPU"), **env)
        self._actors = [actor.remote() for _ in range(world)]
        master = ray.get(self._actors[0].address.remote(), timeout=self.timeout_s)
        # Ray shows each actor only its own GPU: device 0 of what it sees
        self._served = [a.serve.remote(rank, world, master, self.layout, device_type, 0, load, self.keep_on_device,
                                       self._jobs[rank], self._results, self._answers)
                        for rank, a in enumerate(self._actors)]

    def _dead(self) -> list[tuple[int, str]]:
        """Workers that stopped without being told to: (rank, how)."""
        if self.backend == "ray":
            import ray

            done, _ = ray.wait(self._served, num_returns=len(self._served), timeout=0)
            return [(self._served.index(ref), "its Ray actor ended") for ref in done]
        return [(rank, f"exited (code {p.exitcode})") for rank, p in enumerate(self._processes)
                if p.exitcode is not None]

    def _collect(self, progress: Callable[[int, int], None] | None = None) -> Any:
        """Wait until every worker has answered the current call; rank 0's payload. ``progress`` gets rank 0's
        steps; when it raises, the workers are told to stop and its exception is raised once they all have. A
        worker's failure is raised once every worker has answered, or after ``failure_grace_s`` (the others may
        wait in a collective the failed one left: the pool is then closed). Anything unexpected closes the pool,
        so that no answer of this call can be taken for one of the next."""
        try:
            return self._collect_answers(progress)
        except BaseException:
            if self.alive and self._pending:
                self.close()
            raise

    def _collect_answers(self, progress: Callable[[int, int], None] | None) -> Any:
        payload, answered, stop, failure, quiet = None, set(), None, None, 0
        deadline = time.monotonic() + self.timeout_s
        self._pending = True
        while len(answered) < self.layout.world_size:
            try:
                call, status, rank, value = self._results.get(
                    timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                dead = [(rank, how) for rank, how in self._dead() if rank not in answered]
                quiet = quiet + 1 if dead else 0
                if quiet == 1 or (not dead and time.monotonic() < deadline):
                    continue  # one more read: a worker may have answered just before it ended
                self.close()  # a worker died, or is stuck (in a collective a failed one left): the pool cannot go on
                if dead:  # the cause; what the others then said follows from it (e.g. their peer's connection reset)
                    then = f" (then {first_line(failure)})" if failure is not None else ""
                    raise WorkerError(f"pool worker {dead[0][0]} {dead[0][1]} without an answer{then}; its error is "
                                      "in the log above") from None
                if failure is not None:
                    raise failure from None
                raise WorkerError(f"the pool's workers gave no answer within {self.timeout_s:g} s") from None
            if call != self._call:
                continue  # left by an earlier call
            if status == "step":
                deadline = time.monotonic() + self.timeout_s  # the limit is on silence, not on the whole call
                if progress is not None and stop is None:
                    try:
                        progress(*value)
                    except BaseException as exc:  # noqa: BLE001 - re-raised below, once the workers have stopped
                        stop = exc
                self._answers.put((call, stop is None and failure is None))
                continue
            answered.add(rank)
            if status in ("refused", "error") and failure is None:
                failure = value if status == "refused" else WorkerError(
                    f"pool worker {rank} failed: {first_line(value, last=True)}\n{value}")
                deadline = min(deadline, time.monotonic() + self.failure_grace_s)
            elif rank == 0:
                payload = value
        self._pending = False
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
        self._call += 1
        self._pending = True  # until every worker has answered: a failure before that closes the pool
        try:
            for jobs in self._jobs:
                jobs.put((self._call, fn, args, kwargs, progress is not None))
        except BaseException:
            self.close()
            raise
        return self._collect(progress)

    @property
    def alive(self) -> bool:
        """True while every worker runs (a pool closed after a stuck call is not)."""
        if self.backend == "ray":
            return bool(self._served) and not self._dead()
        return bool(self._processes) and all(process.is_alive() for process in self._processes)

    def close(self) -> None:
        """Stop the workers (their models go with them)."""
        if self.backend == "ray":
            self._close_ray()
            return
        for jobs, process in zip(self._jobs, self._processes):
            if process.is_alive():
                jobs.put(None)
        deadline = time.monotonic() + 30  # one wait for all: a stuck worker does not hold up the others' kill
        for process in self._processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        for process in self._processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=10)

    def _close_ray(self) -> None:
        if not (self._actors or self._jobs):  # nothing was started (e.g. ray is not installed)
            return
        import ray

        if not ray.is_initialized():  # Ray already shut down (its own exit hook ran first): its actors went with it
            self._served, self._actors, self._jobs = [], [], []
            return
        if self._served:
            for jobs in self._jobs:
                jobs.put(None)
            ray.wait(self._served, num_returns=len(self._served), timeout=30)
        for actor in self._actors:
            ray.kill(actor)
        for q in [*self._jobs, *filter(None, [self._results, self._answers])]:
            q.shutdown()
        self._served, self._actors, self._jobs = [], [], []

    def __enter__(self) -> SamplerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
