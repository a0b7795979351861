"""`sla2 finetune`: train the router and α against dense attention (stage 1) or every weight (stage 2).

    from sla2cli.finetune import DataSpec, FinetuneConfig, run_finetune
    result = run_finetune(model, info, source=src, dst=dst, config=FinetuneConfig(steps=200),
                          data=DataSpec(), device=torch.device("cuda"))

The pieces: `softtopk` (hard top-k forward, SoftTop-k router gradient), `objectives` (the losses),
`sources` (image folders and teacher samples, noised as JiT does), `state` (the resumable state),
`trainer` (the loop), `schedule` (stage 2's learning rate and EMA), `recipe` (stage 1 then stage 2).
"""

from .config import DataSpec, FinetuneConfig, TopkSchedule
from .recipe import RecipeResult, run_recipe
from .softtopk import routing_gradient, soft_topk_attention, soft_topk_mask
from .state import state_path
from .trainer import FinetuneResult, StepInfo, run_finetune

__all__ = ["DataSpec", "FinetuneConfig", "FinetuneResult", "RecipeResult", "StepInfo", "TopkSchedule",
           "routing_gradient", "run_finetune", "run_recipe", "soft_topk_attention", "soft_topk_mask", "state_path"]
