"""FantasyTalking engine: Wan2.1-I2V-14B + the FantasyTalking audio adapter, without ComfyUI.

Everything numerical lives here; the ComfyUI nodes in ``nodes/`` only convert types and call into it.
"""

__version__ = "0.1.0"
