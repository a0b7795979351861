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


def test_compiled_blocks_leave_attention_out_and_the_model_as_it_was(monkeypatch):
    """The capture's compile context: each block's forward compiled with its attention core left out (the core
    runs as an opaque call), the same outputs, and afterwards the model's own methods back (no instance
    attributes left). torch.compile is pointed at its "eager" backend: dynamo traces, inductor is not needed."""
    import functools

    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = JiT(JiTConfig(input_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2, num_classes=3,
                          bottleneck_dim=8, in_context_len=2, in_context_start=1)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    z, t, y = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.7]), torch.tensor([0, 2])
    with torch.no_grad():
        eager = model(z, t, y)
        wrapper = Graphed(model, compile_blocks=True)
        with wrapper._blocks_compiled():
            assert all("forward" in vars(b) for b in model.blocks)
            compiled = model(z, t, y)
        assert all("forward" not in vars(b) for b in model.blocks)
        again = model(z, t, y)
    torch.testing.assert_close(compiled, eager)
    assert torch.equal(again, eager)
    assert counters["stats"]["unique_graphs"] >= 2  # the blocks were traced ...
    breaks = " ".join(counters["graph_break"])
    assert "attend" in breaks and "torch.compiler.disable" in breaks  # ... around their cores
    torch._dynamo.reset()


def test_graphed_does_not_compile_unless_asked():
    model = JiT(JiTConfig(input_size=16, patch_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=3))
    wrapper = Graphed(model)
    with wrapper._blocks_compiled():
        assert "forward" not in vars(model.blocks[0])
    assert wrapper._compiled is None


def test_a_failed_compile_falls_back_to_uncompiled_graphs(monkeypatch):
    """`--compile` never costs more than the compile: a capture that fails while compiled is retried uncompiled
    (and the reason kept); one that fails uncompiled keeps the eager forward, as without compile."""
    model = JiT(JiTConfig(input_size=16, patch_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=3))
    wrapper = Graphed(model, compile_blocks=True)
    calls = []

    def capture(z, t, y, autocast):
        calls.append(wrapper.compile_blocks)
        if wrapper.compile_blocks:
            raise RuntimeError("BackendCompilerFailed: inductor cannot lower this\nsecond line")
        return "graph"

    monkeypatch.setattr(wrapper, "_capture", capture)
    assert wrapper._first_capture(None, None, None, False) == "graph"
    assert calls == [True, False] and wrapper.compile_blocks is False
    assert wrapper.compile_error == "RuntimeError: BackendCompilerFailed: inductor cannot lower this"

    plain = Graphed(model)
    monkeypatch.setattr(plain, "_capture", lambda *a: (_ for _ in ()).throw(RuntimeError("sync")))
    assert plain._first_capture(None, None, None, False) is None and plain.compile_error is None
