"""Each LR schedule as step -> factor at 0, end of warmup, mid and end (spec cli-options §8)."""
import math

import pytest
import torch

from library.errors import UserError
from library.training.optim.lr_schedules import build_lr_scheduler
from library.training.optim.optimizers import build_optimizer

WARMUP, TOTAL = 10, 110
POINTS = (0, WARMUP, 60, TOTAL)  # start, end of warmup, mid of the decay, end


def _optimizer(lr=1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def factors(sched, opt, points=POINTS, base=1.0):
    """LR factor after ``step`` scheduler steps, for each step in ``points``."""
    out, step = [], 0
    for p in points:
        while step < p:
            opt.step()
            sched.step()
            step += 1
        out.append(opt.param_groups[0]["lr"] / base)
    return out


EXPECTED = {
    "linear": (dict(), [0.0, 1.0, 0.5, 0.0]),
    "cosine": (dict(), [0.0, 1.0, 0.5, 0.0]),  # diffusers' default half cycle: cos(π/2) at mid
    "cosine_with_restarts": (dict(num_cycles=2), [0.0, 1.0, 1.0, 0.0]),  # mid = start of the 2nd cycle
    "polynomial": (dict(power=2.0), [0.0, 1.0, (1 - 1e-7) * 0.25 + 1e-7, 1e-7]),
    "constant_with_warmup": (dict(), [0.0, 1.0, 1.0, 1.0]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_schedules(name):
    extra, expected = EXPECTED[name]
    opt = _optimizer()
    sched = build_lr_scheduler(opt, name, WARMUP, TOTAL, **extra)
    assert factors(sched, opt) == pytest.approx(expected, abs=1e-9)


def test_cosine_with_restarts_quarter_cycle():
    opt = _optimizer()
    sched = build_lr_scheduler(opt, "cosine_with_restarts", WARMUP, TOTAL, num_cycles=2)
    assert factors(sched, opt, (35,)) == pytest.approx([0.5 * (1 + math.cos(math.pi * 0.5))])


def test_constant_and_warmup_errors():
    opt = _optimizer()
    assert factors(build_lr_scheduler(opt, "constant", 0, TOTAL), opt) == [1.0] * 4
    with pytest.raises(UserError, match="use --lr_scheduler constant_with_warmup"):
        build_lr_scheduler(_optimizer(), "constant", 5, TOTAL)
    with pytest.raises(UserError, match="--lr_scheduler_type StepLR does not use --lr_warmup_steps"):
        build_lr_scheduler(_optimizer(), "constant", 5, TOTAL, scheduler_type="StepLR", scheduler_args=["step_size=2"])


def test_total_multiplied_by_processes_but_not_warmup():
    opt = _optimizer()
    # total = 50 * 2 = 100, warmup stays 10: linear is at (100-55)/(100-10) = 0.5 after 55 steps
    sched = build_lr_scheduler(opt, "linear", WARMUP, 50, num_processes=2)
    assert factors(sched, opt, (WARMUP, 55, 100)) == pytest.approx([1.0, 0.5, 0.0])


def test_group_lrs_scale_together():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1], "lr": 1e-4}, {"params": [p2], "lr": 1e-3}], lr=1.0)
    sched = build_lr_scheduler(opt, "linear", 0, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert sched.get_last_lr() == pytest.approx([0.5e-4, 0.5e-3])


def test_piecewise_constant_from_args():
    opt = _optimizer()
    sched = build_lr_scheduler(opt, "piecewise_constant", 0, TOTAL, scheduler_args=["step_rules='1:10,0.1:20,0.05'"])
    assert factors(sched, opt, (0, 10, 20, 30)) == pytest.approx([1.0, 0.1, 0.05, 0.05])


def test_custom_scheduler_types():
    opt = _optimizer()
    sched = build_lr_scheduler(opt, "cosine", 0, TOTAL, scheduler_type="StepLR",
                               scheduler_args=["step_size=5", "gamma=0.5"])
    assert type(sched) is torch.optim.lr_scheduler.StepLR
    assert factors(sched, opt, (0, 5, 10)) == pytest.approx([1.0, 0.5, 0.25])
    opt = _optimizer()
    sched = build_lr_scheduler(opt, "constant", 0, TOTAL, scheduler_type="torch.optim.lr_scheduler.ExponentialLR",
                               scheduler_args=["gamma=0.9"])
    assert factors(sched, opt, (0, 2)) == pytest.approx([1.0, 0.81])
    with pytest.raises(UserError, match="--lr_scheduler_type NoSuchLR: class not found"):
        build_lr_scheduler(_optimizer(), "constant", 0, TOTAL, scheduler_type="NoSuchLR")
    with pytest.raises(UserError, match="--lr_scheduler_type StepLR"):
        build_lr_scheduler(_optimizer(), "constant", 0, TOTAL, scheduler_type="StepLR")  # step_size missing


def test_adafactor_schedule():
    params = [torch.nn.Parameter(torch.ones(4))]
    opt, _, extra = build_optimizer(params, "AdaFactor", 1e-3)
    sched = build_lr_scheduler(opt, extra["lr_scheduler"], 0, TOTAL)
    assert sched.get_last_lr() == pytest.approx([1e-3])  # initial lr before stepping
    params[0].sum().backward()
    opt.step()
    sched.step()
    assert sched.get_last_lr()[0] > 0  # now Adafactor's own relative-step lr
    with pytest.raises(UserError, match="adafactor does not use --lr_warmup_steps"):
        build_lr_scheduler(opt, extra["lr_scheduler"], 5, TOTAL)
    with pytest.raises(UserError, match="needs --optimizer_type AdaFactor"):
        build_lr_scheduler(_optimizer(), "adafactor:0.001", 0, TOTAL)


def test_unknown_name_and_bad_polynomial():
    with pytest.raises(UserError, match="unknown scheduler; use one of linear, cosine"):
        build_lr_scheduler(_optimizer(), "exponential", 0, TOTAL)
    with pytest.raises(UserError, match="--lr_scheduler polynomial: lr_end"):
        build_lr_scheduler(_optimizer(lr=1e-8), "polynomial", 0, TOTAL)
