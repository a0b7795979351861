"""The SLA2 method: routing, the reference maths, the attention module, conversion and statistics."""

from .attention import ALPHA_INIT, SLA2Attention, SLA2Config, sla2_attention
from .backends import register_backend
from .layers import apply_sla2, parse_layer_spec, remove_sla2, set_sla2_layers, sla2_layers
from .reference import SLA2Stats, sla2_reference
from .routing import Routing, keep_count, route

__all__ = ["ALPHA_INIT", "SLA2Attention", "SLA2Config", "SLA2Stats", "Routing", "apply_sla2", "keep_count",
           "parse_layer_spec", "register_backend", "remove_sla2", "route", "set_sla2_layers", "sla2_attention",
           "sla2_layers", "sla2_reference"]
