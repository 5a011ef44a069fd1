"""ComfyUI V3 nodes of the FantasyTalking pack (thin wrappers over fantasytalking_core)."""

from comfy_api.latest import ComfyExtension, io


class FantasyTalkingExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []


async def comfy_entrypoint() -> FantasyTalkingExtension:
    return FantasyTalkingExtension()
