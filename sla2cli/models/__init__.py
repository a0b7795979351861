"""Model definitions: JiT and its presets."""

from .jit import PRESETS, JiT, JiTConfig, preset_config

__all__ = ["PRESETS", "JiT", "JiTConfig", "preset_config"]
