"""What each rank of a multi-process test runs (spawned by ``distributed.run_ranks``; importable by name).

The run: the official fixture's tiny DiT (2 heads of 32, 2 blocks), a non-square latent (5 frames of 3 x 4 patch
tokens = 60 tokens, so 2, 3 and 4 ranks all cut a frame in the middle), audio on, a per-token audio scale map,
2 steps with audio guidance on the first only (3 passes, then 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

FIXTURE = Path(__file__).parent / "fixtures" / "official"
NUM_FRAMES = 17  # 5 latent frames
LATENT_HW = (6, 8)  # 3 x 4 patches per frame
TOKENS = 5 * 3 * 4


def load_model(dtype: torch.dtype = torch.float32, fp8_file: str | None = None):
    """The fixture's tiny DiT + adapter computing in ``dtype``; from ``fp8_file`` (the same DiT in ComfyUI's fp8
    scaled layout, :func:`write_fp8_dit`) its block weights stay fp8 in memory."""
    from fantasytalking_core.loaders.adapter import load_audio_adapter
    from fantasytalking_core.loaders.wan_dit import load_wan_dit
    from fantasytalking_core.parity import load_fixture_model

    if fp8_file is None:
        return load_fixture_model(FIXTURE, "dit.safetensors", "fantasytalking.ckpt", dtype=dtype)
    dit = load_wan_dit(fp8_file, config=FIXTURE / "dit" / "config.json", fp8_storage=True, compute_dtype=dtype)
    return load_audio_adapter(FIXTURE / "dit" / "fantasytalking.ckpt", dit, dtype=dtype)


def write_fp8_dit(folder: Path) -> str:
    """The fixture's DiT as a ComfyUI fp8 scaled file in ``folder``; its path."""
    from model_files import save_wan_file, to_fp8_scaled

    from fantasytalking_core.loaders.state_dict import open_checkpoint

    state = dict(open_checkpoint(FIXTURE / "dit" / "dit.safetensors").items())
    return str(save_wan_file(to_fp8_scaled(state), folder / "dit_fp8_scaled.safetensors"))


def run_inputs() -> dict:
    """Seeded inputs of :func:`sample`, the same in every process."""
    g = torch.Generator().manual_seed(7)
    return {
        "text_pos": torch.randn(1, 11, 32, generator=g), "text_neg": torch.randn(1, 23, 32, generator=g),
        "clip_tokens": torch.randn(1, 257, 1280, generator=g),
        "image_latents": torch.randn(1, 20, 5, *LATENT_HW, generator=g),
        "audio_features": torch.randn(36, 768, generator=g),
        "audio_scale": 0.5 + torch.rand(TOKENS, generator=g),  # [S] one strength per video token
    }


def sample(model, map_passes=None, batch_passes: bool = False, progress=None, steps: int = 2,
           step_cache: float = 0.0) -> torch.Tensor:
    """[1, 16, 5, 6, 8] float32 denoised latent of the run (2 steps: 3 passes at step 0, 2 at step 1)."""
    from fantasytalking_core.sampling.denoise import generate_latents
    from fantasytalking_core.sampling.guidance import GuidanceConfig
    from fantasytalking_core.sampling.schedule import flow_match_sigmas

    x = run_inputs()
    return generate_latents(model, x["text_pos"], x["text_neg"], x["clip_tokens"], x["image_latents"],
                            x["audio_features"], NUM_FRAMES, guidance=GuidanceConfig(4.5, 3.0, 0.0, 0.5),
                            sigmas=flow_match_sigmas(steps, 5.0), seed=3, audio_scale=x["audio_scale"],
                            batch_passes=batch_passes, map_passes=map_passes, progress=progress,
                            step_cache=step_cache)


def allow_cpu_context_parallel() -> None:
    """Test-only: diffusers' ``enable_parallelism`` picks the device as ``rank % accelerator count``, a division
    by zero on a CPU-only host; one 'accelerator' makes it pick cpu:0 (the gloo collectives run on the CPU)."""
    torch.accelerator.device_count = lambda: 1


def cpu_attention_with_lse(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                           enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """Test-only stand-in for diffusers' native forward op that also returns the log-sum-exp, which ring attention
    merges its blocks with (PyTorch's SDPA does not return it; flash, sage and cuDNN do). Math in float32.

    query, key, value: [B, S, H, D] (model layout). Returns out [B, S, H, D] and, asked for, lse [B, S, H]."""
    q, k, v = (x.permute(0, 2, 1, 3).float() for x in (query, key, value))  # [B, H, S, D]
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    lse = scores.logsumexp(-1)  # [B, H, S]
    out = ((scores - lse[..., None]).exp() @ v).permute(0, 2, 1, 3).to(query.dtype)
    return (out, lse.transpose(1, 2)) if return_lse else out


def allow_cpu_ring_attention() -> None:
    """Test-only: ring attention on the CPU through diffusers' native backend with :func:`cpu_attention_with_lse`
    as its forward op (looked up by name when the native backend builds its context-parallel call)."""
    from diffusers.models import attention_dispatch

    attention_dispatch._native_attention_forward_op = cpu_attention_with_lse


@dataclass(frozen=True)
class Case:
    """One parallel run: the layout, the compute dtype (bf16 runs the official float32-island forward), batched
    guidance passes, whether to strip the processors' parallel config (the unaware-processor negative case), and
    an fp8 scaled DiT file whose weights stay fp8 (None: the float32 fixture), a ``torch.compile`` backend
    for the blocks of the parallel run (None: eager; the reference stays eager), and whether the parallel run's
    blocks stream (diffusers' group offloading hooks beside the context-parallel ones; the reference stays
    resident), and a step-cache threshold with the steps to run (0: no cache, 2 steps; the reference runs the
    same)."""

    layout: str
    dtype: torch.dtype = torch.float32
    batch_passes: bool = False
    unaware: bool = False
    fp8_file: str | None = None
    compile: str | None = None
    streamed: bool = False
    step_cache: float = 0.0
    steps: int = 2


def count_skips(model, skips: list[bool]) -> None:
    """Append to ``skips``, at every DiT forward, whether the step cache skipped blocks 1..N-1."""
    def record(block, args):
        cache = block.block_cache  # (call, index, is_last) during a cached forward, else None
        skips.append(bool(cache and cache[0].skipped))

    model.transformer.blocks[1].register_forward_pre_hook(record)


def run_case(rank: int, world: int, case: Case, out: Path) -> None:
    """Sample under ``case`` and save this rank's latent and how many passes it computed (or the error an unaware
    processor raises); rank 0 also saves the single-process reference, computed here with the same threads."""
    from fantasytalking_core.model.adapter import TokenLayoutError, audio_processors
    from contextlib import nullcontext

    from fantasytalking_core.runtime.compile import compiled_blocks
    from fantasytalking_core.runtime.memory import bytes_on
    from fantasytalking_core.runtime.parallel import ParallelRun, parse_parallel
    from fantasytalking_core.runtime.placement import streamed_blocks

    allow_cpu_context_parallel()
    layout = parse_parallel(case.layout)
    if layout.ring > 1:
        allow_cpu_ring_attention()  # Ulysses keeps diffusers' native op: the single-process run's SDPA
    run = ParallelRun(layout, "cpu")
    model = load_model(case.dtype, case.fp8_file)
    buffers = sum(b.numel() * b.element_size() for b in model.transformer.buffers())  # not sharded (RoPE tables)
    whole = bytes_on(model.transformer, torch.device("cpu")) - buffers
    run.prepare(model.transformer)
    held = bytes_on(model.transformer, torch.device("cpu")) - buffers  # a sharded weight counts its local shard
    (out / f"rank{rank}.held").write_text(f"{held / whole:.4f}")  # the share of the DiT's weights this rank holds
    if case.unaware:
        for proc in audio_processors(model.transformer):
            proc._parallel_config = None  # as a processor diffusers' enable_parallelism skipped
        try:
            sample(model, run.map_passes, case.batch_passes)
        except TokenLayoutError as exc:
            (out / f"rank{rank}.err").write_text(str(exc))
        return
    calls, skips = [], []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))  # rows per DiT pass
    count_skips(model, skips)
    settings = {"steps": case.steps, "step_cache": case.step_cache}
    with (streamed_blocks(model, torch.device("cpu")) if case.streamed else nullcontext(),
          compiled_blocks(model.transformer, case.compile is not None, case.compile or "inductor")):
        torch.save(sample(model, run.map_passes, case.batch_passes, **settings), out / f"rank{rank}.pt")
    if case.compile is not None:
        from torch._dynamo.utils import counters

        (out / f"rank{rank}.graphs").write_text(str(counters["stats"]["unique_graphs"]))
    (out / f"rank{rank}.passes").write_text(str(sum(calls)))
    (out / f"rank{rank}.skips").write_text(str(sum(skips)))
    if rank == 0:
        reference, skips = load_model(case.dtype, case.fp8_file), []
        count_skips(reference, skips)
        torch.save(sample(reference, None, case.batch_passes, **settings), out / "reference.pt")
        (out / "reference.skips").write_text(str(sum(skips)))


def sample_in_pool(model, run, batch_passes: bool = False) -> torch.Tensor:
    """What a :class:`~fantasytalking_core.runtime.pool.SamplerPool` worker runs per call: :func:`sample` with
    the guidance passes shared over the pool."""
    return sample(model, run.map_passes, batch_passes)


def sample_in_pool_with_progress(model, run, progress=None) -> torch.Tensor:
    """:func:`sample_in_pool` reporting its steps through the pool's ``progress``."""
    return sample(model, run.map_passes, progress=progress)


def refuse_in_pool(model, run) -> None:
    """A call every worker refuses with a user-facing error, as a memory or layout check does."""
    from fantasytalking_core.errors import SettingsError

    raise SettingsError(f"refused on rank {run.rank}: not enough GPU memory for 4093 frames")


def check_fails_on_rank_1(model, run, error: Exception) -> str:
    """A check that fails on rank 1 alone with ``error`` (a refusal, as when its GPU alone lacks memory, or an
    error that is no refusal, as a driver call failing), agreed on by every rank before the first collective of
    the run, which rank 0 would otherwise wait in alone."""
    def check() -> str:
        if run.rank == 1:
            raise error
        return "resident"

    placement = run.agree(check)
    torch.distributed.all_reduce(torch.ones(1))  # a collective rank 1 would never join without the agreement
    return placement


def agree_on_rank(model, run) -> str:
    """A check that no rank refuses: its result, agreed."""
    return run.agree(lambda: f"fine on rank {run.rank}")


def ray_node_ids(model, run) -> list[str]:
    """The Ray node (machine) of every worker, in rank order (a Ray pool's workers are actors)."""
    import ray
    import torch.distributed as dist

    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return nodes


def worker_pid(model, run) -> int:
    """The process id of the worker that runs it (the pool returns rank 0's)."""
    import os

    return os.getpid()


def fail_on_rank_1(model, run) -> None:
    """Rank 1 fails at once; rank 0 meanwhile waits in a collective for it, as a rank does mid-step."""
    import torch.distributed as dist

    if run.rank == 1:
        raise RuntimeError("rank 1 broke")
    dist.all_reduce(torch.ones(1))


def dying_load():
    """A model loader whose process dies without a word (as a worker that cannot even import the engine does)."""
    import os

    os._exit(3)


def failing_load():
    """A model loader that fails (a missing file), for the pool's error path."""
    raise FileNotFoundError("no DiT at /nowhere/dit.safetensors")
