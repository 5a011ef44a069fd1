"""Runs over several processes (one per GPU): guidance passes on different ranks, and sequence parallelism of the
video tokens through diffusers' context parallelism (Ulysses, ring), on one device mesh.

The layout is written ``cfg=N,ring=R,ulysses=U[,fsdp]`` (``--parallel``); the world size is N x R x U. The mesh has three
axes, ``("cfg", "ring", "ulysses")``: ranks that share a ``cfg`` coordinate form one sequence group and compute the
same guidance passes, each on its slice of the video tokens (diffusers' plan splits them before block 0 and
gathers them at the output); the N sequence groups compute different passes of a step, which are all-gathered
before the guidance combine (:meth:`ParallelRun.map_passes`). Every rank then holds the same guided velocity and
makes the same Euler step, so all ranks stay in lockstep without further communication.

With ``fsdp`` the DiT's weights are also sharded over each sequence group (FSDP2), for GPUs that cannot hold the
whole model.

The process group is the caller's (``torchrun`` sets it up: :func:`init_process_group_from_env`; in a long-lived
host, ``runtime/pool.py`` starts the workers); this module builds the mesh on it and never starts processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..errors import FantasyTalkingError, SettingsError, reworded

PARALLEL_AXES = ("cfg", "ring", "ulysses")
# attention kernels (runtime/attention.py names) that return the log-sum-exp ring attention merges blocks with
RING_ATTENTION = ("flash", "sage")
SPLIT_ATTENTION = ("sdpa", "flash", "sage")
"""The attention kernels (``runtime/attention.py`` names) diffusers can split over ring or ulysses ranks; with any
other (xformers) it runs each rank's attention over that rank's own tokens alone, without a word."""

Pass = tuple[str, bool]  # (prompt, audio on), as sampling.guidance names a DiT pass
PassRunner = Callable[[tuple[Pass, ...]], list[torch.Tensor]]
T = TypeVar("T")

# how a refusal names the options it is about: the command line's flags, or the sampler node's inputs
CLI_NAMES = {"parallel": "--parallel", "attention": "--attention", "offload": "--offload-blocks",
             "batch_passes_off": "leave out --batch-passes", "step_cache_off": "--step-cache 0",
             "image_size": "--image-size"}
NODE_NAMES = {"parallel": "parallel", "attention": "attention", "offload": "offload_blocks",
              "batch_passes_off": "batch_passes off", "step_cache_off": "step_cache 0",
              "image_size": "Identity Encode's image_size"}


@dataclass(frozen=True)
class ParallelLayout:
    """How a run is spread over processes.

    Attributes:
        cfg: sequence groups that compute different guidance passes of a step (at most the passes per step: 3).
        ring: ranks of ring attention in each sequence group (needs an attention backend that returns the
            log-sum-exp: flash or sage; not PyTorch's native SDPA).
        ulysses: ranks of Ulysses attention in each sequence group (must divide the head count, 40 for the 14B).
        fsdp: shard the DiT's weights over each sequence group (FSDP2 ``fully_shard``: every block's weights are
            gathered just before it runs and freed after), for GPUs that cannot hold the whole model.
    """

    cfg: int = 1
    ring: int = 1
    ulysses: int = 1
    fsdp: bool = False

    def __post_init__(self) -> None:
        for axis in PARALLEL_AXES:
            if getattr(self, axis) < 1:
                raise SettingsError(f"parallel {axis} must be at least 1, got {getattr(self, axis)}.")

    @property
    def world_size(self) -> int:
        """Processes the layout needs: cfg x ring x ulysses."""
        return self.cfg * self.ring * self.ulysses

    @property
    def sequence(self) -> int:
        """Ranks that share one pass's video tokens: ring x ulysses."""
        return self.ring * self.ulysses

    def __str__(self) -> str:
        return ",".join([f"{axis}={getattr(self, axis)}" for axis in PARALLEL_AXES] + ["fsdp"] * self.fsdp)


def parse_parallel(text: str, names: Mapping[str, str] = CLI_NAMES) -> ParallelLayout:
    """``"cfg=3,ulysses=2"`` (or with ``,fsdp``) -> :class:`ParallelLayout` (axes left out are 1). One clear line
    on bad input, naming the option as ``names`` spell it (:data:`CLI_NAMES` or :data:`NODE_NAMES`)."""
    option = names["parallel"]
    sizes: dict[str, int] = {}
    fsdp = False
    for item in filter(None, (part.strip() for part in text.split(","))):
        if item == "fsdp":
            fsdp = True
            continue
        axis, _, value = item.partition("=")
        axis = axis.strip()
        if axis not in PARALLEL_AXES:
            raise SettingsError(f"{option} {text!r}: unknown axis {axis!r}; write e.g. cfg=3,ulysses=2 with axes "
                                f"{', '.join(PARALLEL_AXES)}.")
        if axis in sizes:
            raise SettingsError(f"{option} {text!r}: {axis} is given twice.")
        try:
            sizes[axis] = int(value)
        except ValueError:
            raise SettingsError(f"{option} {text!r}: {axis} needs a whole number of processes, got "
                                f"{value.strip()!r}.") from None
    if not sizes:
        raise SettingsError(f"{option} {text!r}: give at least one axis, e.g. cfg=3 or cfg=3,ulysses=2.")
    return ParallelLayout(**sizes, fsdp=fsdp)


def check_tokens_split(layout: ParallelLayout, num_frames: int, height: int, width: int,
                       names: Mapping[str, str] = CLI_NAMES) -> None:
    """Refuse, before any model loads, a clip whose video tokens the ring x ulysses ranks cannot split into equal
    shards (diffusers' context parallelism needs them equal; the DiT would refuse it only at its first forward,
    after every rank had loaded the model). ``num_frames``: frames of the longest segment; ``height`` x ``width``:
    the frames' pixels."""
    from .memory import video_tokens

    ranks = layout.sequence
    tokens = video_tokens(num_frames, height, width)
    if ranks > 1 and tokens % ranks:
        per_frame = (height // 16) * (width // 16)
        side = next(n for n in range(32, 32 * ranks + 1) if n * n % ranks == 0)  # a square from 512 px up
        raise SettingsError(
            f"{names['parallel']} {layout}: {num_frames} frames at {width}x{height} are {tokens} video tokens, "
            f"which the {ranks} ring x ulysses ranks cannot split evenly ({per_frame} per latent frame). A frame "
            f"whose (height / 16) x (width / 16) patches they divide splits any frame count (e.g. {names['image_size']} "
            f"{16 * side} on a square portrait: {side} x {side}), or use other degrees.")


def check_layout(layout: ParallelLayout, world_size: int, max_passes: int, num_heads: int | None = None,
                 attention: str | None = None, names: Mapping[str, str] = CLI_NAMES) -> None:
    """Refuse a layout this run cannot use, before any model loads.

    Args:
        world_size: processes started (torchrun's ``--nproc-per-node`` x nodes).
        max_passes: most DiT passes any step of the run needs (3; 2 when cfg is 1; see ``sampling.guidance``).
        num_heads: the DiT's attention heads, which Ulysses splits (None: not checked yet).
        attention: the attention kernel (``runtime/attention.py`` name); ring needs one of :data:`RING_ATTENTION`
            (None: not checked).
        names: how the message spells the options (:data:`CLI_NAMES` or :data:`NODE_NAMES`).
    """
    option = names["parallel"]
    if layout.world_size != world_size:
        raise SettingsError(f"{option} {layout} needs {layout.world_size} processes (cfg x ring x ulysses); "
                            f"{world_size} were started: launch with torchrun --nproc-per-node {layout.world_size}.")
    if layout.cfg > max_passes:
        raise SettingsError(f"{option} cfg={layout.cfg}: a step of this run has at most {max_passes} guidance "
                            f"passes to spread, so cfg can be at most {max_passes}.")
    if layout.fsdp and layout.sequence == 1:
        raise SettingsError(f"{option} {layout}: fsdp shards the weights over the ring x ulysses ranks of a "
                            "sequence group; with one rank per group add ring or ulysses, or leave fsdp out.")
    if layout.ring > 1 and attention is not None and attention not in RING_ATTENTION:
        raise SettingsError(f"{option} ring={layout.ring}: ring attention merges blocks by their log-sum-exp, "
                            f"which attention {attention!r} does not return; use {names['attention']} "
                            f"{' or '.join(RING_ATTENTION)}, or ulysses instead of ring.")
    if layout.sequence > 1 and attention is not None and attention not in SPLIT_ATTENTION:
        raise SettingsError(f"{option} {layout}: ring and ulysses split each attention over the ranks, which "
                            f"attention {attention!r} cannot do (each rank would attend to its own share of the "
                            f"video only); use {names['attention']} {' or '.join(SPLIT_ATTENTION)}.")
    if num_heads is not None and num_heads % layout.ulysses:
        raise SettingsError(f"{option} ulysses={layout.ulysses}: Ulysses splits the {num_heads} attention heads, "
                            f"so it must divide {num_heads}.")


def check_loras_fit_layout(layout: ParallelLayout, has_loras: bool, names: Mapping[str, str] = CLI_NAMES) -> None:
    """Refuse LoRAs with ``fsdp``: LoRAs are applied where the DiT is placed for a run
    (``runtime.placement.dit_on_device``), which weights sharded over GPUs never pass through, so they would be
    dropped without a word. ``names`` as in :func:`check_layout`."""
    if layout.fsdp and has_loras:
        raise SettingsError(f"{names['parallel']} {layout}: LoRAs are not applied to weights sharded over GPUs; "
                            "leave out fsdp or the LoRAs.")


def check_offload_fits_layout(layout: ParallelLayout, offload_blocks: bool, names: Mapping[str, str] = CLI_NAMES
                              ) -> None:
    """Refuse streaming the DiT's blocks with ``fsdp``, whose weights stay sharded on the GPUs (each block is
    gathered there just before it runs). ``names`` as in :func:`check_layout`."""
    if layout.fsdp and offload_blocks:
        raise SettingsError(f"{names['parallel']} {layout}: fsdp already splits the weights over the GPUs, so the "
                            f"blocks do not also stream; turn off {names['offload']}, or leave out fsdp.")


def process_group_backend(device_type: str) -> str:
    """The torch.distributed backend of processes computing on ``device_type``: NCCL for CUDA, gloo for the CPU;
    a SettingsError when this PyTorch build lacks it (PyTorch ships NCCL on Linux only, not on Windows or macOS)."""
    if not dist.is_available():
        raise SettingsError("Several processes need torch.distributed, which this PyTorch build lacks; install the "
                            "PyTorch build for Linux or Windows from pytorch.org, or run in one process.")
    if device_type == "cuda" and not dist.is_nccl_available():
        raise SettingsError("Several GPUs need NCCL, which this PyTorch build lacks (PyTorch has it on Linux only): "
                            "run on Linux (on Windows: in WSL2), or on one GPU without a parallel layout.")
    return "nccl" if device_type == "cuda" else "gloo"


def init_process_group_from_env(device_type: str, timeout_s: float = 1800) -> None:
    """Join the process group ``torchrun`` describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...):
    NCCL for CUDA, gloo for the CPU. A no-op when the group exists already."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SettingsError("--parallel needs processes started by torchrun, e.g. torchrun --nproc-per-node 3 -m "
                            "fantasytalking_core generate ... --parallel cfg=3.")
    dist.init_process_group(process_group_backend(device_type), timeout=timedelta(seconds=timeout_s))


class ParallelRun:
    """This process's place in a parallel run: the mesh, its guidance share, sequence parallelism of the DiT.

    Args:
        layout: the cfg x ring x ulysses layout; the world size of the (initialised) process group must match.
        device_type: ``"cuda"`` or ``"cpu"``, the device type the mesh's collectives run on.
    """

    def __init__(self, layout: ParallelLayout, device_type: str):
        if not dist.is_initialized():
            raise SettingsError("a parallel run needs an initialised torch.distributed process group "
                                "(init_process_group_from_env under torchrun).")
        if layout.world_size != dist.get_world_size():
            raise SettingsError(f"--parallel {layout} needs {layout.world_size} processes; {dist.get_world_size()} "
                                f"were started: launch with torchrun --nproc-per-node {layout.world_size}.")
        from torch.distributed.device_mesh import init_device_mesh

        self.layout = layout
        self.mesh = init_device_mesh(device_type, (layout.cfg, layout.ring, layout.ulysses),
                                     mesh_dim_names=PARALLEL_AXES)
        self.rank = dist.get_rank()
        self.cfg_rank = self.mesh.get_local_rank("cfg")
        self._cfg_group = self.mesh.get_group("cfg") if layout.cfg > 1 else None

    @property
    def device(self) -> torch.device:
        """This process's compute device: its current GPU, or the CPU (gloo)."""
        if self.mesh.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on global rank 0: the one process that writes the video and prints progress."""
        return self.rank == 0

    def agree(self, check: Callable[[], T]) -> T:
        """``check()`` on every rank, and the same outcome on all: its result where no rank failed, else on every
        rank the failure of the first rank that failed. A refusal (a :class:`~..errors.FantasyTalkingError`) is
        raised as that refusal, named by its rank when the ranks did not all refuse alike; any other error is
        raised as itself on its rank and as a RuntimeError naming it on the others. For checks whose answer can
        differ between ranks (each rank's GPU memory): one that failed alone would leave the others waiting in
        the run's first collective.
        """
        result, failure, own = None, None, None
        try:
            result = check()
        except Exception as exc:  # noqa: BLE001 - shared with the other ranks, then raised here too
            own = exc
            refusal = isinstance(exc, FantasyTalkingError)  # our classes cross processes; others go by name
            failure = (type(exc) if refusal else type(exc).__name__, str(exc), refusal)
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, failure)
        found = [(rank, f) for rank, f in enumerate(failures) if f is not None]
        if not found:
            return result
        rank, (kind, message, refusal) = found[0]
        if not refusal:
            if rank == self.rank:
                raise own
            raise RuntimeError(f"rank {rank} failed: {kind}: {message}")
        alike = len(found) == len(failures) and all(f == found[0][1] for _, f in found)
        raise reworded(kind, message if alike else f"rank {rank}: {message}")

    def group_of(self, p: Pass, run_passes: Sequence[Pass]) -> int:
        """The sequence group that computes pass ``p`` in every step: the j-th of ``run_passes`` (every pass of the
        run, ``sampling.guidance.passes_in_run``) goes to group j mod cfg. Fixed over the run, so a step cache keeps
        each pass's residuals on the rank that computes it, as one process would."""
        return list(run_passes).index(p) % self.layout.cfg

    def map_passes(self, passes: tuple[Pass, ...], evaluate: PassRunner, like: torch.Tensor,
                   run_passes: tuple[Pass, ...]) -> list[torch.Tensor]:
        """Every pass of a step, each computed by one sequence group and all-gathered over the cfg axis.

        Args:
            passes: the step's passes in order (``sampling.guidance.passes_for_step``).
            evaluate: computes the velocities of a tuple of passes, a list of [C, T, h, w] float32 tensors.
            like: [C, T, h, w] float32, the shape, dtype and device of one pass's velocity (a group with no pass
                this step still takes part in the gather).
            run_passes: every pass of the run (:meth:`group_of`).
        Returns:
            the velocities of ``passes`` in their order, the same on every rank.
        """
        groups = [[p for p in passes if self.group_of(p, run_passes) == g] for g in range(self.layout.cfg)]
        mine = tuple(groups[self.cfg_rank])
        outs = evaluate(mine) if mine else []
        if self._cfg_group is None:
            return outs
        slots = max(len(group) for group in groups)  # the most passes a group computes this step
        stacked = torch.zeros((slots, *like.shape), dtype=like.dtype, device=like.device)  # [k, C, T, h, w]
        for slot, out in enumerate(outs):
            stacked[slot] = out
        gathered = [torch.empty_like(stacked) for _ in range(self.layout.cfg)]
        dist.all_gather(gathered, stacked, group=self._cfg_group)
        where = {p: (g, slot) for g, group in enumerate(groups) for slot, p in enumerate(group)}
        return [gathered[where[p][0]][where[p][1]] for p in passes]

    def prepare(self, transformer: nn.Module) -> None:
        """Make a loaded DiT (``WanTransformer3DModel``) run this layout: the video tokens split over the sequence
        group (:meth:`enable_sequence_parallel`) and, with ``fsdp``, its weights sharded over it
        (:meth:`shard_weights`). Call once, before the first forward."""
        self.enable_sequence_parallel(transformer)
        if self.layout.fsdp:
            self.shard_weights(transformer)

    @property
    def weights_sharded(self) -> bool:
        """True when the DiT's weights are split over the sequence group: they then stay on their device."""
        return self.layout.fsdp

    def shard_weights(self, transformer: nn.Module) -> None:
        """FSDP2 over the sequence group: ``fully_shard`` each block, then the model (embeddings and head).

        Each rank keeps 1/(ring x ulysses) of every weight on its device; a block's weights are all-gathered just
        before it runs and freed after it, so one block at a time is whole. The float32-island forward reads
        weights only inside the module whose forward is running (blocks in their forward, the embeddings and
        head in the model's), where FSDP has gathered them. The weights then stay on the device (no offloading).
        """
        from torch.distributed.fsdp import fully_shard

        check_layout(self.layout, dist.get_world_size(), self.layout.cfg)
        mesh = self.mesh["ring", "ulysses"]._flatten("fsdp")  # 1-D: the sequence group's ranks
        for block in transformer.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(transformer, mesh=mesh)

    def enable_sequence_parallel(self, transformer: nn.Module) -> None:
        """Split the video tokens of every DiT pass over this rank's ring x ulysses group (diffusers'
        ``enable_parallelism`` with the model's context-parallel plan); a no-op when ring x ulysses is 1.

        diffusers picks each rank's device as ``rank % accelerator count``, so this needs an accelerator per
        process; on a CPU-only host only ``cfg`` parallelism runs.
        """
        if self.layout.sequence == 1:
            return
        from diffusers import ContextParallelConfig

        check_layout(self.layout, dist.get_world_size(), self.layout.cfg, transformer.config.num_attention_heads)
        if torch.accelerator.device_count() == 0:
            raise SettingsError(f"--parallel {self.layout}: ring/ulysses need one accelerator (GPU) per process; "
                                "on a CPU-only host use cfg=N alone.")
        config = ContextParallelConfig(ring_degree=self.layout.ring, ulysses_degree=self.layout.ulysses,
                                       mesh=self.mesh["ring", "ulysses"])
        transformer.enable_parallelism(config=config)
