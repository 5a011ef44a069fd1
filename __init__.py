"""ComfyUI entry point of the FantasyTalking node pack.

ComfyUI imports this folder as a package without putting it on ``sys.path``, so the engine, ``fantasytalking_core``,
is bound here under its own name (the nodes import it by that name, as the tests and scripts do). The nodes are
imported only inside ComfyUI (where ``comfy_api`` imports), so ``fantasytalking_core`` stays usable from plain Python.
"""

import importlib.util
import logging
import sys
from pathlib import Path


def _bind_engine() -> None:
    """Make ``import fantasytalking_core`` find the copy in this folder."""
    here = Path(__file__).resolve().parent / "fantasytalking_core"
    loaded = sys.modules.get("fantasytalking_core")
    if loaded is not None:
        if Path(loaded.__file__).resolve().parent != here:
            logging.getLogger(__name__).warning(
                "FantasyTalking: fantasytalking_core is already imported from %s; the nodes use that copy, not %s.",
                Path(loaded.__file__).parent, here)
        return
    spec = importlib.util.spec_from_file_location("fantasytalking_core", here / "__init__.py",
                                                  submodule_search_locations=[str(here)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fantasytalking_core"] = module
    spec.loader.exec_module(module)


# the front-end extension that shows each node's status text on the node (web/js/node_status.js)
WEB_DIRECTORY = "./web"

try:
    import comfy_api  # noqa: F401  (present only inside ComfyUI)
except ImportError:  # plain Python: nothing to register
    comfy_entrypoint = None
else:
    _bind_engine()
    from .nodes import comfy_entrypoint  # noqa: F401
