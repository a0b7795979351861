"""Data sources: image folders and procedural textures, as tensors in [-1, 1]."""
