"""Stage 2's learning-rate schedule and EMA against hand computations."""

import math

import pytest
import torch

from sla2cli.errors import CheckpointError, InvalidParameter
from sla2cli.finetune.schedule import EMA, LRSchedule


def test_constant_without_warmup_is_one():
    s = LRSchedule()
    assert [s.factor(i, 10) for i in range(10)] == [1.0] * 10


def test_warmup_then_cosine_by_hand():
    s = LRSchedule("cosine", warmup=0.2)  # 10 steps: 2 warm-up steps, then 8 of cosine
    f = [s.factor(i, 10) for i in range(10)]
    assert f[:2] == [0.5, 1.0]
    assert f[2] == pytest.approx(1.0)
    assert f[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert f[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b for a, b in zip(f[1:], f[2:]))  # non-increasing after warm-up


@pytest.mark.parametrize("kwargs", [{"kind": "linear"}, {"warmup": 1.0}, {"warmup": -0.1}, {"warmup": float("nan")}])
def test_bad_schedules_name_their_parameter(kwargs):
    with pytest.raises(InvalidParameter) as info:
        LRSchedule(**kwargs)
    assert info.value.parameter in ("schedule", "warmup")


def test_ema_by_hand_and_state_round_trip():
    p = torch.nn.Parameter(torch.tensor([0.0, 2.0]))
    ema = EMA([p], 0.9)
    with torch.no_grad():
        p.copy_(torch.tensor([1.0, 0.0]))
    ema.update()  # one update: the average is p_1 itself, not 0.9 * p_0 + 0.1 * p_1
    assert torch.allclose(ema.average()[0], torch.tensor([1.0, 0.0]))
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 1.0]))
    ema.update()  # (0.1 * 0.9 * p_1 + 0.1 * p_2) / (1 - 0.81) = (0.09 p_1 + 0.1 p_2) / 0.19
    expected = (0.09 * torch.tensor([1.0, 0.0]) + 0.1 * torch.tensor([3.0, 1.0])) / 0.19
    assert torch.allclose(ema.average()[0], expected)
    saved = ema.state_dict()
    other = EMA([p], 0.9)
    other.load_state_dict(saved)
    other.copy_to_params()
    assert torch.allclose(p, expected)


def test_ema_before_any_update_leaves_the_weights():
    p = torch.nn.Parameter(torch.tensor([4.0]))
    ema = EMA([p], 0.99)
    ema.copy_to_params()
    assert torch.equal(p, torch.tensor([4.0]))


@pytest.mark.parametrize("state", [[torch.zeros(2)], {"shadow": [torch.zeros(3)], "updates": 1},
                                   {"shadow": [torch.zeros(2)], "updates": -1}, {"shadow": [torch.zeros(2)]}])
def test_ema_refuses_a_mismatched_state(state):
    ema = EMA([torch.nn.Parameter(torch.zeros(2))], 0.9)
    with pytest.raises(CheckpointError, match="EMA"):
        ema.load_state_dict(state)


@pytest.mark.parametrize("decay", [1.0, -0.5, float("inf")])
def test_bad_ema_decay(decay):
    with pytest.raises(InvalidParameter, match="ema"):
        EMA([torch.nn.Parameter(torch.zeros(1))], decay)


def test_ema_off_keeps_no_copy():
    p = torch.nn.Parameter(torch.ones(3))
    ema = EMA([p], 0.0)
    ema.update()
    ema.copy_to_params()
    assert ema.shadow == [] and torch.equal(p, torch.ones(3))
