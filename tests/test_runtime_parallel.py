"""Parallel runs on CPU (gloo ranks on localhost) against the single-process sampler, and the layout rules."""

from __future__ import annotations

import pytest
import torch
from distributed import run_ranks
from parallel_cases import Case, run_case

from fantasytalking_core.errors import SettingsError
from fantasytalking_core.runtime.parallel import ParallelLayout, check_layout, parse_parallel


def test_layout_parses_axes_and_defaults_the_rest_to_one():
    assert parse_parallel("cfg=3,ulysses=2") == ParallelLayout(cfg=3, ulysses=2)
    assert parse_parallel(" ring=2 , cfg=2 ").world_size == 4 and parse_parallel("ring=2,ulysses=4").sequence == 8
    assert str(parse_parallel("ulysses=2,cfg=3")) == "cfg=3,ring=1,ulysses=2"
    assert parse_parallel("ulysses=2,fsdp") == ParallelLayout(ulysses=2, fsdp=True)
    assert str(parse_parallel("fsdp,ring=2")) == "cfg=1,ring=2,ulysses=1,fsdp"


@pytest.mark.parametrize("text, message", [
    ("tp=2", "unknown axis 'tp'"),
    ("cfg=two", "cfg needs a whole number of processes, got 'two'"),
    ("cfg=2,cfg=3", "cfg is given twice"),
    ("cfg=0", "parallel cfg must be at least 1, got 0"),
    ("", "give at least one axis"),
])
def test_bad_layouts_are_one_clear_line(text, message):
    with pytest.raises(SettingsError, match=message) as info:
        parse_parallel(text)
    assert "\n" not in str(info.value)


def test_layouts_that_do_not_fit_the_run_are_refused():
    check_layout(ParallelLayout(cfg=3, ulysses=2), 6, 3, 40)
    with pytest.raises(SettingsError, match="needs 6 processes .* 4 were started: launch with torchrun "
                                            "--nproc-per-node 6"):
        check_layout(ParallelLayout(cfg=3, ulysses=2), 4, 3, 40)
    with pytest.raises(SettingsError, match="cfg=4: a step of this run has at most 3 guidance passes"):
        check_layout(ParallelLayout(cfg=4), 4, 3)
    with pytest.raises(SettingsError, match="at most 2 guidance passes"):  # cfg 1: no negative pass
        check_layout(ParallelLayout(cfg=3), 3, 2)
    with pytest.raises(SettingsError, match="ulysses=3: Ulysses splits the 40 attention heads"):
        check_layout(ParallelLayout(ulysses=3), 3, 3, 40)
    with pytest.raises(SettingsError, match="ring=2: ring attention merges blocks by their log-sum-exp, which "
                                            "attention 'sdpa' does not return; use --attention flash or sage"):
        check_layout(ParallelLayout(ring=2), 2, 3, 40, "sdpa")
    check_layout(ParallelLayout(ring=2), 2, 3, 40, "flash")
    # diffusers would attend over each rank's own tokens, without a word; ring needs flash or sage in any case
    with pytest.raises(SettingsError, match="ulysses=2.*attention 'xformers' cannot do .* use --attention "
                                            "sdpa or flash or sage"):
        check_layout(parse_parallel("ulysses=2"), 2, 3, 40, "xformers")
    with pytest.raises(SettingsError, match="ring=2: .*attention 'xformers' does not return; use --attention flash "
                                            "or sage"):
        check_layout(parse_parallel("ring=2"), 2, 3, 40, "xformers")
    check_layout(ParallelLayout(cfg=2), 2, 3, 40, "xformers")  # whole passes per rank: any kernel


def test_the_command_line_checks_ulysses_against_the_models_heads_before_loading(tmp_path):
    # the head count was once checked only after every rank had loaded the DiT (minutes, 33 GB each)
    from pathlib import Path
    from types import SimpleNamespace

    from fantasytalking_core.cli import _check_layout_fits_model
    from fantasytalking_core.settings import GenerationSettings

    (tmp_path / "wan2.1_i2v_720p_14B_bf16.safetensors").write_bytes(b"")  # never read: the bundled 14B config
    files = SimpleNamespace(dit=tmp_path / "wan2.1_i2v_720p_14B_bf16.safetensors", configs={})
    _check_layout_fits_model(parse_parallel("cfg=3,ulysses=4"), files, GenerationSettings())
    with pytest.raises(SettingsError, match="ulysses=3: Ulysses splits the 40 attention heads"):
        _check_layout_fits_model(parse_parallel("ulysses=3"), files, GenerationSettings())
    fixture = Path(__file__).parent / "fixtures" / "official" / "dit"
    tiny = SimpleNamespace(dit=fixture / "dit.safetensors", configs={"dit": fixture / "config.json"})
    with pytest.raises(SettingsError, match="ulysses=4: Ulysses splits the 2 attention heads"):
        _check_layout_fits_model(parse_parallel("ulysses=4"), tiny, GenerationSettings())


def test_the_kernels_offered_under_ring_and_ulysses_are_those_diffusers_can_split():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from fantasytalking_core.runtime.attention import ATTENTION_BACKENDS
    from fantasytalking_core.runtime.parallel import RING_ATTENTION, SPLIT_ATTENTION

    splittable = {name for name, (backend, _) in ATTENTION_BACKENDS.items()
                  if backend in _AttentionBackendRegistry._supports_context_parallel}
    assert set(SPLIT_ATTENTION) == splittable and set(RING_ATTENTION) < splittable
    with pytest.raises(SettingsError, match="fsdp shards the weights over the ring x ulysses ranks"):
        check_layout(ParallelLayout(cfg=2, fsdp=True), 2, 3)


def run_layout(tmp_path, world: int, case: Case, timeout: float = 600
               ) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    """The single-process reference, every rank's result of ``case`` on ``world`` gloo ranks, and the passes
    (batch rows through the DiT) each rank computed."""
    run_ranks(run_case, world, case, tmp_path, timeout=timeout)
    ranks = range(world)
    return (torch.load(tmp_path / "reference.pt"), [torch.load(tmp_path / f"rank{r}.pt") for r in ranks],
            [int((tmp_path / f"rank{r}.passes").read_text()) for r in ranks])


@pytest.mark.parametrize("world", [2, 3])
def test_guidance_passes_on_different_ranks_equal_one_process(tmp_path, world):
    """cfg=2 (positive and positive+audio on one rank, negative on the other) and cfg=3 (one pass each; at the
    2-pass step one rank idles): every rank holds exactly the single-process latent."""
    reference, ranks, passes = run_layout(tmp_path, world, Case(f"cfg={world}"))
    assert reference.abs().max() > 0.1
    for latent in ranks:
        assert torch.equal(latent, reference)
    # 3 passes then 2, round robin: each rank computed only its share
    assert passes == {2: [3, 2], 3: [2, 2, 1]}[world]


def test_a_rank_batches_its_own_share_of_the_passes(tmp_path):
    reference, ranks, passes = run_layout(tmp_path, 2, Case("cfg=2", batch_passes=True))
    for latent in ranks:
        torch.testing.assert_close(latent, reference, rtol=0, atol=1e-5)  # batches of 2 and 1 against one of 3
    assert passes == [3, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-diffusers-forward", "bf16-official"])
def test_ulysses_over_two_ranks_equals_one_process(tmp_path, dtype):
    """The video tokens split over 2 ranks (30 each: the seam cuts latent frame 2 in half), audio on with a
    per-token scale map: diffusers' forward (float32) and our float32-island forward (bf16, whose head gathers
    through the plan's hook) both give the single-process latent."""
    reference, ranks, passes = run_layout(tmp_path, 2, Case("ulysses=2", dtype=dtype))
    for latent in ranks:
        torch.testing.assert_close(latent, reference, rtol=0, atol=1e-5)
    assert passes == [5, 5]  # both ranks run every pass, each on half of the tokens


@pytest.mark.parametrize("layout", ["ulysses=2", "ring=2", "cfg=2"])
def test_the_step_cache_decides_alike_on_every_rank_of_a_split_pass(tmp_path, layout):
    # ulysses/ring: each rank once decided from its own half of the tokens: one skipped the blocks, the other ran
    # them and waited in their all-to-alls for ever. Summed over the ranks, the change is one process's: the same
    # forwards skip (8 steps, 3 may skip; at 0.4 the tiny model's changes lie at least 0.01 from it).
    # cfg: when audio guidance ended the positive+audio pass moved to another rank, whose cache had no residual
    # for it (computed in full where one process skipped): each pass now stays on one rank
    reference, ranks, _ = run_layout(tmp_path, 2, Case(layout, step_cache=0.4, steps=8), timeout=240)  # ~15 s
    skips = [int((tmp_path / f"{name}.skips").read_text()) for name in ("reference", "rank0", "rank1")]
    split_passes = layout.startswith("cfg")  # each rank runs its own passes: their skips add up to one process's
    assert skips[0] > 0 and (skips[1] + skips[2] if split_passes else skips[1:]) == (skips[0] if split_passes
                                                                                      else [skips[0]] * 2)
    for latent in ranks:
        assert (latent - reference).abs().max() <= 1e-5


def test_streamed_blocks_under_ulysses_equal_one_process(tmp_path):
    """Each rank streaming its blocks (diffusers' group offloading hooks, as a pool worker with offload_blocks
    does) while the context-parallel hooks split and gather the tokens: the single-process resident latent."""
    reference, ranks, passes = run_layout(tmp_path, 2, Case("ulysses=2", streamed=True))
    for latent in ranks:
        torch.testing.assert_close(latent, reference, rtol=0, atol=1e-5)
    assert passes == [5, 5]


@pytest.mark.parametrize("world", [2, 3])
def test_ring_attention_over_two_and_three_ranks_equals_one_process(tmp_path, world):
    """Ring attention (with a test-only CPU op that returns the log-sum-exp) over 2 ranks (30 tokens each, seam in
    frame 2) and 3 (20 each, seams in frames 1 and 3): the single-process latent within 1e-5."""
    reference, ranks, passes = run_layout(tmp_path, world, Case(f"ring={world}"))
    for latent in ranks:
        torch.testing.assert_close(latent, reference, rtol=0, atol=1e-5)
    assert passes == [5] * world


def test_ring_attention_with_batched_passes_equals_one_process(tmp_path):
    """ring=2 with the passes batched (each rank runs the 3 passes of its tokens as one batch of 3; the step with
    2 passes, a batch of 2). Combinations with cfg on one mesh: the 4-rank tests below."""
    reference, ranks, passes = run_layout(tmp_path, 2, Case("ring=2", batch_passes=True))
    for latent in ranks:
        torch.testing.assert_close(latent, reference, rtol=0, atol=1e-5)
    assert passes == [5, 5]


@pytest.mark.parametrize("layout, dtype", [("ulysses=2,fsdp", torch.bfloat16), ("ring=2,fsdp", torch.float32)])
def test_weights_sharded_over_the_sequence_group_equal_one_process(tmp_path, layout, dtype):
    """FSDP2 over the 2 ranks of the sequence group: bf16 under the official float32-island forward (which reads
    block and head weights inside their modules' forwards, where FSDP gathers them), and float32 (diffusers'
    forward; ring's float32 test op would not round like the bf16 reference). Each rank holds half of the DiT's
    weights and the latent equals the single-process one."""
    reference, ranks, _ = run_layout(tmp_path, 2, Case(layout, dtype=dtype))
    for latent in ranks:
        torch.testing.assert_close(latent, reference, rtol=0, atol=1e-5)
    held = [float((tmp_path / f"rank{r}.held").read_text()) for r in range(2)]
    assert all(0.49 < share < 0.51 for share in held), held


def test_a_processor_unaware_of_the_split_raises_instead_of_regrouping(tmp_path):
    """diffusers' enable_parallelism skips a processor without _parallel_config: its audio branch then sees 30
    of 60 tokens, which would split evenly into 5 wrong 'frames' of 6; it must raise instead."""
    run_ranks(run_case, 2, Case("ulysses=2", unaware=True), tmp_path, timeout=600)
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.err").read_text()
        assert message.startswith("30 video tokens are not 5 latent frames x 12 tokens per frame")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["cfg=2,ring=2", "ring=2,ulysses=2", "cfg=2,ulysses=2,fsdp"])
def test_four_rank_meshes_equal_one_process(tmp_path, layout):
    """cfg x ring, ring x ulysses and cfg x ulysses (its weights sharded by FSDP2 over each Ulysses pair) on 4
    ranks: each sequence group splits the tokens of its passes (15 tokens each with ring x ulysses, seams inside
    frames 1 and 3), the cfg groups' passes are gathered."""
    reference, ranks, passes = run_layout(tmp_path, 4, Case(layout))
    for latent in ranks:
        torch.testing.assert_close(latent, reference, rtol=0, atol=1e-5)
    # ranks 0, 1 share cfg group 0 (mesh order cfg, ring, ulysses): 2 + 1 passes, the other group 1 + 1
    assert passes == ([3, 3, 2, 2] if layout.startswith("cfg") else [5] * 4)


@pytest.mark.parametrize("layout", ["cfg=2", "ulysses=2", "ulysses=2,fsdp"])
def test_fp8_weights_under_each_parallel_layout_equal_one_process(tmp_path, layout):
    """Weights kept as fp8 (ComfyUI's fp8 scaled file, upcast per layer to bf16 here, as on GPUs without fp8
    matmuls): guidance passes over ranks, the tokens split, and the fp8 weights themselves sharded by FSDP2 give
    the single-process latent of the same fp8 model."""
    from parallel_cases import write_fp8_dit

    fp8_file = write_fp8_dit(tmp_path)
    reference, ranks, _ = run_layout(tmp_path, 2, Case(layout, dtype=torch.bfloat16, fp8_file=fp8_file))
    assert reference.abs().max() > 0.1
    for latent in ranks:
        torch.testing.assert_close(latent, reference, rtol=0, atol=1e-5)
    if "fsdp" in layout:  # each rank holds half of the (fp8) weights
        held = [float((tmp_path / f"rank{r}.held").read_text()) for r in range(2)]
        assert all(0.49 < share < 0.51 for share in held), held


def test_compiled_blocks_under_ulysses_equal_one_eager_process(tmp_path, monkeypatch):
    """torch.compile (inductor) of the blocks in both ranks with the tokens split by Ulysses (its all-to-alls
    inside the compiled blocks; a cfg split compiles exactly as one process does): the single-process eager
    latent, within the fixtures' float32 parity bound (fused kernels reorder float32 reductions)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # see test_runtime_compile.py
    reference, ranks, _ = run_layout(tmp_path, 2, Case("ulysses=2", compile="inductor"))
    for latent in ranks:
        assert (latent - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert all(int((tmp_path / f"rank{r}.graphs").read_text()) > 0 for r in range(2))  # the blocks were compiled


def test_a_clip_splits_over_the_sequence_ranks_when_its_token_count_divides():
    from fantasytalking_core.runtime.parallel import NODE_NAMES, check_tokens_split

    check_tokens_split(ParallelLayout(ulysses=4), 81, 512, 512)  # 32 x 32 patches a frame: any frame count
    check_tokens_split(ParallelLayout(ring=2), 81, 720, 1280)  # 45 x 80
    check_tokens_split(ParallelLayout(cfg=3), 81, 720, 720)  # nothing splits the tokens
    check_tokens_split(ParallelLayout(ulysses=2), 85, 720, 720)  # 22 latent frames x 2025: even
    with pytest.raises(SettingsError, match=r"^--parallel cfg=1,ring=2,ulysses=2: 81 frames at 720x720 are 42525 "):
        check_tokens_split(ParallelLayout(ring=2, ulysses=2), 81, 720, 720)
    with pytest.raises(SettingsError, match=r"^parallel cfg=1,ring=1,ulysses=4: .* \(3510 per latent frame\)\. .*"
                                            r"\(e\.g\. Identity Encode's image_size 512 on a square portrait: 32 x 32\)"):
        check_tokens_split(ParallelLayout(ulysses=4), 81, 720, 1248, NODE_NAMES)  # 45 x 78 = 3510 a frame, 21 frames
    # 5 ranks (the 40 heads allow it) cannot split 512x512's 1024 a frame: the example is one they can
    with pytest.raises(SettingsError, match=r"21504 video tokens.* \(e\.g\. --image-size 560 on a square portrait: "
                                            r"35 x 35\)"):
        check_tokens_split(ParallelLayout(ulysses=5), 81, 512, 512)
