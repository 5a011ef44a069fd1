"""The conditioning nodes proven inside a real ComfyUI against the library, on full-size random-weight encoders.

ComfyUI's loaders build umT5-XXL and CLIP ViT-H/14 from fixed full-size configs, so the check writes random
weights at full size (umT5-XXL 5.7e9 parameters, 11.4 GB in fp16; ViT-H/14 0.6e9, 1.3 GB) in the files' real
layouts, under the names users have (``umt5_xxl_fp16.safetensors`` with its SentencePiece model inside,
``clip_vision_h.safetensors``). Three phases, each its own process, so that at most one umT5-XXL is in memory:

    python tests/comfyui_conditioning_check.py write DIR                        # the files (once, reused)
    COMFYUI_PATH=/path/to/ComfyUI python tests/comfyui_conditioning_check.py comfy DIR
    python tests/comfyui_conditioning_check.py library DIR                      # compares; one line per check

``comfy`` runs ComfyUI in-process on the CPU: Load CLIP (type wan) and Load CLIP Vision, the pack's
FantasyTalking Text Encode and Identity Encode nodes, and for comparison the core CLIP Text Encode and CLIP Vision
Encode nodes. ``library`` loads the same files with the library's loaders and encodes as the command line does
(``encode_prompt``, ``encode_image_clip``), in float32 like ComfyUI (which computes text and vision encoders in
float32 whatever the file's dtype), so the two sides differ only in summation order: the bound is the fixtures'
float32 parity bound, 1e-4 of the largest value. Checked:

1. each prompt (Wan's cleaning applied, the default negative prompt, one longer than 512 tokens) gives the same
   token ids and the same rows through the Text Encode node as through the library, and zero rows past them;
2. the core CLIP Text Encode on the long prompt (encoded whole, then cut by the sampler) is far outside the
   bound: the check sees what the node exists to fix;
3. Identity Encode's CLIP tokens (clip_vision input) equal the library's; the core CLIP Vision Encode route's
   distance from them is printed, in units of the tokens' std (documented as approximate).

Needs about 24 GB of RAM (the library's umT5-XXL in float32 is 21 GiB) and 14 GB of disk. The integration script
(``tests/comfyui_integration.py``) runs all three phases.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import os
import struct
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
if str(PACK_ROOT) not in sys.path:
    sys.path.insert(0, str(PACK_ROOT))

FILES_VERSION = "3"
TEXT_FILE, CLIP_FILE = "umt5_xxl_fp16.safetensors", "clip_vision_h.safetensors"
REL_TOL = 1e-4  # tests/fixtures/official/README.md: float32 parity bound, relative to the largest value
IMAGE_SIZE = 512
SAFETENSORS_DTYPES = {"torch.float16": "F16", "torch.float32": "F32", "torch.uint8": "U8"}


def prompts() -> dict[str, str]:
    """The prompts checked: Wan's cleaning matters for the first (curly quotes, entity, doubled spaces), the second
    is the default negative prompt (full-width punctuation that ftfy folds), the third is past 512 tokens."""
    from fantasytalking_core.settings import DEFAULT_NEGATIVE_PROMPT

    return {"short": "\u201cA woman\u201d  talks &amp; smiles, looking  at the camera.",
            "negative": DEFAULT_NEGATIVE_PROMPT,
            "long": " ".join(itertools.islice(itertools.cycle(_WORDS), 640))}


_WORDS = ("portrait", "light", "soft", "smile", "speaks", "studio", "camera", "calm", "face", "hair", "eyes",
          "background", "warm", "voice", "gentle", "moves", "head", "slowly", "natural", "detail")


# ---- phase 1: full-size random files --------------------------------------------------------------------------------


def write_safetensors(path: Path, shapes: dict[str, tuple[tuple[int, ...], str]], make) -> None:
    """Write a safetensors file tensor by tensor (never the whole state dict in memory): ``shapes`` maps each name
    to (shape, torch dtype name); ``make(name)`` returns its tensor."""
    header, offset = {}, 0
    for name, (shape, dtype) in shapes.items():
        size = math.prod(shape) * {"F16": 2, "F32": 4, "U8": 1}[SAFETENSORS_DTYPES[dtype]]
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, (shape, dtype) in shapes.items():
            tensor = make(name)
            assert tuple(tensor.shape) == tuple(shape) and str(tensor.dtype) == dtype, name
            f.write(tensor.contiguous().numpy().tobytes())
    tmp.replace(path)


def random_tensor(name: str, shape: tuple[int, ...], seed: int, gain: float = 1.0):
    """Norm scales 1, biases 0, anything else N(0, gain^2/fan_in), fp16; seeded, so a file reads the same."""
    import torch

    if len(shape) == 1 and name.endswith("bias"):
        return torch.zeros(shape, dtype=torch.float16)
    if len(shape) == 1 and ("norm" in name or "layrnorm" in name):
        return torch.ones(shape, dtype=torch.float16)
    g = torch.Generator().manual_seed(seed)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    rows = max(1, (1 << 24) // max(1, math.prod(shape[1:])))  # a chunk of rows at a time: fp32 scratch stays small
    return torch.cat([(torch.randn((min(rows, shape[0] - r), *shape[1:]), generator=g) * (gain / math.sqrt(fan_in))).half()
                      for r in range(0, shape[0], rows)])


def sentencepiece_model() -> bytes:
    """A small SentencePiece unigram model with umT5's special ids (pad 0, </s> 1, <unk> 2), trained on the
    check's own prompts: stored in the umT5 file as ComfyUI's files store theirs (``spiece_model``)."""
    import io

    import sentencepiece

    from fantasytalking_core.encoders.text import clean_prompt

    texts = list(prompts().values())
    rng = random.Random(0)
    corpus = [clean_prompt(t) for t in texts] + texts + [" ".join(rng.sample(_WORDS, 8)) for _ in range(3000)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=300, model_type="unigram",
        character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, num_threads=1,
        minloglevel=2)
    return model.getvalue()


def write_files(folder: Path) -> None:
    import torch
    from accelerate import init_empty_weights
    from transformers import CLIPVisionModelWithProjection, UMT5EncoderModel

    from fantasytalking_core.encoders.image import clip_config
    from fantasytalking_core.encoders.text import t5_config

    marker = folder / ".conditioning-check-files"
    if marker.is_file() and marker.read_text() == FILES_VERSION and (folder / TEXT_FILE).is_file() \
            and (folder / CLIP_FILE).is_file():
        print(f"full-size files in {folder} reused", flush=True)
        return
    folder.mkdir(parents=True, exist_ok=True)
    with init_empty_weights():
        t5 = UMT5EncoderModel(t5_config())
        clip = CLIPVisionModelWithProjection(clip_config())
    spiece = torch.frombuffer(bytearray(sentencepiece_model()), dtype=torch.uint8)

    # umT5-XXL as ComfyUI's umt5_xxl_fp16.safetensors: transformers names, the tied embedding once, the tokenizer
    shapes = {k: (tuple(v.shape), "torch.float16") for k, v in t5.state_dict().items()
              if k != "encoder.embed_tokens.weight"}
    shapes["spiece_model"] = ((spiece.numel(),), "torch.uint8")
    names = sorted(shapes)
    # T5's own initialisation: the query also scaled by 1/sqrt(d_kv), as T5 has no attention scaling; without it
    # the random logits are 8x too large, softmax saturates and float32 rounding grows a thousandfold in 24 layers
    q_gain = t5.config.d_kv ** -0.5
    write_safetensors(folder / TEXT_FILE, {k: shapes[k] for k in names},
                      lambda k: spiece if k == "spiece_model" else random_tensor(
                          k, shapes[k][0], 1000 + names.index(k), q_gain if k.endswith("SelfAttention.q.weight") else 1))
    # ViT-H/14 as ComfyUI's clip_vision_h.safetensors (transformers names with the projection)
    shapes = {k: (tuple(v.shape), "torch.float16") for k, v in clip.state_dict().items() if "position_ids" not in k}
    names = sorted(shapes)
    write_safetensors(folder / CLIP_FILE, {k: shapes[k] for k in names},
                      lambda k: random_tensor(k, shapes[k][0], 5000 + names.index(k)))
    marker.write_text(FILES_VERSION)
    print(f"full-size files written to {folder}", flush=True)


def portrait():
    """A 600 x 800 (3:4) 8-bit test portrait with detail at every scale: a PIL image."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:800, 0:600].astype(np.float32)
    rng = np.random.default_rng(3)
    r = 128 + 100 * np.sin(x / 37) * np.cos(y / 53)
    g = 128 + 90 * np.sin((x + y) / 11)
    b = 128 + 60 * np.cos(np.hypot(x - 300, y - 330) / 9)
    noise = rng.normal(0, 18, (800, 600, 3))
    image = np.clip(np.stack([r, g, b], -1) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(image)


# ---- phase 2: ComfyUI -----------------------------------------------------------------------------------------------


def run_comfy(folder: Path, tree: Path) -> None:
    import importlib

    import numpy as np
    import torch
    from safetensors.torch import save_file

    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, str(tree))
    import comfy.options

    comfy.options.enable_args_parsing()
    import folder_paths

    folder_paths.add_model_folder_path("text_encoders", str(folder), is_default=True)
    folder_paths.add_model_folder_path("clip_vision", str(folder), is_default=True)
    import nodes as comfy_nodes
    from comfyui_native_check import import_custom_node

    import_custom_node("fantasytalking_pack", PACK_ROOT)
    pack = importlib.import_module("fantasytalking_pack.nodes.conditioning")
    convert = importlib.import_module("fantasytalking_pack.nodes.convert")

    out, ids, encoded = {}, {}, []
    clip = comfy_nodes.CLIPLoader().load_clip(TEXT_FILE, type="wan")[0]
    encode = clip.encode_from_tokens_scheduled

    def recording(tokens, *args, **kwargs):  # the token ids exactly as the node hands them to the encoder
        encoded.append(tokens)
        return encode(tokens, *args, **kwargs)

    clip.encode_from_tokens_scheduled = recording
    for name, text in prompts().items():
        conditioning = pack.TextEncode.execute(clip, text).result[0]
        out[f"text.{name}"] = conditioning[0][0].float()
        ids[name] = [t[0] for t in encoded.pop()["umt5xxl"][0] if t[0] != 0]  # padding (id 0) left out
    clip.encode_from_tokens_scheduled = encode
    core = comfy_nodes.CLIPTextEncode().encode(clip, prompts()["long"])[0]
    out["text.long.core"] = convert.conditioning_to_text(core, "positive", 4096)
    del clip, core

    clip_vision = comfy_nodes.CLIPVisionLoader().load_clip(CLIP_FILE)[0]
    image = torch.from_numpy(np.asarray(portrait(), dtype=np.float32) / 255)[None]  # ComfyUI IMAGE [1, H, W, 3]
    vae = type("WanVAE", (), {"latent_channels": 16, "latent_dim": 3})()  # Identity Encode only checks the kind
    identity = pack.IdentityEncode.execute(image, vae, IMAGE_SIZE, clip_vision=clip_vision, locate_face=False)
    out["clip.official"] = identity.result[0].clip_tokens
    core = comfy_nodes.CLIPVisionEncode().encode(clip_vision, image, "none")[0]
    approx = pack.IdentityEncode.execute(image, vae, IMAGE_SIZE, clip_vision_output=core, locate_face=False)
    out["clip.core"] = approx.result[0].clip_tokens
    save_file({k: v.contiguous() for k, v in out.items()}, folder / "comfy.safetensors")
    (folder / "comfy_token_ids.json").write_text(json.dumps(ids))
    print(f"ComfyUI outputs written: {sorted(out)}", flush=True)


# ---- phase 3: the library, and the comparison -----------------------------------------------------------------------


def run_library(folder: Path) -> int:
    import gc

    from comfyui_native_check import Report, rel_err  # one line per check, as the native route's check prints

    import torch
    from safetensors.torch import load_file, save_file

    from fantasytalking_core.encoders.image import encode_image_clip, load_image_encoder
    from fantasytalking_core.encoders.text import clean_prompt, encode_prompt, load_text_encoder, load_tokenizer
    from fantasytalking_core.media.image import image_to_tensor

    comfy = load_file(folder / "comfy.safetensors")
    comfy_ids = json.loads((folder / "comfy_token_ids.json").read_text())
    report = Report()
    ours_all = {}

    encoder = load_image_encoder(folder / CLIP_FILE, dtype=torch.float32)
    with torch.no_grad():
        ours = encode_image_clip(encoder, image_to_tensor(portrait(), IMAGE_SIZE)).float()
    del encoder
    gc.collect()
    ours_all["clip"] = ours
    err = rel_err(comfy["clip.official"], ours)
    report.check("Identity Encode (clip_vision input) = library CLIP tokens", err <= REL_TOL,
                 f"relative error {err:.1e} (bound {REL_TOL:g}), tokens {list(ours.shape)}")
    official, approx = (float((comfy[k] - ours).abs().mean() / ours.std()) for k in ("clip.official", "clip.core"))
    report.check("core CLIP Vision Encode route is approximate, as documented", approx > 100 * official,
                 f"mean |difference| {approx:.3f} of the tokens' std (the clip_vision input: {official:.1e})")

    tokenizer = load_tokenizer(folder / TEXT_FILE)
    encoder = load_text_encoder(folder / TEXT_FILE, dtype=torch.float32)
    for name, text in prompts().items():
        ids = tokenizer(clean_prompt(text), truncation=True, max_length=512)["input_ids"]
        report.check(f"prompt '{name}': ComfyUI's token ids = the library's", ids == comfy_ids[name],
                     f"{len(ids)} tokens" + ("" if ids == comfy_ids[name] else
                                             f", ComfyUI {comfy_ids[name][:12]}... vs library {ids[:12]}..."))
        ours = ours_all[f"text.{name}"] = encode_prompt(encoder, tokenizer, text).float()
        theirs = comfy[f"text.{name}"][0]
        rows = ours.shape[0]
        err = rel_err(theirs[:rows], ours)
        rest = theirs[rows:]
        report.check(f"prompt '{name}': Text Encode rows = library rows", err <= REL_TOL and bool((rest == 0).all()),
                     f"{rows} rows, relative error {err:.1e} (bound {REL_TOL:g}); {rest.shape[0]} rows past them, "
                     f"largest {float(rest.abs().max()) if rest.numel() else 0:.1e}")
        if name == "long":
            core = comfy["text.long.core"][0]
            err_core = rel_err(core[:rows], ours)
            report.check("core CLIP Text Encode on the long prompt is outside the bound", err_core > 100 * REL_TOL,
                         f"relative error {err_core:.2e}")
    save_file({k: v.contiguous() for k, v in ours_all.items()}, folder / "library.safetensors")
    return 1 if report.failed else 0


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "comfy", "library"):
        print("usage: comfyui_conditioning_check.py write|comfy|library DIR (comfy: with COMFYUI_PATH set and "
              "ComfyUI's Python); see the module docstring.", file=sys.stderr)
        return 2
    folder = Path(sys.argv[2]).resolve()
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # comfyui_native_check's helpers
    if sys.argv[1] == "write":
        write_files(folder)
    elif sys.argv[1] == "comfy":
        run_comfy(folder, Path(os.environ["COMFYUI_PATH"]).resolve())
    else:
        return run_library(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
