"""`sla2cli.graphs`: on a CPU the sampler keeps the model itself (CUDA graphs need a GPU; bench/sampling.py
checks on one that graph replays give the eager samples bit for bit)."""

import torch

from sla2cli.graphs import Graphed, graphed
from sla2cli.models.jit import JiT, JiTConfig


def test_graphed_is_the_model_itself_on_a_cpu():
    model = JiT(JiTConfig(input_size=16, patch_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=3))
    assert graphed(model, "cpu") is model
    assert graphed(model, torch.device("cpu")) is model


def test_graphed_wrapper_exposes_what_the_sampler_reads():
    model = JiT(JiTConfig(input_size=16, patch_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=3))
    wrapper = Graphed(model)
    assert wrapper.num_classes == model.num_classes and wrapper.config is model.config
    assert [p for p in wrapper.parameters()] == [p for p in model.parameters()]
