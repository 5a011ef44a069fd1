"""Loader nodes: the Wan2.1-I2V DiT with the FantasyTalking adapter, and wav2vec2-base-960h."""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io

from fantasytalking_core.audio.wav2vec2 import load_wav2vec2
from fantasytalking_core.errors import ModelFileError
from fantasytalking_core.loaders.lora import check_lora_fits, read_wan_lora
from fantasytalking_core.loaders.model_source import ModelSource

from . import io_types
from .model_files import (
    ADAPTER_FOLDER,
    DIT_EXTENSIONS,
    DIT_FOLDER,
    TRANSFORMERS_FOLDER,
    adapter_choices,
    dit_choices,
    resolve_wav2vec2,
    wav2vec2_folders,
)

WEIGHT_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                 "fp8_e4m3fn": torch.float8_e4m3fn}
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def register_model_folders() -> None:
    """models/fantasytalking (adapter), models/transformers (Hugging Face folders), and a view of the
    diffusion_models folders that lists every DiT format the engine reads (GGUF and shard indexes too)."""
    known = folder_paths.folder_names_and_paths
    if ADAPTER_FOLDER not in known:
        known[ADAPTER_FOLDER] = ([os.path.join(folder_paths.models_dir, ADAPTER_FOLDER)],
                                 set(folder_paths.supported_pt_extensions))
    folder_paths.add_model_folder_path(TRANSFORMERS_FOLDER, os.path.join(folder_paths.models_dir, "transformers"))
    # the same list object as diffusion_models: folders added later (extra_model_paths.yaml) show up here too
    known[DIT_FOLDER] = (known["diffusion_models"][0], set(DIT_EXTENSIONS))


register_model_folders()


def dit_path(name: str) -> str | None:
    return folder_paths.get_full_path(DIT_FOLDER, name)


def adapter_input() -> io.Combo.Input:
    """The adapter dropdown both loaders show: models/fantasytalking, then fantasytalking* files in diffusion_models."""
    adapters = adapter_choices(folder_paths.get_filename_list(ADAPTER_FOLDER),
                               folder_paths.get_filename_list("diffusion_models"))
    return io.Combo.Input("adapter_name", options=adapters,
                          tooltip="FantasyTalking audio adapter from models/fantasytalking (or a fantasytalking* file in "
                                  "models/diffusion_models): fantasytalking_model.ckpt or fantasytalking_fp16.safetensors.")


def adapter_path(name: str) -> str | None:
    return folder_paths.get_full_path(ADAPTER_FOLDER, name) or folder_paths.get_full_path("diffusion_models", name)


def wav2vec2_path(name: str) -> Path | None:
    return resolve_wav2vec2(name, folder_paths.get_folder_paths("audio_encoders"),
                            folder_paths.get_folder_paths(TRANSFORMERS_FOLDER))


def lora_path(name: str) -> str | None:
    return folder_paths.get_full_path("loras", name)


def missing_file(node: str, model_name: str | None = None, adapter_name: str | None = None,
                 wav2vec2_name: str | None = None, lora_name: str | None = None) -> str | None:
    """The line for the first chosen file that is not in its models folder, or None. A name given as None is not
    checked: ComfyUI validates a widget fed by a link as None, and the node's ``execute`` checks its value."""
    for name, find, what, folder in (
            (model_name, dit_path, "diffusion model", "models/diffusion_models"),
            (adapter_name, adapter_path, "adapter", "models/fantasytalking"),
            (wav2vec2_name, wav2vec2_path, "wav2vec2 model", "models/audio_encoders or models/transformers"),
            (lora_name, lora_path, "LoRA", "models/loras")):
        if name is not None and find(name) is None:
            return f"{node}: {what} '{name}' is not in {folder}."
    return None


def check_files(node: str, model_name: str | None = None, adapter_name: str | None = None,
                wav2vec2_name: str | None = None, lora_name: str | None = None) -> None:
    """:func:`missing_file` for ``execute``, where every name is known: ModelFileError with its line."""
    problem = missing_file(node, model_name, adapter_name, wav2vec2_name, lora_name)
    if problem:
        raise ModelFileError(problem)


class ModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io_types.schema(
            node_id="FantasyTalkingModelLoader",
            display_name="FantasyTalking Model Loader",
            description="Loads Wan2.1-I2V-14B-720P (the released adapter was trained on it; 480P also runs, not the "
                        "released pairing), any file format, and joins the FantasyTalking audio adapter to it. The "
                        "model waits in RAM and moves to the GPU only while the sampler runs.",
            inputs=[
                io.Combo.Input("model_name", options=dit_choices(folder_paths.get_filename_list(DIT_FOLDER)),
                               tooltip="Wan2.1-I2V-14B diffusion model from models/diffusion_models: a single "
                                       ".safetensors (bf16/fp16/fp8/fp8 scaled), a .gguf, or the .index.json of a "
                                       "shard set."),
                adapter_input(),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="Precision the DiT weights are kept in. default: as the file stores them, as "
                                       "Load Diffusion Model does (an fp8 file stays fp8, GGUF stays quantized, "
                                       "anything else in compute_dtype). fp8_e4m3fn: 8-bit storage of any file, "
                                       "about 17 GiB for the 14B model instead of 32 GiB in bf16, upcast layer by "
                                       "layer."),
                io.Combo.Input("compute_dtype", options=list(COMPUTE_DTYPES), default="bf16", advanced=True,
                               tooltip="Precision of the arithmetic. bf16 is the official setting (the adapter was "
                                       "trained and released with it); fp16 or fp32 only as a deliberate choice."),
            ],
            outputs=[io_types.FantasyTalkingModel.Output(display_name="model",
                                                         tooltip="Wan2.1-I2V DiT with the audio adapter.")],
        )

    @classmethod
    def validate_inputs(cls, model_name: str | None, adapter_name: str | None) -> bool | str:
        return missing_file("FantasyTalking Model Loader", model_name, adapter_name) or True

    @classmethod
    def execute(cls, model_name: str, adapter_name: str, weight_dtype: str, compute_dtype: str) -> io.NodeOutput:
        check_files("FantasyTalking Model Loader", model_name, adapter_name)
        source = ModelSource(dit_path(model_name), adapter_path(adapter_name), WEIGHT_DTYPES[weight_dtype],
                             COMPUTE_DTYPES[compute_dtype])
        return io.NodeOutput(source.load())


class Wav2Vec2Loader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        options = (folder_paths.get_filename_list("audio_encoders")
                   + wav2vec2_folders(folder_paths.get_folder_paths(TRANSFORMERS_FOLDER)))
        return io_types.schema(
            node_id="FantasyTalkingWav2Vec2Loader",
            display_name="FantasyTalking wav2vec2 Loader",
            description="Loads facebook/wav2vec2-base-960h, the audio encoder FantasyTalking was trained with. "
                        "Other audio encoders are refused: the adapter cannot read their features.",
            inputs=[
                io.Combo.Input("model_name", options=options,
                               default=next((o for o in options if "wav2vec2-base-960h" in o.lower()), None),
                               tooltip="wav2vec2-base-960h: one .safetensors in models/audio_encoders, or its Hugging "
                                       "Face folder (config.json + model.safetensors) in models/audio_encoders or "
                                       "models/transformers."),
            ],
            outputs=[io_types.Wav2Vec2.Output(display_name="wav2vec2", tooltip="wav2vec2-base-960h, on the CPU "
                                                                                "until an audio encode uses it.")],
        )

    @classmethod
    def validate_inputs(cls, model_name: str | None) -> bool | str:
        return missing_file("FantasyTalking wav2vec2 Loader", wav2vec2_name=model_name) or True

    @classmethod
    def execute(cls, model_name: str) -> io.NodeOutput:
        check_files("FantasyTalking wav2vec2 Loader", wav2vec2_name=model_name)
        return io.NodeOutput(load_wav2vec2(wav2vec2_path(model_name)))


class LoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io_types.schema(
            node_id="FantasyTalkingLoraLoader",
            display_name="FantasyTalking LoRA",
            description="Adds a Wan 2.1 LoRA (ComfyUI/kijai, musubi or diffusers format; lightx2v step-distillation "
                        "LoRAs included) to the model for the sampler's runs. Chain several for several LoRAs. The "
                        "loaded model itself is not changed.",
            inputs=[
                io_types.FantasyTalkingModel.Input("model", tooltip="From FantasyTalking Model Loader (or another "
                                                                    "FantasyTalking LoRA)."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A Wan 2.1 I2V-14B LoRA from models/loras. One made for another model (Wan "
                                       "2.2, the 1.3B) is refused, not ignored."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Multiplier of the LoRA's update: 1 as trained, 0 no effect."),
            ],
            outputs=[io_types.FantasyTalkingModel.Output(display_name="model",
                                                         tooltip="The same model, sampling with this LoRA.")],
        )

    @classmethod
    def validate_inputs(cls, lora_name: str | None) -> bool | str:
        return missing_file("FantasyTalking LoRA", lora_name=lora_name) or True

    @classmethod
    def execute(cls, model, lora_name: str, strength: float) -> io.NodeOutput:
        check_files("FantasyTalking LoRA", lora_name=lora_name)
        name = f"{Path(lora_name).stem}_{len(model.loras)}"  # unique along a chain, even for the same file twice
        lora = read_wan_lora(lora_path(lora_name), strength, name=name)
        check_lora_fits(lora, model.transformer)  # refused here, before the sampler moves anything
        return io.NodeOutput(model.with_loras([lora]))


NODES = [ModelLoader, Wav2Vec2Loader, LoraLoader]
