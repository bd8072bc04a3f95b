"""AdamC's corrected decay, λ from a timescale, decay toward a reference, and the diagnostics.

Every formula is checked against a plain loop written here: SGD's update ``p - η g`` in float64,
then the documented decay step, tensor by tensor, never through ``lightning_wd``:

* ``corrected`` (AdamC, Defazio 2025): ``p <- p (1 - λ η_t² / η_max)``;
* ``toward``: ``p <- p - s (p - p0)``, or the soft threshold of ``p - p0`` for ``ord=1``, ``cautious``
  only where ``(p_new - p_old)(p_old - p0) < 0``;
* ``timescale_fraction``: ``λ = 1 / (fraction · total_steps · η)``, computed by hand;
* diagnostics: ``‖Δp‖ / ‖p‖`` and ``acos(<p_old, p_new> / (‖p_old‖ ‖p_new‖))`` in float64.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn

import lightning_wd as lwd
from lightning_wd import _plotting
from lightning_wd import functional as F
from lightning_wd.__main__ import main as cli
from tests.callback_helpers import WDNet, loader, trainer

LR, WD = 0.1, 0.3
DECAYED = {"0.weight", "2.weight"}


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))


def batches(n: int = 6, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)) for _ in range(n)]


def lrs_of(scheduler: Any, n: int, **kw: Any) -> list[float]:
    """The lr torch's scheduler gives at each of ``n`` steps (on a throwaway optimizer)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR)
    sched = scheduler(opt, **kw)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def run_engine(net: nn.Module, data: list, scheduler: Any = None, sched_kw: Any = None, **engine_kw: Any) -> Any:
    """SGD over groups of the standard preset, with the engine attached; returns the engine."""
    opt = torch.optim.SGD(lwd.build_param_groups(net, lwd.presets.standard(WD)), lr=LR)
    sched = scheduler(opt, **(sched_kw or {})) if scheduler is not None else None
    engine = lwd.WeightDecay(opt, **engine_kw)
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return engine


def reference(
    net: nn.Module,
    data: list,
    lrs: list[float],
    step_of: Any,
    *,
    toward: dict[str, Tensor] | None = None,
    ord: int = 2,
    cautious: bool = False,
) -> dict[str, Tensor]:
    """The plain loop: ``p - η g``, then the documented decay of the decayed weights, in float64."""
    net = copy.deepcopy(net)
    refs = {n: (toward[n] if toward is not None else torch.zeros_like(p)).double() for n, p in net.named_parameters()}
    for t, (x, y) in enumerate(data):
        net.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        with torch.no_grad():
            for name, p in net.named_parameters():
                before = p.double()
                after = before - lrs[t] * p.grad.double()
                if name in DECAYED:
                    s, p0 = step_of(lrs[t]), refs[name]
                    d = after - p0
                    new = p0 + (d * (1 - s) if ord == 2 else d.sign() * (d.abs() - s).clamp(min=0))
                    if cautious:
                        new = torch.where((after - before) * (before - p0) < 0, new, after)
                    after = new
                p.copy_(after)
    return {n: p.detach() for n, p in net.named_parameters()}


def group(optimizer: Any, name: str) -> dict[str, Any]:
    (found,) = [g for g in optimizer.param_groups if g["name"] == name]
    return found


def assert_matches(net: nn.Module, expected: dict[str, Tensor]) -> None:
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------- corrected (AdamC)
def warmup_then_decay(t: int) -> float:
    return min(1.0, (t + 1) / 3) * 0.8**t


def test_corrected_mode_scales_the_decay_by_lr_squared_over_the_peak_lr():
    """With LambdaLR, η_max is the group's `initial_lr` (= LR): the step is λ η_t² / LR."""
    data, net = batches(6), model()
    lrs = [LR * warmup_then_decay(t) for t in range(6)]
    expected = reference(net, data, lrs, lambda lr: WD * lr * lr / LR)
    sched = torch.optim.lr_scheduler.LambdaLR
    run_engine(net, data, sched, dict(lr_lambda=warmup_then_decay), mode="corrected")
    assert_matches(net, expected)


def test_corrected_mode_takes_one_cycle_max_lr_as_the_peak():
    """OneCycleLR starts at max_lr / 25 and records `max_lr` in the group: that is η_max."""
    data, net = batches(6), model()
    kw = dict(max_lr=0.4, total_steps=6, cycle_momentum=False)  # (SGD here has no momentum to cycle)
    lrs = lrs_of(torch.optim.lr_scheduler.OneCycleLR, 6, **kw)
    assert lrs[0] == pytest.approx(0.4 / 25)
    expected = reference(net, data, lrs, lambda lr: WD * lr * lr / 0.4)
    run_engine(net, data, torch.optim.lr_scheduler.OneCycleLR, kw, mode="corrected")
    assert_matches(net, expected)


# ---------------------------------------------------------------- toward a reference (L2-SP)
@pytest.mark.parametrize("ord", [2, 1])
@pytest.mark.parametrize("cautious", [False, True])
@pytest.mark.parametrize("given", [False, True], ids=["init", "state_dict"])
def test_decay_toward_a_reference_matches_the_plain_loop(ord, cautious, given):
    data, net = batches(5), model()
    if given:  # weights of another model of the same architecture, named as the optimizer's groups name them
        toward = {n: p.detach().clone() for n, p in model(seed=7).named_parameters()}
    else:
        toward = {n: p.detach().clone() for n, p in net.named_parameters()}
    step = 0.05 if ord == 1 else LR * WD
    wd = 0.5 if ord == 1 else WD  # L1: a step of LR * 0.5 = 0.05, large enough to put coordinates on p0
    expected = reference(net, data, [LR] * 5, lambda lr: step, toward=toward, ord=ord, cautious=cautious)
    opt = torch.optim.SGD(lwd.build_param_groups(net, lwd.presets.standard(wd)), lr=LR)
    engine = lwd.WeightDecay(opt, ord=ord, cautious=cautious, toward=toward if given else "init")
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    assert_matches(net, expected)
    if ord == 1:  # the soft threshold put some coordinates exactly back on p0
        assert any((p.detach() == toward[n]).any() for n, p in net.named_parameters() if n in DECAYED)
    engine.remove()


def test_decay_toward_with_a_tensor_step_matches_the_formula():
    """A 0-dim tensor step (as a grad scaler's found_inf makes) gives the same result as a number."""
    p = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([[3.0]])]
    p0 = [torch.tensor([0.0, -1.0, 1.0]), torch.tensor([[1.0]])]
    expected = [torch.tensor([1.0 - 0.25 * 1.0, -2.0 - 0.25 * -1.0, 0.5 - 0.25 * -0.5]), torch.tensor([[3.0 - 0.5]])]
    F.apply_decay_toward_(p, p0, torch.tensor(0.25))
    for got, want in zip(p, expected, strict=True):
        torch.testing.assert_close(got, want)
    mask = [torch.tensor([1.0, 0.0, 1.0]), torch.tensor([[0.0]])]
    # p - p0 = [0.75, -0.75, -0.375]: 0.75 shrinks to 0.35, 0.375 < 0.4 lands on p0; masked coordinates are kept
    F.apply_decay_toward_(p, p0, 0.4, ord=1, mask=mask)
    torch.testing.assert_close(p[0], torch.tensor([0.35, -1.75, 1.0]))
    torch.testing.assert_close(p[1], torch.tensor([[2.5]]))


def test_reference_memory_is_one_copy_of_the_decayed_parameters():
    net = model()
    opt = torch.optim.SGD(lwd.build_param_groups(net, lwd.presets.standard(WD)), lr=LR)
    engine = lwd.WeightDecay(opt, toward="init")
    decayed = sum(p.numel() * p.element_size() for n, p in net.named_parameters() if n in DECAYED)
    assert decayed == (6 * 4 + 2 * 6) * 4
    assert engine.reference_nbytes == decayed
    assert lwd.WeightDecay(torch.optim.SGD(net.parameters(), lr=LR), toward=None).reference_nbytes == 0


def test_toward_state_round_trips_through_the_engine_state():
    net, data = model(), batches(4)
    opt = torch.optim.SGD(lwd.build_param_groups(net, lwd.presets.standard(WD)), lr=LR)
    engine = lwd.WeightDecay(opt, toward="init")
    init = {n: p.detach().clone() for n, p in net.named_parameters()}
    state = engine.state_dict()
    # keyed by position among the optimizer's parameters, as the optimizer's own state dict numbers them
    order = [n for g in opt.param_groups for n in g["param_names"]]
    at = {n: i for i, n in enumerate(order)}
    assert sorted(state["reference"]) == sorted(at[n] for n in DECAYED)
    torch.testing.assert_close(state["reference"][at["0.weight"]], init["0.weight"])
    torch.testing.assert_close(state["reference"][at["2.weight"]], init["2.weight"])
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    engine.remove()
    other = lwd.WeightDecay(opt, toward="init")  # takes the trained weights as p0 ...
    other.load_state_dict(state)  # ... until the saved ones are restored
    torch.testing.assert_close(other.state_dict()["reference"][at["2.weight"]], init["2.weight"])
    bad = {**state, "reference": {at["0.weight"]: torch.zeros(3)}}
    with pytest.raises(ValueError, match=r"`state_dict\['reference'\]\[\d\]` has shape \(3,\)"):
        other.load_state_dict(bad)
    torch.testing.assert_close(other.state_dict()["reference"][at["0.weight"]], init["0.weight"])  # nothing changed


# ---------------------------------------------------------------- λ from a timescale
def test_weight_decay_from_timescale_by_hand():
    assert lwd.weight_decay_from_timescale(0.25, lr=1e-3, total_steps=10_000) == pytest.approx(1 / 2.5)
    lam = lwd.weight_decay_from_timescale(0.1, lr=3e-4, total_steps=50_000)
    assert 1 / (3e-4 * lam) == pytest.approx(0.1 * 50_000)  # τ = 1 / (η λ) is the fraction of the run


@pytest.mark.parametrize(("mode", "expected"), [("decoupled", 1 / (0.5 * 40 * LR)), ("independent", 1 / (0.5 * 40))])
def test_timescale_fraction_sets_each_decayed_groups_lambda(mode, expected):
    net = model()
    opt = torch.optim.SGD(lwd.build_param_groups(net, lwd.presets.standard(WD)), lr=LR)
    engine = lwd.WeightDecay(opt, mode=mode, timescale_fraction=0.5, total_steps=40)
    assert group(opt, "decay")["weight_decay"] == pytest.approx(expected)
    assert group(opt, "no_decay")["weight_decay"] == 0.0  # no_decay stays undecayed
    assert engine.timescale_lambdas == {"decay": (LR if mode == "decoupled" else 1.0, pytest.approx(expected))}
    x, y = batches(1)[0]
    nn.functional.mse_loss(net(x), y).backward()
    opt.step()
    metrics = engine.metrics()
    assert metrics["decay/timescale"] == pytest.approx(20.0)  # 0.5 of the 40-step run
    assert metrics["decay/timescale_target"] == 20.0


def test_timescale_fraction_refuses_groups_decayed_by_rules():
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=LR, weight_decay=0.0)
    with pytest.raises(ValueError, match=r"`timescale_fraction` sets each decayed group's own.*build_param_groups"):
        lwd.WeightDecay(opt, rules=lwd.presets.standard(WD), module=net, timescale_fraction=0.5, total_steps=40)
    assert "step" not in opt.__dict__


# ---------------------------------------------------------------- diagnostics
def test_diagnostics_match_the_plain_formulas_and_cost_nothing_untracked(monkeypatch):
    calls = {"snapshot": 0, "angle": 0}
    snapshot, angle = lwd.WeightDecay._take_snapshot, F._angle

    def counted_snapshot(self: Any) -> None:
        calls["snapshot"] += 1
        snapshot(self)

    def counted_angle(*args: Any) -> Any:
        calls["angle"] += 1
        return angle(*args)

    monkeypatch.setattr(lwd.WeightDecay, "_take_snapshot", counted_snapshot)
    monkeypatch.setattr(F, "_angle", counted_angle)
    net, data = model(), batches(3)
    opt = torch.optim.SGD(lwd.build_param_groups(net, lwd.presets.standard(WD)), lr=1.0)
    engine = lwd.WeightDecay(opt)
    groups = {g["name"]: list(g["params"]) for g in opt.param_groups}
    for t, (x, y) in enumerate(data):
        engine.track_diagnostics = t == 1
        before = {k: torch.cat([p.detach().double().flatten() for p in ps]) for k, ps in groups.items()}
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        metrics = engine.metrics(diagnostics=True)
        assert metrics["decay/effective_decay"] == pytest.approx(1.0 * WD)
        assert metrics["no_decay/effective_decay"] == 0.0
        if t != 1:
            assert "decay/update_ratio" not in metrics and "decay/angular_update" not in metrics
            continue
        for name, ps in groups.items():
            a, b = before[name], torch.cat([p.detach().double().flatten() for p in ps])
            ratio = float((b - a).norm() / a.norm())
            cos = float(a @ b / (a.norm() * b.norm()))
            assert metrics[f"{name}/update_ratio"] == pytest.approx(ratio, rel=1e-4)
            assert metrics[f"{name}/angular_update"] == pytest.approx(math.acos(cos), rel=1e-3)
            assert metrics[f"{name}/angular_update"] > 1e-3
    assert calls == {"snapshot": 1, "angle": 2}  # only the tracked step: one snapshot, one angle per group


def test_angle_is_exact_for_small_angles():
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([1.0, 1e-4, 0.0])
    ratio, angle = F._angle([a], [b], None)
    assert float(angle) == pytest.approx(math.atan(1e-4), rel=1e-4)  # acos of the float32 cosine would give 0
    assert float(ratio) == pytest.approx(1e-4, rel=1e-4)


def test_diagnose_reads_timescale_and_norm_drift():
    series = {
        "param_norm": {"decay": ([0, 50, 80, 100], [10.0, 8.0, 7.0, 6.0]), "no_decay": ([80, 100], [2.0, 2.02])},
        "timescale": {"decay": ([0, 100], [500.0, 500.0])},
        "angular_update": {"decay": ([80, 100], [0.02, 0.02])},
        "effective_decay": {"decay": ([80, 100], [2e-4, 2e-4])},
    }
    report = _plotting.diagnose(series)
    assert "timescale 1/(η·λ) = 500 steps, 500% of the 100-step run: longer than the run" in report
    assert "7 -> 6 (-14.3%): still falling, not settled" in report
    assert "no_decay: not decayed" in report
    assert "2 -> 2.02 (+1.0%): settled" in report
    assert "√(2ηλ) = 0.02: close to it (1.00x)" in report  # sqrt(2 * 2e-4) = 0.02
    l1 = _plotting.diagnose({"threshold": {"decay": ([0, 10], [1e-3, 1e-3])}})
    assert "decay: L1 soft threshold of 0.001 per step" in l1


# ---------------------------------------------------------------- the callback: resume, timescale, logging
def fit(tmp_path: Any, model: WDNet, callback: Any, epochs: int, ckpt: Any = None, callbacks=(), **kw: Any) -> Any:
    t = trainer(tmp_path, [*callbacks, callback], max_epochs=epochs, **kw)
    t.fit(model, loader(n=32, batch_size=8), ckpt_path=ckpt)  # 4 steps per epoch
    return t


def test_toward_init_resumes_exactly_from_a_trainer_checkpoint(tmp_path):
    make = lambda: lwd.WeightDecayCallback(toward="init")  # noqa: E731
    whole = WDNet(seed=0)
    init = {n: p.detach().clone() for n, p in whole.named_parameters()}
    fit(tmp_path / "a", whole, make(), epochs=2)

    first = WDNet(seed=0)
    t = fit(tmp_path / "b", first, make(), epochs=1)
    path = tmp_path / "half.ckpt"
    t.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # p0 is plain data
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("WeightDecayCallback")]
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    at = {n: i for g in groups for n, i in zip(g["param_names"], g["params"], strict=True)}
    torch.testing.assert_close(state["engines"][0]["reference"][at["net.fc1.weight"]], init["net.fc1.weight"])

    resumed = WDNet(seed=3)  # another init: p0 must come from the checkpoint, not from these weights
    fit(tmp_path / "c", resumed, make(), epochs=2, ckpt=path)
    for (name, p), q in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-7, msg=name)

    del state["engines"][0]["reference"]  # without the saved p0 the resume is not the same run
    torch.save(checkpoint, path)
    other = WDNet(seed=3)
    with pytest.warns(UserWarning, match="holds no reference weights"):
        fit(tmp_path / "d", other, make(), epochs=2, ckpt=path)
    assert not torch.allclose(other.net.fc1.weight, whole.net.fc1.weight, atol=1e-5)


def test_callback_timescale_fraction_and_diagnostics(tmp_path, caplog, capsys, monkeypatch):
    snapshots = []
    take = lwd.WeightDecay._take_snapshot
    monkeypatch.setattr(lwd.WeightDecay, "_take_snapshot", lambda self: snapshots.append(self.steps) or take(self))
    callback = lwd.WeightDecayCallback(timescale_fraction=0.5, log_diagnostics=True)
    logger = CSVLogger(tmp_path, name="logs")
    net = WDNet()
    with caplog.at_level(logging.INFO):
        t = fit(tmp_path, net, callback, epochs=2, logger=logger, log_every_n_steps=2)
    lam = 1 / (0.5 * 8 * 0.1)  # fraction 0.5 of the 8-step run at the peak lr 0.1
    assert group(t.optimizers[0], "decay")["weight_decay"] == pytest.approx(lam)
    assert "λ = 1 / (0.5 · 8 · 0.1) = 2.5" in caplog.text
    assert "50% of the 8-step run" in callback.report and "param_norm over the last quarter" in callback.report
    metrics = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    for key in ("effective_decay", "update_ratio", "angular_update", "timescale_target"):
        assert f"wd/decay/{key}" in metrics
    rows = [line for line in metrics.splitlines()[1:] if line.strip(",")]
    assert 0 < len(rows) < 8  # logging steps only
    assert len(snapshots) == len(rows)  # the parameters were copied on those steps and no other

    out = tmp_path / "wd.png"
    cli(["plot", str(tmp_path / "logs"), "-o", str(out)])
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "decay: timescale 1/(η·λ) = 4 steps" in capsys.readouterr().out

    path = tmp_path / "done.ckpt"
    t.save_checkpoint(path)
    again = WDNet()
    resumed = fit(tmp_path / "r", again, lwd.WeightDecayCallback(timescale_fraction=0.5), epochs=4, ckpt=path)
    # a fresh start would set 1 / (0.5 * 16 * 0.1) = 1.25; the resume keeps the checkpoint's λ
    assert group(resumed.optimizers[0], "decay")["weight_decay"] == pytest.approx(lam)


class RecreateOptimizers(L.Callback):
    """Re-creates the optimizers at the start of epoch 1 (as a user switching optimizers would)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.current_epoch == 1:
            trainer.strategy.setup_optimizers(trainer)


def test_toward_init_keeps_its_reference_when_the_optimizer_is_recreated(tmp_path):
    net = WDNet()
    init = net.net.fc1.weight.detach().clone()
    callback = lwd.WeightDecayCallback(toward="init")
    with pytest.warns(UserWarning, match="optimizers changed during training"):
        fit(tmp_path, net, callback, epochs=2, callbacks=[RecreateOptimizers()])
    (engine,) = callback.engines
    names = [n for g in engine.optimizer.param_groups for n in g["param_names"]]
    reference = engine.state_dict()["reference"][names.index("net.fc1.weight")]
    torch.testing.assert_close(reference, init)  # p0 of the fit's start, not of the optimizer's re-creation
    assert not torch.allclose(net.net.fc1.weight, init)


def test_toward_a_state_dict_under_the_trainer_uses_the_given_weights(tmp_path):
    pretrained = WDNet(seed=5).state_dict()  # named as the LightningModule names its parameters
    callback = lwd.WeightDecayCallback(toward=pretrained)
    net = WDNet(seed=0)
    fit(tmp_path, net, callback, epochs=1)
    (engine,) = callback.engines
    names = [n for g in engine.optimizer.param_groups for n in g["param_names"]]
    saved = engine.state_dict()["reference"]
    assert sorted(names[i] for i in saved) == ["net.fc1.weight", "net.fc2.weight"]
    for i, ref in saved.items():
        torch.testing.assert_close(ref, pretrained[names[i]])


def test_corrected_mode_refuses_a_group_starting_at_lr_zero():
    net = model()
    opt = torch.optim.SGD(lwd.build_param_groups(net, lwd.presets.standard(WD)), lr=0.0)
    with pytest.raises(ValueError, match=r"`mode`='corrected' divides by the group's initial \(peak\) lr"):
        lwd.WeightDecay(opt, mode="corrected")
    assert "step" not in opt.__dict__


def test_a_log_axis_over_decades_labels_only_its_decades(tmp_path, monkeypatch):
    """A timescale of 10^6 steps against a 5-step run spans six decades: the minor ticks go unlabelled
    (labelled, they overlap), while a panel within one decade keeps them; steps are whole numbers."""
    import matplotlib.figure
    import matplotlib.ticker

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    series = {
        "param_norm": {"decay": ([3, 4, 5], [37.5, 37.7, 37.9])},
        "timescale": {"decay": ([3, 4, 5], [8.9e5, 8.9e5, 8.9e5])},
        "grad_norm": {"decay": ([3, 4, 5], [2.0, 3.0, 4.0])},
    }
    _plotting.plot_metrics(series, tmp_path / "wd.png")
    axes = {ax.get_title(): ax for ax in figures[0].axes if ax.get_title()}
    timescale = next(ax for title, ax in axes.items() if title.startswith("Decay timescale"))
    grad = next(ax for title, ax in axes.items() if title.startswith("Gradient norm"))
    assert timescale.get_yscale() == grad.get_yscale() == "log"
    assert isinstance(timescale.yaxis.get_minor_formatter(), matplotlib.ticker.NullFormatter)
    assert not isinstance(grad.yaxis.get_minor_formatter(), matplotlib.ticker.NullFormatter)
    assert all(isinstance(ax.xaxis.get_major_locator(), matplotlib.ticker.MaxNLocator) for ax in axes.values())
    assert all(float(t).is_integer() for t in timescale.get_xticks())
