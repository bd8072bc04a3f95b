"""``lwd.WeightDecay`` without a Trainer: plain PyTorch loops against a plain loop over the documented formulas.

The reference never goes through ``lightning_wd``: it steps a copy of the model with the same optimizer
built with ``weight_decay=0`` (torch's own update, no decay) and then applies the table of the
engine's docstring tensor by tensor, in float64 Python arithmetic where it can.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import lightning_wd as lwd
from lightning_wd import schedules
from tests.helpers import cpu_backward_supports

LR, WD = 0.1, 0.3


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))


def batches(n: int = 6, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)) for _ in range(n)]


DECAYED = {"0.weight", "2.weight"}


def loss_of(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(net(x), y)


def reference(
    net: nn.Module,
    data: list,
    *,
    mode: str = "decoupled",
    ord: int = 2,
    cautious: bool = False,
    source: str = "params",
    metric: str = "mean_abs",
    optimizer=torch.optim.SGD,
    lr_at=lambda t: LR,
    mult_at=lambda t: 1.0,
    **opt_kw,
) -> dict[str, torch.Tensor]:
    """A plain loop: torch's update without decay, then the documented decay, one tensor at a time."""
    net = copy.deepcopy(net)
    opt = optimizer(net.parameters(), lr=LR, weight_decay=0.0, **opt_kw)
    for t, (x, y) in enumerate(data):
        for g in opt.param_groups:
            g["lr"] = lr_at(t)
        opt.zero_grad()
        loss_of(net, x, y).backward()
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
        opt.step()
        lr, lam = lr_at(t), WD * mult_at(t)
        with torch.no_grad():
            params = dict(net.named_parameters())
            decayed = [n for n in params if n in DECAYED]
            if mode == "relative":
                s = {"params": {n: params[n] for n in decayed}, "grad": {n: grads[n] for n in decayed}}.get(
                    source, {n: params[n] - before[n] for n in decayed}
                )
                numel = sum(v.numel() for v in s.values())
                if metric == "mean_abs":
                    m = sum(float(v.abs().sum()) for v in s.values()) / numel
                else:
                    m = math.sqrt(sum(float(v.pow(2).sum()) for v in s.values()) / numel)
            for n in decayed:
                p = params[n]
                step = {"decoupled": lr * lam, "independent": lam, "lr_ratio": lam * lr / LR}.get(mode)
                if mode == "relative":
                    step = lr * lam * m
                moved_to_zero = ((p - before[n]) * before[n] < 0).to(p.dtype)
                mask = moved_to_zero if cautious else torch.ones_like(p)
                if ord == 2:
                    new = p * (1 - step * mask)
                else:
                    shrunk = torch.sign(p) * torch.clamp(p.abs() - step, min=0)
                    new = p + mask * (shrunk - p)
                p.copy_(new)
    return {n: p.detach() for n, p in net.named_parameters()}


def run_engine(net: nn.Module, data: list, *, optimizer=torch.optim.SGD, lr_at=lambda t: LR, opt_kw=None, **kw):
    opt = optimizer(lwd.build_param_groups(net, lwd.presets.standard(WD)), lr=LR, **(opt_kw or {}))
    engine = lwd.WeightDecay(opt, **kw)
    for t, (x, y) in enumerate(data):
        for g in opt.param_groups:
            g["lr"] = lr_at(t)
        opt.zero_grad()
        loss_of(net, x, y).backward()
        opt.step()
    return engine, opt


MODES = [
    dict(mode="decoupled"),
    dict(mode="independent"),
    dict(mode="lr_ratio"),
    dict(mode="relative"),
    dict(mode="relative", source="grad", metric="rms"),
    dict(mode="relative", source="update"),
    dict(mode="decoupled", ord=1),
    dict(mode="decoupled", cautious=True),
    dict(mode="independent", ord=1, cautious=True),
]


@pytest.mark.parametrize("kw", MODES, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_each_mode_matches_the_formula_in_a_plain_loop(kw):
    net, data = model(), batches()
    lr_at = lambda t: LR / (1 + t)  # noqa: E731 - a decaying lr, so lr_ratio differs from decoupled
    expected = reference(net, data, lr_at=lr_at, **kw)
    run_engine(net, data, lr_at=lr_at, **kw)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-7, msg=n)


def test_adamw_with_lambda_in_its_groups_is_decayed_once_by_the_engine():
    """AdamW's own decay is off during its step (else the weights would be decayed twice)."""
    net, data = model(), batches()
    expected = reference(net, data, optimizer=torch.optim.AdamW)
    engine, opt = run_engine(net, data, optimizer=torch.optim.AdamW)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-7, msg=n)
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups} == {"no_decay": 0.0, "decay": WD}
    assert engine.steps == len(data)


def test_schedule_multiplies_lambda_and_cosine_needs_a_length():
    net, data = model(), batches()
    cos = schedules.Cosine(start=1.0, end=0.0)
    expected = reference(net, data, mult_at=lambda t: 0.5 * (1 + math.cos(math.pi * min(t, 4) / 4)))
    run_engine(net, data, schedule=cos, total_steps=4)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-7, msg=n)
    with pytest.raises(ValueError, match=r"`schedule`.*total_steps="):
        lwd.WeightDecay(torch.optim.SGD(model().parameters(), lr=LR), schedule=cos)


def test_grad_scaler_skips_the_decay_with_the_step():
    net = model()
    opt = torch.optim.SGD(lwd.build_param_groups(net, lwd.presets.standard(WD)), lr=LR)
    lwd.WeightDecay(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    x, y = batches(1)[0]
    scaler.scale(loss_of(net, x, y)).backward()
    net[0].weight.grad[0, 0] = math.inf  # an overflow: the scaler skips the step
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    scaler.step(opt)
    scaler.update()
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]), n
    opt.zero_grad()
    scaler.scale(loss_of(net, x, y)).backward()
    grad = net[0].weight.grad.detach().clone() / scaler.get_scale()
    scaler.step(opt)
    torch.testing.assert_close(net[0].weight.detach(), (before["0.weight"] - LR * grad) * (1 - LR * WD))


def test_a_fused_optimizer_step_the_scaler_skips_is_neither_decayed_nor_counted():
    """A fused optimizer is stepped by the scaler even on overflow (it skips itself, told by
    ``found_inf``): such a step must not advance the λ schedule either."""
    net = model()
    opt = torch.optim.AdamW(lwd.build_param_groups(net, lwd.presets.standard(WD)), lr=LR, fused=True)
    engine = lwd.WeightDecay(opt, schedule=schedules.LinearWarmup(warmup_steps=4))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    data = batches(3)
    for step, (x, y) in enumerate(data):
        opt.zero_grad()
        scaler.scale(loss_of(net, x, y)).backward()
        if step == 1:
            net[0].weight.grad[0, 0] = math.inf  # an overflow: the scaler skips the step
            before = {n: p.detach().clone() for n, p in net.named_parameters()}
        if step == 2:
            before = {n: p.detach().clone() for n, p in net.named_parameters()}
            grad = net[0].weight.grad.detach().clone() / scaler.get_scale()
            state = copy.deepcopy(opt.state[net[0].weight])
        scaler.step(opt)
        scaler.update()
        if step == 1:
            for n, p in net.named_parameters():
                assert torch.equal(p, before[n]), n
    assert engine.steps == 2
    assert engine.state_dict()["steps"] == 2
    # the third batch is the second real step (one counted before it): warm-up multiplier 1/4, after
    # AdamW's own update (by hand)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    m = beta1 * state["exp_avg"] + (1 - beta1) * grad
    v = beta2 * state["exp_avg_sq"] + (1 - beta2) * grad * grad
    t = int(state["step"]) + 1
    adam = before["0.weight"] - LR * (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
    torch.testing.assert_close(net[0].weight.detach(), adam * (1 - LR * WD * 1 / 4), rtol=1e-5, atol=1e-7)


def test_lambda_is_the_groups_own_weight_decay_outside_the_step_and_zero_inside():
    net = model()
    opt = torch.optim.AdamW(lwd.build_param_groups(net, lwd.presets.standard(WD)), lr=LR)
    lwd.WeightDecay(opt)
    seen = []

    def closure():
        seen.append([g["weight_decay"] for g in opt.param_groups])
        opt.zero_grad()
        loss = loss_of(net, *batches(1)[0])
        loss.backward()
        return loss

    opt.step(closure)
    assert seen == [[0.0, 0.0]]  # the optimizer's own update carries no decay
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, WD]


def test_an_exception_inside_the_step_leaves_lambda_in_place():
    net = model()
    opt = torch.optim.SGD(lwd.build_param_groups(net, lwd.presets.standard(WD)), lr=LR)
    lwd.WeightDecay(opt)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}

    def closure():
        raise RuntimeError("loss is NaN")

    with pytest.raises(RuntimeError, match="NaN"):
        opt.step(closure)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, WD]
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]), n


def test_a_lambda_written_during_training_is_followed_at_the_next_step():
    """A DINO-style schedule writes the group's weight_decay: the next step uses it, once."""
    net, data = model(), batches(2)
    opt = torch.optim.SGD(lwd.build_param_groups(net, lwd.presets.standard(WD)), lr=LR)
    engine = lwd.WeightDecay(opt)
    x, y = data[0]
    loss_of(net, x, y).backward()
    opt.step()
    opt.param_groups[1]["weight_decay"] = 0.9
    opt.zero_grad()
    loss_of(net, *data[1]).backward()
    before = net[0].weight.detach().clone()
    grad = net[0].weight.grad.detach().clone()
    opt.step()
    torch.testing.assert_close(net[0].weight.detach(), (before - LR * grad) * (1 - LR * 0.9))
    assert engine.metrics()["decay/weight_decay"] == 0.9


_OPTIMIZERS = {
    "SGD": lambda groups: torch.optim.SGD(groups, lr=LR, momentum=0.9),
    "AdamW": lambda groups: torch.optim.AdamW(groups, lr=LR),
}


class _ScheduledReference:
    """The optimizer without decay over a copy of ``net``, then ``p <- p (1 - lr λ_t)`` on the tensors of
    ``opt``'s decayed group (its second): the documented decay of a λ schedule, written out."""

    def __init__(self, optimizer: str, net: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.net = copy.deepcopy(net)
        self.opt = _OPTIMIZERS[optimizer]([{"params": [p], "weight_decay": 0.0} for p in self.net.parameters()])
        decayed = {id(p) for p in opt.param_groups[1]["params"]}
        self.decayed = [q for p, q in zip(net.parameters(), self.net.parameters(), strict=True) if id(p) in decayed]

    def step(self, x: torch.Tensor, y: torch.Tensor, lam: float) -> None:
        self.opt.zero_grad()
        loss_of(self.net, x, y).backward()
        self.opt.step()
        with torch.no_grad():
            for q in self.decayed:
                q.mul_(1 - LR * lam)


@pytest.mark.parametrize("written", [0.0, 0.05, 0.9])
@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
def test_a_lambda_written_inside_the_closure_is_that_steps_lambda_applied_once(optimizer, written):
    """Lightning runs training_step, backward and on_before_optimizer_step inside `optimizer.step(closure)`:
    a λ schedule written there is the λ of that step, the optimizer's own update still carries no decay,
    and the written value (0.0 too) stays in the group afterwards."""
    net, data = model(), batches(3)
    opt = _OPTIMIZERS[optimizer](lwd.build_param_groups(net, lwd.presets.standard(WD)))
    lwd.WeightDecay(opt)
    reference = _ScheduledReference(optimizer, net, opt)
    seen = []
    for step, (x, y) in enumerate(data):
        lam = WD if step == 0 else written

        def closure(x=x, y=y, lam=lam):
            opt.zero_grad()
            loss = loss_of(net, x, y)
            loss.backward()
            opt.param_groups[1]["weight_decay"] = lam  # a schedule in on_before_optimizer_step
            return loss

        opt.step(closure)
        seen.append(opt.param_groups[1]["weight_decay"])
        reference.step(x, y, lam)
    for p, q in zip(net.parameters(), reference.net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
    assert seen == [WD, written, written]
    assert opt.param_groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize("where", ["pre-hook-after-engine", "pre-hook-before-engine", "global-pre-hook"])
@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
def test_a_lambda_written_by_an_optimizer_step_pre_hook_is_that_steps_lambda_applied_once(optimizer, where):
    """A λ schedule run as a step pre-hook (registered before or after the engine, or for every optimizer)
    writes the group's λ after the engine took it out: that value is this step's λ, decayed once by the
    engine, and the optimizer's own update still reads 0 (SGD would otherwise add it to the gradient)."""
    net, data = model(), batches(4)
    opt = _OPTIMIZERS[optimizer](lwd.build_param_groups(net, lwd.presets.standard(WD)))
    lambdas = [WD * (1 + t) / 2 for t in range(len(data))]
    steps = iter(lambdas)

    def schedule(o, args, kwargs):
        if o is opt:
            o.param_groups[1]["weight_decay"] = next(steps)

    if where == "pre-hook-before-engine":
        opt.register_step_pre_hook(schedule)
    lwd.WeightDecay(opt)
    if where == "global-pre-hook":
        handle = register_optimizer_step_pre_hook(schedule)
    elif where == "pre-hook-after-engine":
        handle = opt.register_step_pre_hook(schedule)
    reference = _ScheduledReference(optimizer, net, opt)
    try:
        for (x, y), lam in zip(data, lambdas, strict=True):
            opt.zero_grad()
            loss_of(net, x, y).backward()
            opt.step()
            reference.step(x, y, lam)
    finally:
        if where != "pre-hook-before-engine":
            handle.remove()
    for p, q in zip(net.parameters(), reference.net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
    assert opt.param_groups[1]["weight_decay"] == lambdas[-1]  # the value written stays in the group


def test_a_step_above_one_is_clamped_with_one_warning_and_never_flips_signs():
    net = model()
    opt = torch.optim.SGD(lwd.build_param_groups(net, lwd.presets.standard(5.0)), lr=0.5)
    lwd.WeightDecay(opt)
    with pytest.warns(UserWarning, match=r"'decay'.*lr=0.5, weight_decay=5.0.*clamped"):
        for x, y in batches(2):
            opt.zero_grad()
            loss_of(net, x, y).backward()
            opt.step()
    assert torch.count_nonzero(net[0].weight) == 0  # zeroed, not sign-flipped (1 - 2.5 = -1.5)


def test_relative_mode_skips_a_group_whose_measure_is_not_finite():
    net = model()
    opt = torch.optim.SGD(lwd.build_param_groups(net, lwd.presets.standard(WD)), lr=LR)
    lwd.WeightDecay(opt, mode="relative", source="grad")
    loss_of(net, *batches(1)[0]).backward()
    net[0].weight.grad[0, 0] = math.nan
    before = net[2].weight.detach().clone()
    grad = net[2].weight.grad.detach().clone()
    opt.step()
    torch.testing.assert_close(net[2].weight.detach(), before - LR * grad, rtol=0, atol=1e-7)  # not decayed
    assert torch.isfinite(net[2].weight).all()


def test_groups_added_and_renamed_later_are_followed():
    net = model()
    head = nn.Linear(2, 2)
    groups = lwd.build_param_groups(net, lwd.presets.standard(WD))
    opt = torch.optim.SGD(groups, lr=LR)
    engine = lwd.WeightDecay(opt)
    opt.add_param_group({"params": [head.weight], "param_names": ["head.weight"], "name": "head", "weight_decay": 0.5})
    (loss_of(net, *batches(1)[0]) + head(torch.ones(1, 2)).sum()).backward()
    before, grad = head.weight.detach().clone(), head.weight.grad.detach().clone()
    opt.step()
    torch.testing.assert_close(head.weight.detach(), (before - LR * grad) * (1 - LR * 0.5))
    opt.param_groups[1]["name"] = "matrices"
    assert "matrices/weight_decay" in engine.metrics() and "head/weight_decay" in engine.metrics()


def test_rules_decay_a_raw_group_and_refuse_its_own_lambda_with_the_whole_fix():
    net, data = model(), batches()
    expected = reference(net, data)
    opt = torch.optim.SGD(net.parameters(), lr=LR)  # raw parameters, weight_decay 0
    lwd.WeightDecay(opt, rules=lwd.presets.standard(WD), module=net)
    for x, y in data:
        opt.zero_grad()
        loss_of(net, x, y).backward()
        opt.step()
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-7, msg=n)
    raw = torch.optim.AdamW(net.parameters(), lr=LR)  # AdamW's default weight_decay=0.01
    with pytest.raises(ValueError, match=r"weight_decay`=0.01.*build_param_groups.*weight_decay=0.0"):
        lwd.WeightDecay(raw, rules=lwd.presets.standard(WD), module=net)
    assert "step" not in raw.__dict__ and raw.param_groups[0]["weight_decay"] == 0.01


def test_remove_restores_the_step_and_lr_schedulers_on_either_side_keep_working():
    net = model()
    opt = torch.optim.SGD(lwd.build_param_groups(net, lwd.presets.standard(WD)), lr=LR)
    early = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # wraps opt.step first
    engine = lwd.WeightDecay(opt)
    late = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)  # wraps the engine's step
    loss_of(net, *batches(1)[0]).backward()
    before, grad = net[0].weight.detach().clone(), net[0].weight.grad.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        opt.step()
        early.step()
        late.step()
    torch.testing.assert_close(net[0].weight.detach(), (before - LR * grad) * (1 - LR * WD))
    engine.remove()
    before = net[0].weight.detach().clone()
    opt.step()  # through the late scheduler's wrapper, then straight through the removed engine
    lr = opt.param_groups[1]["lr"]  # the optimizer applies its own (coupled) decay again: λ never left the group
    torch.testing.assert_close(net[0].weight.detach(), before - lr * (grad + WD * before))
    assert not engine.attached


def test_wrappers_of_lightning_and_fabric_are_unwrapped():
    from lightning.pytorch.core.optimizer import LightningOptimizer

    opt = torch.optim.SGD(model().parameters(), lr=LR)
    assert lwd.WeightDecay(LightningOptimizer(opt)).optimizer is opt
    with pytest.raises(TypeError, match=r"`optimizer` must be a torch\.optim\.Optimizer"):
        lwd.WeightDecay(torch.optim.lr_scheduler.StepLR(opt, 1))


@pytest.mark.skipif(not cpu_backward_supports(torch.half), reason="this torch has no half backward on CPU")
def test_half_after_setup_rebuilds_and_warns_that_the_decay_rounds_away():
    net = model()
    opt = torch.optim.SGD(lwd.build_param_groups(net, lwd.presets.standard(1e-5)), lr=1e-3)
    lwd.WeightDecay(opt)
    net.half()
    loss_of(net, *(t.half() for t in batches(1)[0])).backward()
    with pytest.warns(UserWarning, match="rounds to nothing"):
        opt.step()


def test_metrics_are_measured_when_called():
    net = model()
    opt = torch.optim.SGD(lwd.build_param_groups(net, lwd.presets.standard(WD)), lr=LR)
    engine = lwd.WeightDecay(opt, track_updates=True)
    loss_of(net, *batches(1)[0]).backward()
    before = [p.detach().clone() for p in opt.param_groups[1]["params"]]
    opt.step()
    after = opt.param_groups[1]["params"]
    m = engine.metrics(grad_norm=True)
    norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in after))
    assert m["decay/param_norm"] == pytest.approx(norm, rel=1e-6)
    assert m["decay/weight_decay"] == WD and m["decay/timescale"] == pytest.approx(1 / (LR * WD))
    update = math.sqrt(
        sum(float((a.detach() / (1 - LR * WD) - b).double().pow(2).sum()) for a, b in zip(after, before, strict=True))
    )
    assert m["decay/update_norm"] == pytest.approx(update, rel=1e-4)
    grads = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in after))
    assert m["decay/grad_norm"] == pytest.approx(grads, rel=1e-6)


def test_state_dict_round_trips_and_refuses_what_it_did_not_write():
    net = model()
    opt = torch.optim.SGD(lwd.build_param_groups(net, lwd.presets.standard(WD)), lr=LR)
    engine = lwd.WeightDecay(opt, schedule=schedules.Cosine(), total_steps=10)
    loss_of(net, *batches(1)[0]).backward()
    opt.step()
    state = engine.state_dict()
    assert state == {"version": 2, "steps": 1, "total_steps": 10}
    other = lwd.WeightDecay(torch.optim.SGD(model().parameters(), lr=LR))
    other.load_state_dict(state)
    assert other.steps == 1
    for bad, error in [({"version": 2, "steps": -1}, TypeError), ({"steps": 3}, ValueError), ([1], TypeError)]:
        with pytest.raises(error, match="`state_dict"):
            other.load_state_dict(bad)
    assert other.steps == 1


def test_legacy_checkpoint_groups_get_their_lambda_back():
    net = model()
    groups = lwd.build_param_groups(net, lwd.presets.standard(WD))
    opt = torch.optim.SGD(groups, lr=LR)
    opt.param_groups[1].update({"weight_decay": 0.0, "lwd_weight_decay": WD, "lwd_planned_weight_decay": WD})
    lwd.WeightDecay(opt)
    assert opt.param_groups[1]["weight_decay"] == WD
    assert not any(k in opt.param_groups[1] for k in ("lwd_weight_decay", "lwd_planned_weight_decay"))


def test_plain_pytorch_use_does_not_import_lightning():
    code = (
        "import sys, torch, lightning_wd as lwd\n"
        "m = torch.nn.Linear(2, 2)\n"
        "opt = torch.optim.AdamW(lwd.build_param_groups(m), lr=1e-3)\n"
        "e = lwd.WeightDecay(opt)\n"
        "m(torch.ones(1, 2)).sum().backward(); opt.step(); e.metrics(); e.remove()\n"
        "assert not [k for k in sys.modules if k == 'lightning' or k.startswith('lightning.')], 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------- bad input: named, with the fix, nothing touched
def _sgd() -> torch.optim.Optimizer:
    return torch.optim.SGD(lwd.build_param_groups(model(), lwd.presets.standard(WD)), lr=LR)


def _bad_group() -> torch.optim.Optimizer:
    opt = _sgd()
    opt.param_groups[1]["weight_decay"] = "0.1"
    return opt


def _lr0() -> torch.optim.Optimizer:
    opt = _sgd()
    opt.param_groups[1]["lr"] = 0.0
    return opt


ENGINE_ROWS = [
    ("optimizer", dict(optimizer=[1]), TypeError, "Pass the optimizer itself"),
    ("optimizer", dict(optimizer=_bad_group), ValueError, r"'0.1'.*Set it to a float"),
    ("optimizer", dict(optimizer=_lr0, mode="lr_ratio"), ValueError, "`mode`='lr_ratio'.*Start the group"),
    ("mode", dict(mode="adamw"), ValueError, "use any of the following: 'decoupled'"),
    ("rules", dict(rules="standard"), TypeError, r"Pass for example lwd\.presets\.standard"),
    ("rules", dict(rules=lwd.presets.standard(WD)), ValueError, r"pass `module=model`"),
    ("module", dict(module=3), TypeError, "Pass the model"),
    ("plan_options", dict(plan_options={"bogus": 1}), TypeError, "use any of the following"),
    ("ord", dict(ord=3), ValueError, "use any of the following: 1, 2"),
    ("cautious", dict(cautious="yes"), TypeError, "Pass a bool"),
    ("source", dict(mode="relative", source="loss"), ValueError, "use any of the following"),
    ("source", dict(source="grad"), ValueError, "Use mode='relative' or drop them"),
    ("metric", dict(mode="relative", metric="l2"), ValueError, "use any of the following"),
    ("schedule", dict(schedule=0.5), TypeError, r"for example\s+lwd\.schedules\.Cosine"),
    ("schedule", dict(schedule=lambda t: -1.0), ValueError, "Fix the schedule"),
    ("schedule", dict(schedule=schedules.Cosine()), ValueError, "pass `total_steps=`"),
    ("total_steps", dict(total_steps=0), ValueError, "Pass for example total_steps="),
    ("track_updates", dict(track_updates=1), TypeError, "Pass a bool"),
    ("track_diagnostics", dict(track_diagnostics="on"), TypeError, "Pass a bool"),
    ("fused", dict(fused=1), TypeError, "Pass a bool"),
    ("fused", dict(fused=True), ValueError, r"needs cautious=True.*Pass cautious=True"),
    ("fused", dict(fused=True, cautious=True, toward="init"), ValueError, r"without `toward`.*or drop fused"),
    (
        "fused",
        dict(fused=True, mode="relative", metric="rms"),
        ValueError,
        r"metric=.mean_abs.*got.*metric=.rms.*drop fused",
    ),
    ("toward", dict(toward="pretrained"), ValueError, "use 'init'"),
    ("toward", dict(toward=[1.0]), TypeError, r"Pass 'init' or for example `pretrained\.state_dict\(\)`"),
    ("toward", dict(toward="init", mode="relative"), ValueError, "Use mode='decoupled'"),
    ("toward", dict(toward={"missing": torch.zeros(1)}), ValueError, "no reference of the right shape"),
    ("timescale_fraction", dict(timescale_fraction=0.0, total_steps=10), ValueError, "timescale_fraction=0.25"),
    ("timescale_fraction", dict(timescale_fraction=0.5, ord=1, total_steps=10), ValueError, "Use ord=2"),
    ("timescale_fraction", dict(timescale_fraction=0.5), ValueError, "pass `total_steps=`"),
]


@pytest.mark.parametrize(("argument", "kwargs", "error", "match"), ENGINE_ROWS)
def test_bad_engine_arguments_are_refused_by_name_and_leave_the_optimizer_as_it_was(argument, kwargs, error, match):
    kwargs = dict(kwargs)
    opt = kwargs.pop("optimizer", _sgd)
    opt = opt() if callable(opt) else opt
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in getattr(opt, "param_groups", [])])
    with pytest.raises(error, match=match) as info:
        lwd.WeightDecay(opt, **kwargs)
    assert f"`{argument}" in str(info.value) or argument == "optimizer", str(info.value)
    if isinstance(opt, torch.optim.Optimizer):
        assert "step" not in opt.__dict__  # not attached
        assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups


def test_every_engine_argument_has_a_row():
    import inspect

    public = {n for n in inspect.signature(lwd.WeightDecay).parameters if not n.startswith("_")}
    assert public == {row[0] for row in ENGINE_ROWS}


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda e: e.metrics(grad_norm="yes"), TypeError, "`grad_norm` must be True or False"),
        (lambda e: e.metrics(param_norm=None), TypeError, "`param_norm` must be True or False"),
        (lambda e: e.load_state_dict({"version": 2, "steps": 1.5}), TypeError, r"`state_dict\['steps'\]`"),
        (lambda e: e.load_state_dict({"version": 2, "total_steps": 0}), TypeError, r"`state_dict\['total_steps'\]`"),
        (lambda e: e.load_state_dict({"version": 1, "steps": [3]}), ValueError, "not written by WeightDecay"),
    ],
)
def test_bad_method_arguments_are_refused_and_change_nothing(call, error, match):
    engine = lwd.WeightDecay(_sgd())
    with pytest.raises(error, match=match):
        call(engine)
    assert engine.steps == 0 and engine.attached


def test_a_non_finite_step_or_lambda_is_skipped_with_a_warning_and_never_written_into_the_weights():
    net = model()
    opt = torch.optim.SGD(lwd.build_param_groups(net, lwd.presets.standard(WD)), lr=LR)
    lwd.WeightDecay(opt, mode="independent", schedule=lambda t: 1.0 if t == 0 else math.inf)
    for t, match in enumerate([None, r"'decay' has step inf.*Check the lr schedule", r"`weight_decay`=nan.*Set it"]):
        if t == 2:
            opt.param_groups[1]["weight_decay"] = math.nan  # written by a user's schedule gone wrong
        opt.zero_grad()
        loss_of(net, *batches(1)[0]).backward()
        before, grad = net[0].weight.detach().clone(), net[0].weight.grad.detach().clone()
        if match is None:
            opt.step()
            continue
        with pytest.warns(UserWarning, match=match):
            opt.step()
        torch.testing.assert_close(net[0].weight.detach(), before - LR * grad, rtol=0, atol=1e-7)


def test_a_deep_copy_of_the_optimizer_steps_its_own_parameters_without_the_engine():
    net = model()
    opt = torch.optim.SGD(lwd.build_param_groups(net, lwd.presets.standard(WD)), lr=LR)
    lwd.WeightDecay(opt)
    twin = copy.deepcopy(opt)
    for p in twin.param_groups[1]["params"]:
        p.grad = torch.ones_like(p)
    original = net[0].weight.detach().clone()
    before = twin.param_groups[1]["params"][0].detach().clone()
    twin.step()  # SGD's own update with its own (coupled) decay, on the copy's tensors only
    assert torch.equal(net[0].weight.detach(), original)
    torch.testing.assert_close(twin.param_groups[1]["params"][0].detach(), before - LR * (1 + WD * before))


@pytest.mark.usefixtures("without_c_loops")
def test_fused_cautious_falls_back_to_foreach_once_compiling_fails_and_decays_each_tensor_once(monkeypatch):
    """A compiler failure part-way through a step: one warning, the rest on the foreach path, nothing twice."""
    from lightning_wd import functional as F

    calls = []

    def kernel(p, b, step, soft):
        calls.append(p.numel())
        if len(calls) == 2:  # the second tensor of the first step: as a failing C++ compiler would
            raise RuntimeError("InductorError: C++ compile error\nmore detail")
        F._cautious_kernel(p, b, step, soft)

    monkeypatch.setitem(F._FUSED, "kernel", kernel)
    monkeypatch.setitem(F._FUSED, "failed", None)
    monkeypatch.setitem(F._FUSED, "warned", False)
    net, data = model(), batches()
    expected = reference(net, data, cautious=True)
    with pytest.warns(UserWarning, match=r"fused=True could not compile.*RuntimeError: InductorError.*same result"):
        run_engine(net, data, cautious=True, fused=True)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-7, msg=n)
    assert len(calls) == 2  # never tried again after the failure
    assert F._FUSED["failed"].startswith("RuntimeError: InductorError")


def _counting_kernel(calls: list, fail_at: int | None = None):
    """A stand-in for the compiled kernel: the same formula run eagerly, each call counted."""
    from lightning_wd import functional as F

    def kernel(p, b, step, soft):
        calls.append(p.numel())
        if len(calls) == fail_at:
            raise RuntimeError("InductorError: C++ compile error")
        F._cautious_kernel(p, b, step, soft)

    return kernel


@pytest.mark.usefixtures("without_c_loops")
@pytest.mark.parametrize(("threshold", "fused"), [(36, True), (37, False)], ids=["large-enough", "too-small"])
def test_the_default_fused_none_takes_the_kernel_only_for_cpu_groups_large_enough_to_repay_it(
    monkeypatch, threshold, fused
):
    """``fused=None``: the decayed group (36 elements here) takes the kernel from ``_AUTO_FUSED_NUMEL`` elements."""
    from lightning_wd import functional as F

    calls: list[int] = []
    monkeypatch.setitem(F._FUSED, "kernel", _counting_kernel(calls))
    monkeypatch.setitem(F._FUSED, "failed", None)
    monkeypatch.setattr(F, "_AUTO_FUSED_NUMEL", threshold)
    net, data = model(), batches()
    expected = reference(net, data, cautious=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine, _ = run_engine(net, data, cautious=True)
    assert engine.options.fused is None
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-7, msg=n)
    assert sum(calls) == (36 * len(data) if fused else 0)


@pytest.mark.usefixtures("without_c_loops")
def test_the_default_falls_back_quietly_and_a_later_fused_true_is_told_why(monkeypatch):
    """A failed compile under ``fused=None`` is not a warning (nobody asked for it); ``fused=True`` then says why."""
    from lightning_wd import functional as F

    calls: list[int] = []
    monkeypatch.setitem(F._FUSED, "kernel", _counting_kernel(calls, fail_at=1))
    monkeypatch.setitem(F._FUSED, "failed", None)
    monkeypatch.setitem(F._FUSED, "warned", False)
    monkeypatch.setattr(F, "_AUTO_FUSED_NUMEL", 1)
    net, data = model(), batches()
    expected = reference(net, data, cautious=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_engine(net, data, cautious=True)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-7, msg=n)
    assert calls == [24]  # tried once, on the first tensor; never again
    with pytest.warns(UserWarning, match=r"fused=True could not compile.*InductorError"):
        run_engine(model(), data, cautious=True, fused=True)
    assert calls == [24]


@pytest.mark.usefixtures("without_c_loops")
def test_the_default_does_not_compile_without_a_cpp_compiler(monkeypatch):
    """No C++ compiler on the machine: ``fused=None`` never calls torch.compile, and says nothing."""
    from lightning_wd import functional as F

    monkeypatch.setitem(F._FUSED, "kernel", None)
    monkeypatch.setitem(F._FUSED, "failed", None)
    monkeypatch.setattr(F, "_AUTO_FUSED_NUMEL", 1)
    monkeypatch.setattr(F.shutil, "which", lambda name: None)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile was called"))
    net, data = model(), batches()
    expected = reference(net, data, cautious=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_engine(net, data, cautious=True)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-7, msg=n)
    assert "no C++ compiler" in F._FUSED["failed"]


def _counting_abs_sum(calls: list, fail_at: int | None = None):
    """A stand-in for the compiled measure: the same formula run eagerly, each call's length counted."""
    from lightning_wd import functional as F

    def kernel(x):
        calls.append(x.numel())
        if len(calls) == fail_at:
            raise RuntimeError("InductorError: C++ compile error")
        return F._abs_sum_kernel(x)

    return kernel


@pytest.mark.usefixtures("without_c_loops")
@pytest.mark.parametrize("source", ["params", "update", "grad"])
def test_fused_relative_measures_every_tensor_by_the_kernel(monkeypatch, source):
    """``fused=True``: m is the documented mean |x|, each decayed tensor measured by one call of the kernel."""
    from lightning_wd import functional as F

    calls: list[int] = []
    monkeypatch.setattr(F, "_ROW", 5)  # the decayed tensors (24 and 12 elements): rows of 5 and a rest
    monkeypatch.setitem(F._FUSED, "abs_sum", _counting_abs_sum(calls))
    monkeypatch.setitem(F._FUSED, "failed", None)
    net, data = model(), batches()
    expected = reference(net, data, mode="relative", source=source)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_engine(net, data, mode="relative", source=source, fused=True)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-7, msg=n)
    assert calls == [24, 12] * len(data)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("numel", [0, 3, 4096, 4096 * 3 + 7])
def test_the_measure_kernel_sums_rows_and_the_rest(dtype, numel):
    """``_abs_sum_kernel`` (run eagerly) against float64 sums, at sizes around its rows of 4,096."""
    from lightning_wd import functional as F

    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel), dtype=torch.float64)
    total = F._abs_sum_kernel(x.to(dtype))
    assert total.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = float(x.to(dtype).double().abs().sum())
    assert float(total) == pytest.approx(expected, rel=1e-6, abs=1e-6)


@pytest.mark.usefixtures("without_c_loops")
@pytest.mark.parametrize(("threshold", "fused"), [(36, True), (37, False)], ids=["large-enough", "too-small"])
def test_the_default_measures_relative_by_the_kernel_only_for_cpu_groups_large_enough(monkeypatch, threshold, fused):
    """``fused=None``: the decayed group (36 elements) is measured by the kernel from ``_AUTO_FUSED_NUMEL`` elements."""
    from lightning_wd import functional as F

    calls: list[int] = []
    monkeypatch.setitem(F._FUSED, "abs_sum", _counting_abs_sum(calls))
    monkeypatch.setitem(F._FUSED, "failed", None)
    monkeypatch.setattr(F, "_AUTO_FUSED_NUMEL", threshold)
    net, data = model(), batches()
    expected = reference(net, data, mode="relative")
    run_engine(net, data, mode="relative")
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-7, msg=n)
    assert calls == ([24, 12] * len(data) if fused else [])


@pytest.mark.usefixtures("without_c_loops")
def test_a_failed_compile_of_the_measure_falls_back_with_one_warning_and_the_same_decay(monkeypatch):
    """The kernel fails on the second tensor of the first step: that step's m is measured again eagerly."""
    from lightning_wd import functional as F

    calls: list[int] = []
    monkeypatch.setitem(F._FUSED, "abs_sum", _counting_abs_sum(calls, fail_at=2))
    monkeypatch.setitem(F._FUSED, "failed", None)
    monkeypatch.setitem(F._FUSED, "warned", False)
    net, data = model(), batches()
    expected = reference(net, data, mode="relative")
    with pytest.warns(UserWarning, match=r"could not compile the measure's kernel.*InductorError.*eager path") as seen:
        run_engine(net, data, mode="relative", fused=True)
    assert len([w for w in seen if "could not compile" in str(w.message)]) == 1
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-7, msg=n)
    assert calls == [24, 12]  # never tried again
