"""The pack's category, its own socket types and its schema header, declared once (socket values are library objects
or ``convert`` dataclasses)."""

from comfy_api.latest import io

CATEGORY = "FantasyTalking"
PREFIX = CATEGORY  # node ids and menu names start with the pack's name

FantasyTalkingModel = io.Custom("FANTASYTALKING_MODEL")  # fantasytalking_core.model.transformer.FantasyTalkingModel
Wav2Vec2 = io.Custom("FANTASYTALKING_WAV2VEC2")  # transformers Wav2Vec2Model (wav2vec2-base-960h)
AudioFeatures = io.Custom("FANTASYTALKING_AUDIO_FEATURES")  # convert.EncodedAudio
Identity = io.Custom("FANTASYTALKING_IDENTITY")  # convert.Identity
Motion = io.Custom("FANTASYTALKING_MOTION")  # fantasytalking_core.face.motion.MotionIntensity
FaceCrop = io.Custom("FANTASYTALKING_FACE_CROP")  # convert.FaceCrop
# a ComfyUI model patcher over fantasytalking_core.model.adapter.AudioAdapter (the native route)
AudioAdapter = io.Custom("FANTASYTALKING_ADAPTER")


def schema(node_id: str, display_name: str, **fields) -> io.Schema:
    """A node's V3 schema in the pack's menu category; ``node_id`` and ``display_name`` must carry the pack's prefix
    (``FantasyTalkingSampler``, "FantasyTalking Sampler") so that they never clash with another pack's nodes.
    ``fields``: the rest of ``io.Schema`` (description, inputs, outputs, ...)."""
    if not node_id.startswith(PREFIX) or not display_name.startswith(PREFIX + " "):
        raise ValueError(f"node {node_id!r} / {display_name!r}: ids and names start with {PREFIX!r}")
    return io.Schema(node_id=node_id, display_name=display_name, category=CATEGORY, **fields)
