"""Model definitions: JiT and its presets."""

from .jit import ARCHITECTURES, JiT, JiTConfig, architecture_config

__all__ = ["ARCHITECTURES", "JiT", "JiTConfig", "architecture_config"]
