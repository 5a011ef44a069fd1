"""ComfyUI entry point of the FantasyTalking node pack.

The nodes are imported only inside ComfyUI (where ``comfy_api`` imports), so ``fantasytalking_core`` stays usable
from plain Python and the tests.
"""

try:
    import comfy_api  # noqa: F401  (present only inside ComfyUI)
except ImportError:  # plain Python: nothing to register
    comfy_entrypoint = None
else:
    from .nodes import comfy_entrypoint  # noqa: F401
