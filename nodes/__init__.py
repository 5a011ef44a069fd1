"""ComfyUI V3 nodes of the FantasyTalking pack: thin wrappers over ``fantasytalking_core``.

Each module in ``NODE_MODULES`` holds a ``NODES`` list; adding a module's nodes is one name here. The modules import
ComfyUI, so they are imported only when ComfyUI asks for the node list; ``convert`` and ``model_files`` never
import it and are tested on their own.
"""

from __future__ import annotations

import importlib

NODE_MODULES = ("loaders", "audio", "face", "conditioning", "sampler", "native")


def node_list() -> list[type]:
    """Every node class of the pack, in menu order."""
    return [node for name in NODE_MODULES for node in importlib.import_module(f".{name}", __name__).NODES]


async def comfy_entrypoint():
    """ComfyUI's V3 entry point."""
    from comfy_api.latest import ComfyExtension

    class FantasyTalkingExtension(ComfyExtension):
        async def get_node_list(self) -> list[type]:
            return node_list()

    return FantasyTalkingExtension()
