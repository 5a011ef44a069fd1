"""The official reduced-precision policy of Wan2.1 / FantasyTalking, for diffusers' ``WanTransformer3DModel``.

The official GPU run (Fantasy-AMAP/fantasy-talking, ``diffsynth/models/wan_video_dit.py``) stores the DiT in bf16
and denoises under bf16 autocast, but keeps *float32 islands*:

- the residual stream and every gated residual update (``x = x + y * gate``),
- the modulation: the sinusoidal time embedding, ``time_embedding`` and ``time_projection``, and the
  ``modulation + e`` sums of every block and the head,
- the output head (LayerNorm, modulation and the final Linear),
- every LayerNorm (autocast runs ``layer_norm`` in float32),
- the audio projection (``proj_model``), which ``infer.py`` calls in float32 outside autocast.

Everything else (the patch embedding, the text and image embedding MLPs, q/k/v/o, the FFN and every attention)
computes in the reduced dtype. diffusers' own forward instead rounds the residual stream to the compute dtype
after every update and runs the time projection and the head in it, which on a bf16 run more than doubles the
error against float32 (see ``docs/benchmarks.md``).

:func:`forward_with_float32_islands` is a forward of ``WanTransformer3DModel`` with those islands, built from the
model's own submodules (no fork of diffusers). The weights stay as stored; the few float32 weights an island
needs are upcast per call (:func:`float32_weight`), so nothing is cached and nothing survives a call.
Attention processors (diffusers' and ``FantasyTalkingAttnProcessor``) are used as they are. Each block is called
as a module whose class is :class:`Float32IslandBlock` (:func:`use_float32_islands`), so regional
``torch.compile`` of a block and diffusers' block-level group offloading hooks wrap the float32-island forward.

Two deliberate differences, both below the bf16 rounding they sit in: the sinusoidal time embedding is
diffusers' float32 one (official: float64, then float32), and the residual stream is float32 from the patch
embedding on (official: block 0 still sees the bf16 patch embedding, so its first LayerNorm output is rounded).

Shapes: B batch, S video tokens (frame-major: latent frame, patch row, patch column), D model width, C_txt/C_img
the text/CLIP token widths, F/H/W latent frames, height and width (in latent pixels).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel, WanTransformerBlock
from torch.nn.attention import SDPBackend, sdpa_kernel

OFFICIAL = "official"  # float32 islands, as the official GPU run
DIFFUSERS = "diffusers"  # diffusers' WanTransformer3DModel.forward as it is
PRECISION_POLICIES = (OFFICIAL, DIFFUSERS)
REDUCED_DTYPES = (torch.bfloat16, torch.float16)  # compute dtypes the policy applies to


def check_policy(policy: str) -> str:
    """``policy`` if it is one of :data:`PRECISION_POLICIES`, else ValueError."""
    if policy not in PRECISION_POLICIES:
        raise ValueError(f"precision policy must be one of {PRECISION_POLICIES}, got '{policy}'.")
    return policy


def attention_backends(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """Where a forward's attention may run: anywhere torch picks, except reduced precision on a CPU whose ATen
    kernels are limited below AVX-512 (``ATEN_CPU_CAPABILITY=default`` / ``avx2``, or a CPU without it), where the
    math backend is used. torch's CPU flash kernel packs bf16/fp16 operands with AVX-512/AMX instructions chosen from
    the hardware, and fails ("pack_vnni2 is only supported when avx512 is supported") when ATen runs below it."""
    below_avx512 = not torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    if device.type == "cpu" and dtype in REDUCED_DTYPES and below_avx512:
        return sdpa_kernel(SDPBackend.MATH)
    return nullcontext()


def float32_weight(linear: nn.Module) -> torch.Tensor:
    """A float32 copy (or the tensor itself if already float32) of a Linear's real weight [out, in].

    Handles the storage forms the loaders produce: plain tensors in any float dtype, fp8 weights with a
    per-tensor ``scale_weight`` (``FP8Linear``), and GGUF-quantized weights (diffusers' ``GGUFLinear``).
    """
    weight = linear.weight
    if hasattr(weight, "quant_type"):  # a GGUFParameter: dequantize its blocks
        from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

        weight = dequantize_gguf_tensor(weight)
    weight = weight.float()
    scale = getattr(linear, "scale_weight", None)
    return weight if scale is None else weight * scale.float()


def linear_fp32(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear`` applied in float32: [..., in] (any float dtype) -> [..., out] float32, with the low-rank update of
    any LoRA applied to it (a peft layer wrapping the Linear, ``loaders/lora.py``) also in float32."""
    base = getattr(linear, "base_layer", linear)
    bias = None if base.bias is None else base.bias.float()
    out = F.linear(x.float(), float32_weight(base), bias)
    return out if base is linear else out + _lora_update_fp32(linear, x.float())


def _lora_update_fp32(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | float:
    """The active adapters' ``scaling * B(A(x))`` of a peft LoRA Linear (what its forward adds), in float32."""
    if layer.disable_adapters or layer.merged:
        return 0.0
    update: torch.Tensor | float = 0.0
    for name in layer.active_adapters:
        if name in layer.lora_A:
            down, up = layer.lora_A[name], layer.lora_B[name]
            bias = None if up.bias is None else up.bias.float()
            update = update + F.linear(F.linear(x, down.weight.float()), up.weight.float(), bias) * layer.scaling[name]
    return update


def layer_norm_fp32(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm`` applied in float32 (affine parameters upcast): [..., N] -> [..., N] float32."""
    weight = None if norm.weight is None else norm.weight.float()
    bias = None if norm.bias is None else norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps)


def _modulate(normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN in float32: normed [B, S, D] * (1 + scale) + shift, scale/shift [B, 1, D]."""
    return normed * (1 + scale) + shift


def time_embedding(embedder: nn.Module, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The time-embedding island (official ``time_embedding`` + ``time_projection`` in float32).

    Args:
        embedder: the model's ``condition_embedder`` (``WanTimeTextImageEmbedding``).
        timestep: [B] t = 1000 * sigma.
    Returns:
        temb [B, D] float32 (the head's modulation input) and the block modulation [B, 6, D] float32.
    """
    sinusoid = embedder.timesteps_proj(timestep).float()  # [B, freq_dim], cos then sin as Wan
    mlp = embedder.time_embedder  # the loaders keep it float32 already; time_proj (6 D x D) is upcast per call
    temb = linear_fp32(mlp.linear_2, mlp.act(linear_fp32(mlp.linear_1, sinusoid)))
    modulation = linear_fp32(embedder.time_proj, embedder.act_fn(temb))
    return temb, modulation.unflatten(1, (6, -1))


def image_embedding(embedder: nn.Module, image_tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """CLIP tokens -> context tokens: LayerNorm in float32 on the tokens as given, the MLP in ``dtype``, the
    closing LayerNorm in float32 (the official ``img_emb`` under autocast).

    Args:
        embedder: ``condition_embedder.image_embedder`` (``WanImageEmbedding``).
        image_tokens: [B, 257, C_img] CLIP penultimate tokens, any float dtype (not rounded before the LayerNorm).
    Returns:
        [B, 257, D] in ``dtype`` (the first op that reads it, the k/v Linear, rounds to ``dtype`` anyway).
    """
    if embedder.pos_embed is not None:
        raise ValueError("image embeddings with position embeddings (Wan FLF2V) are not a FantasyTalking model.")
    # norm1/norm2 are diffusers' FP32LayerNorm: float32 in, float32 out
    hidden = embedder.ff(embedder.norm1(image_tokens.float()).to(dtype))
    return embedder.norm2(hidden.float()).to(dtype)


def block_forward(
    block: nn.Module,
    x: torch.Tensor,
    context: torch.Tensor,
    modulation: torch.Tensor,
    rotary_emb: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """One ``WanTransformerBlock`` with the official float32 islands.

    Args:
        block: a ``WanTransformerBlock`` (its attention processors are used as they are).
        x: [B, S, D] float32 residual stream.
        context: [B, 257 + 512, D] image then text context tokens in the compute dtype.
        modulation: [B, 6, D] float32 time projection (:func:`time_embedding`).
        rotary_emb: (cos, sin) from the model's ``rope``.
    Returns:
        [B, S, D] float32: the residual stream after self-attention, cross-attention and FFN.
    """
    dtype = context.dtype
    shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table.float() + modulation).chunk(6, dim=1)
    # matmuls and attention in the compute dtype; every residual update added in float32
    attn = block.attn1(_modulate(block.norm1(x), shift, scale).to(dtype), None, None, rotary_emb)
    x = x + attn.float() * gate
    x = x + block.attn2(block.norm2(x).to(dtype), context, None, None).float()  # ungated (official: same)
    ffn = block.ffn(_modulate(block.norm3(x), c_shift, c_scale).to(dtype))
    return x + ffn.float() * c_gate


class Float32IslandBlock(WanTransformerBlock):
    """A ``WanTransformerBlock`` that also runs :func:`block_forward` (same parameters, same state-dict keys).

    The residual stream's dtype says which policy the caller runs: a float32 stream (the float32-island forward, or
    any float32 compute) takes :func:`block_forward`; a bf16/fp16 stream (diffusers' own forward at reduced
    precision) takes diffusers' block forward unchanged. :func:`use_float32_island_blocks` gives a loaded model's
    blocks this class (via :func:`use_float32_islands`), so the float32-island forward calls each block as a module and wrappers of
    ``block.forward`` (regional ``torch.compile``, diffusers' block-level group offloading hooks) apply to it.
    Under either policy a block may also be skipped by the first-block cache (``model/block_cache.py``).
    """

    # (BlockCacheCall, index, is_last) while a first-block-cache forward runs (model.block_cache.skipping_blocks)
    block_cache = None

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if self.block_cache is None:
            return self.compute(hidden_states, encoder_hidden_states, temb, rotary_emb)
        call, index, is_last = self.block_cache
        return call.run_block(index, is_last,
                              lambda x: self.compute(x, encoder_hidden_states, temb, rotary_emb), hidden_states)

    def compute(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The block itself: the float32-island forward on a float32 stream, else diffusers' forward."""
        if hidden_states.dtype != torch.float32:
            return super().forward(hidden_states, encoder_hidden_states, temb, rotary_emb)
        return block_forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb)


class Float32IslandTransformer(WanTransformer3DModel):
    """A ``WanTransformer3DModel`` whose ``forward`` takes the policy per call (same parameters and keys).

    Called as a module in both policies, so hooks on the model itself (diffusers' group offloading keeps the
    patch embedding, condition embedder and head in a group that its root hook loads) apply to the float32-island
    forward as they do to diffusers' own.
    """

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_image: torch.Tensor | None = None, return_dict: bool = True,
                attention_kwargs: dict | None = None, precision: str = DIFFUSERS):
        """diffusers' forward, or with ``precision="official"`` at a bf16/fp16 compute dtype
        :func:`forward_with_float32_islands` (text and image tokens uncast: the islands decide what rounds)."""
        dtype = self.patch_embedding.weight.dtype
        if check_policy(precision) == OFFICIAL and dtype in REDUCED_DTYPES:
            out = forward_with_float32_islands(self, hidden_states, timestep, encoder_hidden_states,
                                               encoder_hidden_states_image)
            return (out,) if not return_dict else Transformer2DModelOutput(sample=out)
        image = None if encoder_hidden_states_image is None else encoder_hidden_states_image.to(dtype)
        return super().forward(hidden_states.to(dtype), timestep, encoder_hidden_states.to(dtype), image,
                               return_dict, attention_kwargs)


def use_float32_islands(transformer: nn.Module) -> None:
    """Give ``transformer`` the :class:`Float32IslandTransformer` forward and its blocks the
    :class:`Float32IslandBlock` one, in place.

    Only classes change: parameters, buffers, processors and keys stay as loaded. Call it before wrapping the model
    or its blocks (compile, offloading hooks), so the wrappers wrap these forwards.
    """
    if not isinstance(transformer, WanTransformer3DModel):
        raise TypeError(f"expected diffusers' WanTransformer3DModel, got {type(transformer).__name__}")
    transformer.__class__ = Float32IslandTransformer
    for block in transformer.blocks:
        if not isinstance(block, WanTransformerBlock):
            raise TypeError(f"expected diffusers' WanTransformerBlock, got {type(block).__name__}")
        block.__class__ = Float32IslandBlock


def head_forward(transformer: nn.Module, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """The output head in float32: modulated LayerNorm then ``proj_out`` with a float32 copy of its weight.

    Args:
        x: [B, S, D] float32 residual stream; temb: [B, D] float32 time embedding.
    Returns:
        [B, S, p_t * p_h * p_w * C_out] float32 patch values.
    """
    shift, scale = (transformer.scale_shift_table.float() + temb.unsqueeze(1)).chunk(2, dim=1)
    return linear_fp32(transformer.proj_out, _modulate(transformer.norm_out(x), shift, scale))


def unpatchify(patches: torch.Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int]) -> torch.Tensor:
    """[B, F*H'*W', p_t*p_h*p_w*C] patch values (tokens frame-major) -> [B, C, F*p_t, H'*p_h, W'*p_w]."""
    frames, rows, cols = grid
    p_t, p_h, p_w = patch_size
    out = patches.reshape(patches.shape[0], frames, rows, cols, p_t, p_h, p_w, -1)
    out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, F, p_t, H', p_h, W', p_w]
    return out.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def forward_with_float32_islands(
    transformer: nn.Module,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    text: torch.Tensor,
    image_tokens: torch.Tensor | None,
) -> torch.Tensor:
    """``WanTransformer3DModel.forward`` under the official precision policy (see the module docstring).

    The compute dtype is the patch embedding's weight dtype (bf16 or fp16); the model is used as loaded.

    Args:
        transformer: a Wan2.1 ``WanTransformer3DModel`` (timestep [B], no per-token timesteps).
        hidden_states: [B, C_in, F, H, W] latent and I2V conditioning, any float dtype.
        timestep: [B] t = 1000 * sigma.
        text: [B, 512, C_txt] zero-padded text-encoder output.
        image_tokens: [B, 257, C_img] CLIP tokens, or None for a model without image embedding.
    Returns:
        [B, C_out, F, H, W] float32 velocity.
    """
    dtype = transformer.patch_embedding.weight.dtype
    p_t, p_h, p_w = transformer.config.patch_size
    grid = (hidden_states.shape[2] // p_t, hidden_states.shape[3] // p_h, hidden_states.shape[4] // p_w)
    rotary_emb = transformer.rope(hidden_states)
    # the residual stream lives in float32 from the patch embedding on
    x = transformer.patch_embedding(hidden_states.to(dtype)).flatten(2).transpose(1, 2).float()

    embedder = transformer.condition_embedder
    temb, modulation = time_embedding(embedder, timestep)
    context = embedder.text_embedder(text.to(dtype))
    if image_tokens is not None and embedder.image_embedder is not None:
        context = torch.cat([image_embedding(embedder.image_embedder, image_tokens, dtype), context], dim=1)

    for block in transformer.blocks:
        if not isinstance(block, Float32IslandBlock):
            raise TypeError("call use_float32_islands(transformer) first: the blocks run diffusers' policy")
        x = block(x, context, modulation, rotary_emb)  # as a module, so compile / offloading wrappers apply
    return unpatchify(gather_video_tokens(transformer, head_forward(transformer, x, temb)), grid, (p_t, p_h, p_w))


# diffusers' name of the gather hook its context-parallel plan puts on ``proj_out`` (hooks/context_parallel.py)
CONTEXT_PARALLEL_GATHER_HOOK = "cp_output---proj_out"


def gather_video_tokens(transformer: nn.Module, patches: torch.Tensor) -> torch.Tensor:
    """Under diffusers' context parallelism, this rank's [B, s, N] head output -> the whole sequence [B, S, N].

    Wan's context-parallel plan splits the video tokens where ``rope`` and block 0 are called (both are called as
    modules here, so its split hooks apply) and gathers them at ``proj_out``'s output. :func:`head_forward` runs
    ``proj_out`` with an upcast float32 weight instead of calling the module, so the plan's own gather hook is
    applied here to the same tensor; without context parallelism ``patches`` is returned as it is.
    """
    registry = getattr(transformer.proj_out, "_diffusers_hook", None)
    hook = None if registry is None else registry.get_hook(CONTEXT_PARALLEL_GATHER_HOOK)
    return patches if hook is None else hook.post_forward(transformer.proj_out, patches)
