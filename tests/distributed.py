"""Helpers for the multi-process tests: start N gloo ranks on localhost and run one case in each.

``run_ranks`` spawns fresh interpreters (torch.multiprocessing, spawn), each joining a gloo process group on a free
port; a rank that fails or hangs fails the test with its traceback, and a deadline bounds the whole run.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn: Callable, args: tuple, errors: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # the ranks share the host's cores; one thread each keeps them from thrashing
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
        fn(rank, world, *args)
        # every rank's collectives finish before any rank tears the group down: under load a rank once died in
        # C++ ("terminate called without an active exception") after its work, while the other was still in it
        dist.barrier()
    except BaseException:
        (errors / f"rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, *args, timeout: float = 300) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes in one gloo group; raise with the first
    failing rank's traceback, or when the run outlasts ``timeout`` seconds (every rank is then killed)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        errors = Path(tmp)
        context = mp.start_processes(_rank_main, args=(world, free_port(), fn, args, errors), nprocs=world,
                                     join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=1):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world} ranks did not finish within {timeout:g} s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            reports = sorted(errors.glob("rank*.txt"))
            raise AssertionError("\n".join(r.read_text() for r in reports) or "a rank failed") from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
