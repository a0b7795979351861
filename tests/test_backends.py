"""The SLA2 backend registry (`sla2cli.sla2.backends`): one "auto", checked explicit names, on the CPU."""

import pytest
import torch

from sla2cli.errors import UsageError
from sla2cli.sla2 import backends, register_backend, sla2_attention
from sla2cli.sla2.backends import Backend, check_name, register, resolve

Q = torch.zeros(1, 2, 8, 16)
NEEDS = dict(feature_map="softmax", qat=False, return_stats=False)


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    """Each test registers into a copy of the registry; the real one is back afterwards. The Triton kernels
    load (once per process) first, so they register into the real one."""
    backends.kernels_unavailable(torch.device("cuda"))
    monkeypatch.setattr(backends, "_BACKENDS", dict(backends._BACKENDS))


def fake(q, k, v, **kwargs):
    return torch.full_like(q, 7.0)


def test_auto_is_the_reference_on_cpu():
    assert resolve("auto", Q, **NEEDS).name == "torch"
    assert resolve("auto", Q, **{**NEEDS, "qat": True, "return_stats": True}).name == "torch"


def test_unknown_name_is_a_usage_error_naming_it():
    with pytest.raises(UsageError, match="backend 'nope' is not one of: auto, torch"):
        resolve("nope", Q, **NEEDS)
    with pytest.raises(UsageError, match="--sla2-backend 'cuda' is not one of: auto"):
        check_name("cuda", "--sla2-backend")
    check_name("auto")
    check_name("torch")


def test_registering_is_one_entry():
    before = backends.names()
    register(Backend("fake", fake))
    assert backends.names() == (*before, "fake")
    register(Backend("fake", fake, devices=frozenset({"cpu"})))  # same name: replaced, not added
    assert backends.names() == (*before, "fake")
    with pytest.raises(ValueError, match="auto"):
        register(Backend("auto", fake))


def test_auto_picks_a_registered_backend_only_for_what_it_serves():
    register(Backend("fake", fake, devices=frozenset({"cpu"}), feature_maps=frozenset({"softmax"})))
    assert resolve("auto", Q, **NEEDS).name == "fake"
    assert resolve("auto", Q, **{**NEEDS, "feature_map": "elu"}).name == "torch"
    assert resolve("auto", Q.double(), **NEEDS).name == "fake"
    assert resolve("auto", torch.zeros(1, 2, 8, 16, device="meta"), **NEEDS).name == "torch"
    kwargs = dict(topk=0.5, alpha=torch.full((2,), 0.9), block_q=16, block_k=16)
    assert torch.equal(sla2_attention(Q, Q, Q, **kwargs), torch.full_like(Q, 7.0))
    assert not torch.equal(sla2_attention(Q + 1, Q + 1, Q + 1, feature_map="elu", **kwargs), torch.full_like(Q, 7.0))


def test_explicit_name_that_cannot_serve_raises_and_says_why():
    register(Backend("fake", fake, devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}), max_head_dim=8,
                     feature_maps=frozenset({"softmax"})))
    small = torch.zeros(1, 2, 8, 8)
    assert resolve("fake", small, **NEEDS).name == "fake"
    with pytest.raises(UsageError, match="backend 'fake' cannot run feature map 'elu'; backends that can: auto, torch"):
        resolve("fake", small, **{**NEEDS, "feature_map": "elu"})
    with pytest.raises(UsageError, match="cannot run head dim 16 \\(at most 8\\)"):
        resolve("fake", Q, **NEEDS)
    with pytest.raises(UsageError, match="cannot run float64 tensors"):
        resolve("fake", small.double(), **NEEDS)
    with pytest.raises(UsageError, match="cannot run meta tensors"):
        resolve("fake", small.to("meta"), **NEEDS)


def test_qat_and_stats_go_to_the_reference_unless_named():
    """As the Triton backend: no qat / return_stats kernel, its function hands them to the reference."""
    register(Backend("fake", fake, qat=False, return_stats=False, reference_fallback=True))
    assert resolve("auto", Q, **NEEDS).name == "fake"
    assert resolve("auto", Q, **{**NEEDS, "qat": True}).name == "torch"
    assert resolve("auto", Q, **{**NEEDS, "return_stats": True}).name == "torch"
    assert resolve("fake", Q, **{**NEEDS, "qat": True, "return_stats": True}).name == "fake"
    register(Backend("strict", fake, qat=False))
    with pytest.raises(UsageError, match="backend 'strict' cannot run qat"):
        resolve("strict", Q, **{**NEEDS, "qat": True})


def test_deprecated_register_backend_is_used_only_when_named():
    with pytest.warns(DeprecationWarning, match="register_backend is deprecated"):
        register_backend("legacy", fake, lambda q: q.shape[-1] == 16)
    assert resolve("auto", Q, **NEEDS).name == "torch"
    assert resolve("legacy", Q, **{**NEEDS, "qat": True, "return_stats": True}).name == "legacy"
    with pytest.raises(UsageError, match="backend 'legacy' cannot run cpu tensors"):
        resolve("legacy", torch.zeros(1, 2, 8, 8), **NEEDS)


def test_kernels_are_not_used_off_cuda():
    assert "CUDA only" in backends.kernels_unavailable(torch.device("cpu"))


def test_a_backend_whose_qat_kernel_cannot_run_these_blocks_leaves_qat_to_the_reference():
    """`qat_problem` (the Triton backend's: FP8 and block sizes) says why; "auto" then picks the reference."""
    register(Backend("lowbit", fake, qat_problem=lambda q, bq, bk: None if bk >= 32 else "blocks too small"))
    assert resolve("auto", Q, **{**NEEDS, "qat": True}, block_q=32, block_k=64).name == "lowbit"
    assert resolve("auto", Q, **{**NEEDS, "qat": True}, block_q=32, block_k=16).name == "torch"
    with pytest.raises(UsageError, match=r"cannot run qat \(blocks too small\)"):
        resolve("lowbit", Q, **{**NEEDS, "qat": True}, block_q=32, block_k=16)


def test_a_layer_says_which_path_its_qat_runs():
    """`SLA2Attention.path`: the backend, and for QAT the low-bit kernels or the reference with the reason."""
    from sla2cli.sla2.attention import SLA2Attention, SLA2Config

    q = torch.zeros(1, 2, 8, 64)
    plain = SLA2Attention(2, 64, SLA2Config(topk=0.5))
    assert plain.path(q) == "torch"
    qat = SLA2Attention(2, 64, SLA2Config(topk=0.5, qat=True))
    assert qat.path(q).startswith("torch, QAT by the reference (")  # on the CPU: no low-bit kernel runs
    register(Backend("lowbit", fake, qat_problem=lambda q, bq, bk: None))
    assert qat.path(q) == "lowbit, QAT low-bit"
    qat.backend = "torch"
    assert qat.path(q) == "torch, QAT by the reference (backend 'torch' has no low-bit kernel)"


def test_a_run_says_once_when_its_qat_layers_fall_back_to_the_reference():
    """`qat_reference_notice`: one line for all QAT layers a run leaves to the fake-quant reference (on a CPU:
    the low-bit kernels need CUDA), none for a run without QAT or whose QAT layers run low-bit kernels."""
    from sla2cli.sla2.attention import SLA2Attention, SLA2Config, qat_reference_notice

    cpu = torch.device("cpu")
    qat = [SLA2Attention(2, 64, SLA2Config(topk=0.5, qat=True)) for _ in range(3)]
    plain = [SLA2Attention(2, 64, SLA2Config(topk=0.5))]
    notice = qat_reference_notice(qat + plain, cpu, torch.float32)
    assert notice.startswith("QAT's sparse branch of 3 layer(s) runs in the fake-quant PyTorch reference")
    assert "(the low-bit kernels run on CUDA only, not cpu)" in notice and "\n" not in notice
    assert qat_reference_notice(plain, cpu, torch.float32) is None
    register(Backend("lowbit", fake, qat_problem=lambda q, bq, bk: None))
    assert qat_reference_notice(qat, cpu, torch.float32) is None  # auto picks the low-bit backend
