"""Profiling: FLOPs counted per layer (torch or fvcore), latency measured per layer and end to end.

`profile_model` is the whole `sla2 profile` report as data; `model_flops` counts one forward;
`sla2_flops` is the formula the SLA2 custom op is charged with.
"""

from . import render
from .flops import COUNTERS, FLOP_CONVENTION, FlopCount, ModelFlops, model_flops
from .ops import dense_attention_flops, sla2_flops, through_custom_op
from .profile import check_profile_options, layer_spec, profile_model, random_model, select_layers
from .timing import Timer

__all__ = ["COUNTERS", "FLOP_CONVENTION", "FlopCount", "ModelFlops", "Timer", "check_profile_options",
           "dense_attention_flops",
           "layer_spec", "model_flops", "profile_model", "random_model", "render", "select_layers", "sla2_flops",
           "through_custom_op"]
