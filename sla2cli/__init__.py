"""sla2cli: SLA2 sparse-linear attention for JiT pixel-diffusion transformers.

The public names below load on first use (PEP 562), so `import sla2cli` and `sla2 --help` do not
import torch.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_model": ".checkpoints", "save_model": ".checkpoints",
    "CheckpointError": ".errors", "InvalidParameter": ".errors", "ParameterError": ".errors",
    "SLA2Error": ".errors", "UsageError": ".errors",
    "JiT": ".models", "JiTConfig": ".models",
    "SLA2Attention": ".sla2", "SLA2Config": ".sla2", "apply_sla2": ".sla2", "remove_sla2": ".sla2",
    "sla2_attention": ".sla2",
    "disable_qat": ".sla2.control", "enable_qat": ".sla2.control", "freeze_router": ".sla2.control",
    "set_topk": ".sla2.control",
    "describe_layers": ".sla2.stats",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])


def collect_stats(model):
    """Deprecated name of `describe_layers` (it reads parameters; it measures nothing)."""
    import warnings

    warnings.warn("sla2cli.collect_stats is deprecated; use sla2cli.describe_layers", DeprecationWarning, stacklevel=2)
    return __getattr__("describe_layers")(model)


__all__ = ["CheckpointError", "InvalidParameter", "JiT", "JiTConfig", "ParameterError", "SLA2Attention", "SLA2Config",
           "SLA2Error", "UsageError", "apply_sla2", "collect_stats", "describe_layers", "disable_qat", "enable_qat",
           "freeze_router", "load_model", "remove_sla2", "save_model", "set_topk", "sla2_attention"]
