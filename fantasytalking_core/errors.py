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


class OutputWriteError(FantasyTalkingError, OSError):
    """The output file cannot be written (no permission, no space, a name too long for the file system)."""


class NonFiniteError(FantasyTalkingError, FloatingPointError):
    """Sampling reached NaN or infinite values (fp16 overflow, settings far outside their ranges): the video would
    be black."""


class MissingDependencyError(FantasyTalkingError, ImportError):
    """An optional package a feature needs is not installed (e.g. no wheel for this platform); says how to get it."""


def reworded(error: FantasyTalkingError | type[FantasyTalkingError], message: str) -> FantasyTalkingError:
    """An error of ``error``'s class with ``message`` (e.g. the original prefixed with where it happened), one line
    for the user whatever arguments the class's constructor takes (made without calling it, from an instance;
    from a class alone, the base class)."""
    kind = error if isinstance(error, type) else type(error)
    try:
        return kind(message)
    except TypeError:
        if isinstance(error, type):
            return FantasyTalkingError(message)
        new = kind.__new__(kind, message)  # BaseException.__new__ sets args; the constructor is not called
        new.__dict__.update(error.__dict__)
        return new
