"""sla2cli: SLA2 sparse-linear attention for JiT pixel-diffusion transformers."""

from .checkpoints import load_model, save_model
from .errors import CheckpointError, InvalidParameter, ParameterError, SLA2Error, UsageError
from .models import JiT, JiTConfig
from .sla2 import SLA2Attention, SLA2Config, apply_sla2, remove_sla2, sla2_attention
from .sla2.control import disable_qat, enable_qat, freeze_router, set_topk
from .sla2.stats import describe_layers

__version__ = "0.1.0"


def collect_stats(model):
    """Deprecated name of `describe_layers` (it reads parameters; it measures nothing)."""
    import warnings

    warnings.warn("sla2cli.collect_stats is deprecated; use sla2cli.describe_layers", DeprecationWarning, stacklevel=2)
    return describe_layers(model)



__all__ = ["CheckpointError", "InvalidParameter", "JiT", "JiTConfig", "ParameterError", "SLA2Attention", "SLA2Config",
           "SLA2Error", "UsageError", "apply_sla2", "collect_stats", "describe_layers", "disable_qat", "enable_qat",
           "freeze_router", "load_model", "remove_sla2", "save_model", "set_topk", "sla2_attention"]
