"""The stages' learning-rate schedules: warm-up, then cosine to 0, held then decayed (wsd), or held."""
from __future__ import annotations

import math

import pytest
import torch

from vlkit.config import load_recipe
from vlkit.train import lr_schedule


def rates(schedule: str, total: int = 100, **extra: object) -> list[float]:
    overrides = [f"stages.align.schedule={schedule}", "stages.align.warmup_ratio=0.1"]
    overrides += [f"stages.align.{k}={v}" for k, v in extra.items()]
    stage = load_recipe("mlp_patch", overrides).stages["align"]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = lr_schedule(opt, stage, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_is_linear_for_every_schedule():
    for name in ("cosine", "wsd", "constant"):
        lr = rates(name)
        assert lr[0] == 0.0 and lr[5] == pytest.approx(1.0) and lr[10] == pytest.approx(2.0), name


def test_cosine_decays_from_the_end_of_warmup():
    lr = rates("cosine")
    # halfway through the 90 post-warm-up steps the cosine is at half the peak
    assert lr[55] == pytest.approx(1.0)
    assert lr[99] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))


def test_wsd_holds_until_the_last_decay_ratio_then_decays_to_zero():
    lr = rates("wsd", decay_ratio=0.25)
    assert all(v == pytest.approx(2.0) for v in lr[10:75])
    assert lr[76] < 2.0 and lr[99] < 0.01
    assert all(a >= b for a, b in zip(lr[75:], lr[76:]))


def test_constant_holds_to_the_end():
    assert all(v == pytest.approx(2.0) for v in rates("constant")[10:])
