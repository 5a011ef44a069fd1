"""The pack's category and its own socket types, declared once (values are library objects or ``convert`` dataclasses)."""

from comfy_api.latest import io

CATEGORY = "FantasyTalking"

FantasyTalkingModel = io.Custom("FANTASYTALKING_MODEL")  # fantasytalking_core.model.transformer.FantasyTalkingModel
Wav2Vec2 = io.Custom("FANTASYTALKING_WAV2VEC2")  # transformers Wav2Vec2Model (wav2vec2-base-960h)
AudioFeatures = io.Custom("FANTASYTALKING_AUDIO_FEATURES")  # convert.EncodedAudio
Identity = io.Custom("FANTASYTALKING_IDENTITY")  # convert.Identity
Motion = io.Custom("FANTASYTALKING_MOTION")  # fantasytalking_core.face.motion.MotionIntensity
FaceCrop = io.Custom("FANTASYTALKING_FACE_CROP")  # convert.FaceCrop
