"""The native route: FantasyTalking's audio branch on ComfyUI's own Wan2.1 I2V model.

Load Diffusion Model (or a GGUF loader, LoRAs, attention and caching patches) gives the MODEL; FantasyTalking Apply
Audio returns a clone whose cross-attentions carry the audio branch (``fantasytalking_core.model.wan_native``);
FantasyTalking Guider runs the three guidance passes for SamplerCustomAdvanced, FantasyTalking Sigmas gives it
the official schedule. The adapter weights are an
additional model of the patched MODEL, so ComfyUI loads and offloads them with the DiT.
"""

from __future__ import annotations

import inspect

import comfy.model_management as mm
import comfy.model_patcher
import comfy.samplers
from comfy_api.latest import io

from fantasytalking_core.errors import SettingsError
from fantasytalking_core.loaders.adapter import read_audio_adapter
from fantasytalking_core.model.adapter import AudioAdapter
from fantasytalking_core.model.limits import MAX_FRAMES
from fantasytalking_core.model.wan_native import (
    AUDIO_CHUNKS,
    AUDIO_CHUNKS_KEY,
    AudioCrossAttention,
    audio_pass_conds,
    native_audio,
)
from fantasytalking_core.sampling.guidance import (
    NEG,
    POS,
    POS_AUDIO,
    GuidanceConfig,
    combine_guidance,
    passes_for_step,
    step_of_sigma,
)
from fantasytalking_core.sampling.schedule import DEFAULT_SHIFT, DEFAULT_STEPS, flow_match_sigmas

from . import io_types
from .convert import guidance_range_problem
from .loaders import WEIGHT_DTYPES, adapter_input, adapter_path, check_files, missing_file

ADDITIONAL_MODELS_KEY = "fantasytalking_audio_adapter"
AUDIO_ON = {"FantasyTalking Guider / Dual CFG Guider (cond1)": "dual_cfg", "KSampler / CFG Guider (positive)": "cfg"}
DEFAULTS = GuidanceConfig()


def core_patcher(model, **devices):
    """ComfyUI's patcher for a model that is not a diffusion model (``CoreModelPatcher`` where it exists)."""
    cls = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    return cls(model, **devices)


def native_wan_blocks(model, adapter: AudioAdapter) -> list:
    """The blocks of a MODEL that is Wan2.1 I2V in a ComfyUI whose Wan internals the patch knows, else ValueError."""
    import comfy.ldm.wan.model as wan

    params = inspect.signature(wan.WanI2VCrossAttention.forward).parameters
    if not {"context", "context_img_len", "transformer_options"} <= set(params):
        raise ValueError("FantasyTalking Apply Audio: this ComfyUI's Wan model is older than the patch supports "
                         "(its cross-attention takes no transformer_options); update ComfyUI (0.33.0 is tested).")
    diffusion = model.get_model_object("diffusion_model")
    blocks = getattr(diffusion, "blocks", None)
    if type(diffusion) is not wan.WanModel or not blocks:  # VACE, camera, S2V, ... subclass it: other models
        raise ValueError(f"FantasyTalking Apply Audio: the model is {type(diffusion).__name__}, not Wan2.1 I2V; "
                         "load Wan2.1-I2V-14B-720P with Load Diffusion Model.")
    if not all(type(b.cross_attn) is wan.WanI2VCrossAttention for b in blocks):
        raise ValueError("FantasyTalking Apply Audio: the model has no CLIP image branch (a Wan T2V or Wan 2.2 "
                         "model); FantasyTalking needs Wan2.1-I2V-14B (720P), loaded with Load Diffusion Model.")
    if len(blocks) != len(adapter.blocks) or diffusion.dim != adapter.dim:
        raise ValueError(f"FantasyTalking Apply Audio: the adapter is for {len(adapter.blocks)} blocks of width "
                         f"{adapter.dim}, the model has {len(blocks)} of width {diffusion.dim}; use the Wan2.1-I2V-14B "
                         "model the adapter was released for.")
    return list(blocks)


def comfy_attention(heads: int, low_precision: bool = True):
    """ComfyUI's attention for ``heads`` heads, as the Wan model calls it (backend and override patches apply)."""
    import comfy.ldm.wan.model as wan

    extra = {} if low_precision else {"low_precision_attention": False}  # the Wan model's own rule for CLIP tokens

    def attention(q, k, v, transformer_options):
        return wan.optimized_attention(q, k, v, heads=heads, transformer_options=transformer_options, **extra)

    return attention


def has_audio_patch(model) -> bool:
    return any(isinstance(p, AudioCrossAttention) for p in model.object_patches.values())


class AdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io_types.schema(
            node_id="FantasyTalkingAdapterLoader",
            display_name="FantasyTalking Adapter Loader",
            description="Loads the FantasyTalking audio adapter on its own, for the native route (FantasyTalking "
                        "Apply Audio on a model from Load Diffusion Model). ComfyUI loads and offloads it with the "
                        "model it is applied to.",
            inputs=[
                adapter_input(),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default", advanced=True,
                               tooltip="Storage of the per-block weights (about 1.7 GB in bf16); default: as stored. "
                                       "They compute in the model's dtype."),
            ],
            outputs=[io_types.AudioAdapter.Output(display_name="adapter")],
        )

    @classmethod
    def validate_inputs(cls, adapter_name: str | None) -> bool | str:
        return missing_file("FantasyTalking Adapter Loader", adapter_name=adapter_name) or True

    @classmethod
    def execute(cls, adapter_name: str, weight_dtype: str) -> io.NodeOutput:
        check_files("FantasyTalking Adapter Loader", adapter_name=adapter_name)
        adapter = read_audio_adapter(adapter_path(adapter_name), dtype=WEIGHT_DTYPES[weight_dtype],
                                     device=mm.unet_offload_device())
        return io.NodeOutput(core_patcher(adapter, load_device=mm.get_torch_device(),
                                          offload_device=mm.unet_offload_device()))


class ApplyAudio(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io_types.schema(
            node_id="FantasyTalkingApplyAudio",
            display_name="FantasyTalking Apply Audio",
            description="Adds the FantasyTalking audio branch to ComfyUI's own Wan2.1-I2V model (Load Diffusion "
                        "Model, GGUF, LoRAs): every block's cross-attention also attends to the voice, with the "
                        "official maths. The input model is left as it was. Sample with FantasyTalking Guider (or "
                        "Dual CFG Guider) and SamplerCustomAdvanced; the video length must be the frame count "
                        "Audio Encode reports.",
            inputs=[
                io.Model.Input("model", tooltip="Wan2.1-I2V-14B (720P), from Load Diffusion Model or a GGUF loader."),
                io_types.AudioAdapter.Input("adapter", tooltip="From FantasyTalking Adapter Loader."),
                io_types.AudioFeatures.Input("audio_features", tooltip="From FantasyTalking Audio Encode."),
                io.Float.Input("audio_scale", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="Strength of the audio branch inside the model (1 official)."),
                io.Combo.Input("audio_on", options=list(AUDIO_ON), default=next(iter(AUDIO_ON)),
                               tooltip="Which prompt of the sampler carries the audio. FantasyTalking Guider always "
                                       "says so itself; Dual CFG Guider: cond1 (its batch order is negative, cond2, "
                                       "cond1); KSampler and CFG Guider: the positive prompt."),
            ],
            outputs=[io.Model.Output(tooltip="A clone of the model with the audio branch.")],
        )

    @classmethod
    def execute(cls, model, adapter, audio_features, audio_scale: float, audio_on: str) -> io.NodeOutput:
        weights: AudioAdapter = adapter.model
        blocks = native_wan_blocks(model, weights)
        features = audio_features.features
        if features.num_frames > MAX_FRAMES:
            raise SettingsError(f"FantasyTalking Apply Audio: the voice is {features.num_frames} frames; this route "
                                f"samples one clip of at most {MAX_FRAMES}. Lower Audio Encode's max_frames, or use "
                                "FantasyTalking Sampler, which makes longer videos in segments.")
        audio = native_audio(weights, features.features, features.num_frames, audio_scale, AUDIO_CHUNKS[AUDIO_ON[audio_on]])
        patched = model.clone()
        for i, block in enumerate(blocks):
            attn = block.cross_attn
            forward = AudioCrossAttention(attn, weights.blocks[i], audio, comfy_attention(attn.num_heads),
                                          comfy_attention(attn.num_heads, low_precision=False))
            patched.add_object_patch(f"diffusion_model.blocks.{i}.cross_attn.forward", forward)
        patched.set_additional_models(ADDITIONAL_MODELS_KEY, [adapter])
        return io.NodeOutput(patched)


class AudioGuider(comfy.samplers.CFGGuider):
    """FantasyTalking's guidance for ComfyUI's samplers: negative prompt, positive prompt without audio, positive
    prompt with audio (conds 0, 1, 2 of one ``calc_cond_batch``, batched when memory allows), combined as
    ``u + cfg (p - u) + audio_cfg (pa - p)`` over ComfyUI's denoised predictions (the weights sum to 1, so this is
    the same combination of velocities), two passes at cfg 1, the audio pass alone outside the step range."""

    def set_guidance(self, guidance: GuidanceConfig) -> None:
        self.guidance = guidance

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        sample_sigmas = model_options["transformer_options"]["sample_sigmas"]
        passes = passes_for_step(step_of_sigma(sample_sigmas, timestep), len(sample_sigmas) - 1, self.guidance)
        negative, positive = self.conds.get("negative"), self.conds.get("positive")
        # the audio pass under its own uuids: caches keyed by uuid (EasyCache) keep it apart from the no-audio pass
        conds = [negative if NEG in passes else None, positive if POS in passes else None, audio_pass_conds(positive)]
        options = dict(model_options)
        options["transformer_options"] = {**model_options["transformer_options"], AUDIO_CHUNKS_KEY: (2,)}
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, options)
        return combine_guidance({p: out[i] for i, p in enumerate((NEG, POS, POS_AUDIO)) if p in passes}, self.guidance)


class Guider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io_types.schema(
            node_id="FantasyTalkingGuider",
            display_name="FantasyTalking Guider",
            description="FantasyTalking's audio + text guidance for SamplerCustomAdvanced: three model passes per "
                        "step (negative prompt; positive without audio; positive with audio), two at cfg 1. The "
                        "model must come from FantasyTalking Apply Audio.",
            inputs=[
                io.Model.Input("model", tooltip="From FantasyTalking Apply Audio."),
                io.Conditioning.Input("positive", tooltip="From WanImageToVideo (positive)."),
                io.Conditioning.Input("negative", tooltip="From WanImageToVideo (negative); unused at cfg 1."),
                io.Float.Input("cfg", default=DEFAULTS.cfg, min=1.0, max=20.0, step=0.1, round=0.01,
                               tooltip="Text guidance scale (5 official); 1 skips the negative pass."),
                io.Float.Input("audio_cfg", default=DEFAULTS.audio_cfg, min=0.0, max=20.0, step=0.1, round=0.01,
                               tooltip="Audio guidance scale (5 official)."),
                io.Float.Input("audio_guidance_start", default=DEFAULTS.audio_start, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps at which audio guidance starts."),
                io.Float.Input("audio_guidance_end", default=DEFAULTS.audio_end, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps at which audio guidance ends; steps outside run one "
                                       "pass less."),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def validate_inputs(cls, audio_guidance_start: float | None, audio_guidance_end: float | None) -> bool | str:
        # ComfyUI skips its own 0..1 check for the inputs a validate_inputs takes; None: fed by a link
        return guidance_range_problem("FantasyTalking Guider", audio_guidance_start, audio_guidance_end) or True

    @classmethod
    def execute(cls, model, positive, negative, cfg: float, audio_cfg: float, audio_guidance_start: float,
                audio_guidance_end: float) -> io.NodeOutput:
        problem = guidance_range_problem("FantasyTalking Guider", audio_guidance_start, audio_guidance_end)
        if problem:
            raise SettingsError(problem)
        if not has_audio_patch(model):
            raise ValueError("FantasyTalking Guider: the model carries no FantasyTalking audio; connect it through "
                             "FantasyTalking Apply Audio.")
        guider = AudioGuider(model)
        guider.set_conds(positive, negative)
        guider.set_guidance(GuidanceConfig(cfg, audio_cfg, audio_guidance_start, audio_guidance_end))
        return io.NodeOutput(guider)


class Sigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io_types.schema(
            node_id="FantasyTalkingSigmas",
            display_name="FantasyTalking Sigmas",
            description="The official noise schedule (evenly spaced, then time-shifted) for SamplerCustomAdvanced, so "
                        "the native route samples at the pack sampler's noise levels.",
            inputs=[
                io.Int.Input("steps", default=DEFAULT_STEPS, min=1, max=200, tooltip="Denoising steps (30 official)."),
                io.Float.Input("shift", default=DEFAULT_SHIFT, min=0.1, max=20.0, step=0.1,
                               tooltip="Flow-matching sigma shift (5 official)."),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, steps: int, shift: float) -> io.NodeOutput:
        return io.NodeOutput(flow_match_sigmas(steps, shift))


NODES = [AdapterLoader, ApplyAudio, Guider, Sigmas]
