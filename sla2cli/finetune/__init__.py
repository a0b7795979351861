"""`sla2 finetune`: train the router and α against dense attention (stage 1) or every weight (stage 2).

    from sla2cli.finetune import DataSpec, FinetuneConfig, run_finetune
    result = run_finetune(model, info, source=src, dst=dst, config=FinetuneConfig(steps=200),
                          data=DataSpec(), device=torch.device("cuda"))

The pieces: `softtopk` (hard top-k forward, SoftTop-k router gradient), `objectives` (the losses),
`sources` (image folders and teacher samples, noised as JiT does), `state` (the resumable state),
`trainer` (the loop).
"""

from .config import DataSpec, FinetuneConfig, TopkSchedule
from .softtopk import routing_gradient, soft_topk_attention, soft_topk_mask
from .state import state_path
from .trainer import FinetuneResult, StepInfo, run_finetune

__all__ = ["DataSpec", "FinetuneConfig", "FinetuneResult", "StepInfo", "TopkSchedule", "routing_gradient",
           "run_finetune", "soft_topk_attention", "soft_topk_mask", "state_path"]
