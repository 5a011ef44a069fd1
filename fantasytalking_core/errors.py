"""Errors the library raises. Each message names the problem, what was found, and the fix."""


class FantasyTalkingError(Exception):
    """Base class for every error this package raises on bad input."""


class ModelFileError(FantasyTalkingError, ValueError):
    """A model file is the wrong model, the wrong format, or does not match what it is loaded into."""


class ModelNotFoundError(FantasyTalkingError, FileNotFoundError):
    """A model file or folder does not exist."""


class AudioInputError(FantasyTalkingError, ValueError):
    """Audio that cannot drive a video: empty, silent, non-finite, not audio at all."""


class ImageInputError(FantasyTalkingError, ValueError):
    """An image of the wrong shape or type."""


class FaceNotFoundError(FantasyTalkingError, ValueError):
    """No face was found where one is needed."""


class SettingsError(FantasyTalkingError, ValueError):
    """A generation setting out of its range (steps, guidance range, intensities, sizes)."""


class MissingDependencyError(FantasyTalkingError, ImportError):
    """An optional package a feature needs is not installed (e.g. no wheel for this platform); says how to get it."""
