"""Configs that travel as JSON in checkpoint metadata."""

from __future__ import annotations

import dataclasses


class JsonConfig:
    """Mixin for frozen dataclasses: `to_dict`, and `from_dict` that ignores keys a newer version added."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
