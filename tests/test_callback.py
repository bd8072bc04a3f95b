"""WeightDecayCallback through real ``Trainer.fit`` runs, checked step by step against a reference."""

from __future__ import annotations

import csv
import math
import shutil
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_wd as lwd
from lightning_wd import schedules
from tests.callback_helpers import (
    DECAYED,
    LR,
    WD,
    Net,
    PlainNet,
    StepRecorder,
    TwoOptNet,
    WDNet,
    decaying_lr,
    loader,
    trainer,
)
from tests.helpers import cpu_backward_supports

WDS = dict.fromkeys(DECAYED, WD)


step_scheduler = {"scheduler": partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=decaying_lr), "interval": "step"}


MODES = [
    pytest.param(dict(mode="decoupled"), id="decoupled"),
    pytest.param(dict(mode="lr_ratio"), id="lr_ratio"),
    pytest.param(dict(mode="independent"), id="independent"),
    pytest.param(dict(mode="relative"), id="relative-params-mean_abs"),
    pytest.param(dict(mode="relative", source="grad", metric="rms"), id="relative-grad-rms"),
    pytest.param(dict(mode="relative", source="update", metric="mean_abs"), id="relative-update"),
    pytest.param(dict(mode="decoupled", ord=1), id="decoupled-L1"),
    pytest.param(dict(mode="independent", ord=1), id="independent-L1"),
    pytest.param(dict(mode="decoupled", cautious=True), id="decoupled-cautious"),
    pytest.param(dict(mode="relative", source="update", cautious=True, ord=1), id="relative-cautious-L1"),
]


@pytest.mark.parametrize("config", MODES)
def test_every_mode_matches_reference_with_lr_schedule(tmp_path, config):
    """Each mode, ord and flag, with a per-step lr schedule, 5 steps checked against the formula."""
    model = WDNet(scheduler=step_scheduler)
    recorder = StepRecorder(WDS, **{"mode": "decoupled", **config})
    t = trainer(tmp_path, [lwd.WeightDecayCallback(**config), recorder])
    t.fit(model, loader())
    assert recorder.checked == 5


@pytest.mark.parametrize("fused", [None, True], ids=["default", "fused"])
@pytest.mark.parametrize(
    "kwargs",
    [{"cautious": True}, {"cautious": True, "ord": 1}, {"mode": "relative"}],
    ids=["cautious", "L1", "relative"],
)
def test_cpu_groups_take_the_c_loops_in_a_real_fit_and_match_the_reference(tmp_path, monkeypatch, kwargs, fused):
    """On CPU the cautious decay and relative's measure of a group of a few float32 tensors run in
    ``_native``'s C loops (counted), by default and with ``fused=True``: the formula's decay at every step."""
    from lightning_wd import _native

    if _native.library() is None:
        pytest.skip(f"the C loops cannot be built here: {_native._STATE['failed']}")
    looped = []
    cautious_, abs_sum = _native.cautious_, _native.abs_sum

    def counting_cautious_(t, before, step, soft):
        looped.append(t.numel())
        cautious_(t, before, step, soft)

    def counting_abs_sum(t):
        looped.append(t.numel())
        return abs_sum(t)

    monkeypatch.setattr(_native, "cautious_", counting_cautious_)
    monkeypatch.setattr(_native, "abs_sum", counting_abs_sum)
    model = WDNet(scheduler=step_scheduler)
    recorder = StepRecorder(
        WDS, mode=kwargs.get("mode", "decoupled"), **{k: v for k, v in kwargs.items() if k != "mode"}
    )
    callback = lwd.WeightDecayCallback(**kwargs, fused=fused)
    trainer(tmp_path, [callback, recorder]).fit(model, loader())
    assert recorder.checked == 5
    decayed = sum(p.numel() for n, p in model.named_parameters() if n in WDS)
    assert sum(looped) == 5 * decayed  # every decayed element, once per step, in a C loop


@pytest.mark.skipif(
    not any(map(shutil.which, ("g++", "clang++", "c++"))), reason="torch.compile needs a C++ compiler on CPU"
)
@pytest.mark.usefixtures("without_c_loops")
@pytest.mark.parametrize("ord", [2, 1], ids=["cautious", "cautious-L1"])
def test_fused_cautious_decay_matches_reference_and_runs_the_compiled_kernel(tmp_path, monkeypatch, ord):
    """``fused=True``: the same decay as the formula, by the kernel torch.compile made (counted)."""
    from lightning_wd import functional as F

    calls = []
    compile_ = torch.compile

    def counting_compile(fn, **kwargs):
        compiled = compile_(fn, **kwargs)

        def run(*args):
            calls.append(args[0].numel())
            return compiled(*args)

        return run

    monkeypatch.setattr(torch, "compile", counting_compile)
    monkeypatch.setitem(F._FUSED, "kernel", None)
    monkeypatch.setitem(F._FUSED, "failed", None)
    model = WDNet(scheduler=step_scheduler)
    recorder = StepRecorder(WDS, mode="decoupled", cautious=True, ord=ord)
    callback = lwd.WeightDecayCallback(cautious=True, ord=ord, fused=True)
    t = trainer(tmp_path, [callback, recorder])
    t.fit(model, loader())
    assert recorder.checked == 5
    assert callback.fused and F._FUSED["failed"] is None
    decayed = sum(p.numel() for n, p in model.named_parameters() if n in WDS)
    assert sum(calls) == 5 * decayed  # every decayed element, once per step, by the compiled kernel


@pytest.mark.skipif(
    not any(map(shutil.which, ("g++", "clang++", "c++"))), reason="torch.compile needs a C++ compiler on CPU"
)
@pytest.mark.usefixtures("without_c_loops")
def test_fused_relative_measure_matches_reference_and_runs_the_compiled_kernel(tmp_path, monkeypatch):
    """``fused=True`` in relative mode: the decay of the formula, m measured by the kernel torch.compile made."""
    from lightning_wd import functional as F

    calls = []
    compile_ = torch.compile

    def counting_compile(fn, **kwargs):
        compiled = compile_(fn, **kwargs)

        def run(x):
            calls.append(x.numel())
            return compiled(x)

        return run

    monkeypatch.setattr(torch, "compile", counting_compile)
    monkeypatch.setattr(F, "_ROW", 7)  # rows of 7: the small decayed tensors have whole rows and a rest
    monkeypatch.setitem(F._FUSED, "abs_sum", None)
    monkeypatch.setitem(F._FUSED, "failed", None)
    model = WDNet(scheduler=step_scheduler)
    recorder = StepRecorder(WDS, mode="relative")
    callback = lwd.WeightDecayCallback(mode="relative", fused=True)
    t = trainer(tmp_path, [callback, recorder])
    t.fit(model, loader())
    assert recorder.checked == 5
    assert F._FUSED["failed"] is None
    decayed = sum(p.numel() for n, p in model.named_parameters() if n in WDS)
    assert sum(calls) == 5 * decayed  # every decayed element, once per step, by the compiled kernel
    assert any(p.numel() % 7 for n, p in model.named_parameters() if n in WDS)  # (rows and a rest)


def test_accumulation_over_odd_batches_decays_once_per_real_step(tmp_path):
    """accumulate 2 over 5 batches: steps after batches 2, 4 and 5; micro-batches leave parameters alone."""
    recorder = StepRecorder(WDS, mode="decoupled")
    t = trainer(tmp_path, [lwd.WeightDecayCallback(), recorder], accumulate_grad_batches=2)
    t.fit(WDNet(scheduler=step_scheduler), loader())
    assert recorder.checked == 3


def test_gradient_clipping_uses_clipped_update(tmp_path):
    recorder = StepRecorder(WDS, mode="relative", source="update")
    cb = lwd.WeightDecayCallback(mode="relative", source="update")
    t = trainer(tmp_path, [cb, recorder], gradient_clip_val=0.01)
    t.fit(WDNet(), loader())
    assert recorder.checked == 5


def test_schedule_multiplies_decay(tmp_path):
    schedule = schedules.Cosine(start=1.0, end=0.0, total_steps=5)
    recorder = StepRecorder(WDS, mode="decoupled", schedule=lambda s: 0.5 * (1 + math.cos(math.pi * min(s, 5) / 5)))
    t = trainer(tmp_path, [lwd.WeightDecayCallback(schedule=schedule), recorder])
    t.fit(WDNet(), loader())
    assert recorder.checked == 5


def test_cosine_total_steps_from_trainer(tmp_path):
    recorder = StepRecorder(WDS, mode="decoupled", schedule=lambda s: 1.0 + 1.0 * 0.5 * (1 + math.cos(math.pi * s / 7)))
    cb = lwd.WeightDecayCallback(schedule=schedules.Cosine(start=2.0, end=1.0))
    t = trainer(tmp_path, [cb, recorder], max_steps=7, max_epochs=None)
    t.fit(WDNet(), loader())
    assert recorder.checked == 7
    assert cb.state_dict()["engines"] == [{"version": 2, "steps": 7, "total_steps": 7}]


def test_two_optimizers_manual_optimization(
    tmp_path,
):
    """Each optimizer decays on its own steps; b steps every other batch with its own lr."""
    rules = lwd.presets.standard(WD)
    recorder = StepRecorder({"net.fc1.weight": WD, "net.fc2.weight": WD}, mode="decoupled")
    logger = CSVLogger(tmp_path, name="csv")
    cb = lwd.WeightDecayCallback(rules=rules)
    t = trainer(tmp_path, [cb, recorder], logger=logger, log_every_n_steps=1)
    t.fit(TwoOptNet(), loader())
    assert recorder.checked == 5 + 3
    assert [e.steps for e in cb.engines] == [5, 3]
    header = _rows(logger)[0].keys()
    assert "wd/SGD/decay/param_norm" in header and "wd/SGD-1/decay/param_norm" in header


def test_plain_optimizer_needs_rules(tmp_path):
    with pytest.raises(MisconfigurationException, match="rules="):
        trainer(tmp_path, [lwd.WeightDecayCallback()]).fit(PlainNet(), loader())


def test_plain_optimizer_with_rules(tmp_path):
    recorder = StepRecorder({"net.fc1.weight": WD, "net.fc2.weight": WD}, mode="decoupled")
    t = trainer(tmp_path, [lwd.WeightDecayCallback(rules=lwd.presets.standard(WD)), recorder])
    t.fit(PlainNet(), loader())
    assert recorder.checked == 5


def test_double_decay_is_refused_and_nothing_changes(tmp_path):
    model = PlainNet(weight_decay=0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(MisconfigurationException, match="decayed twice"):
        trainer(tmp_path, [lwd.WeightDecayCallback(rules=lwd.presets.standard(WD))]).fit(model, loader())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_lambda_stays_in_each_group_where_learning_rate_monitor_reads_it(tmp_path):
    """AdamW's own decay is off only during its step: outside it every group keeps its λ, and logs it."""
    model = WDNet(optimizer=partial(torch.optim.AdamW, lr=1e-3))
    logger = CSVLogger(tmp_path, name="csv")
    monitor = LearningRateMonitor(logging_interval="step", log_weight_decay=True)
    t = trainer(tmp_path, [lwd.WeightDecayCallback(), monitor], max_steps=3, logger=logger, log_every_n_steps=1)
    t.fit(model, loader())
    groups = {g["name"]: g for g in t.optimizers[0].param_groups}
    assert groups["decay"]["weight_decay"] == WD and groups["no_decay"]["weight_decay"] == 0.0
    assert not [k for g in groups.values() for k in g if k in ("lwd_weight_decay", "lwd_planned_weight_decay")]
    rows = _rows(logger)
    logged = [float(r["lr-AdamW/decay-weight_decay"]) for r in rows if r.get("lr-AdamW/decay-weight_decay")]
    assert logged == [WD] * 3


def test_parameters_without_grad_are_not_decayed(tmp_path):
    class Partial(WDNet):
        def training_step(self, batch, batch_idx):
            x, y = batch
            h = self.net.fc1(x)  # fc2 and norm get no gradient
            return torch.nn.functional.mse_loss(h[:, :2], y)

    model = Partial()
    w2 = model.net.fc2.weight.detach().clone()
    recorder = StepRecorder(WDS, mode="decoupled")
    trainer(tmp_path, [lwd.WeightDecayCallback(), recorder]).fit(model, loader())
    assert torch.equal(model.net.fc2.weight, w2)
    assert recorder.checked == 5


# ---------------------------------------------------------------- mixed precision
def _amp_plugin():
    return MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**4))


@pytest.mark.parametrize("fused", [False, True], ids=["sgd-skipped-by-scaler", "fused-adamw-found-inf"])
def test_16_mixed_overflow_step_gets_no_decay(tmp_path, fused):
    nan_at = (2,)
    if fused:
        model = WDNet(optimizer=partial(torch.optim.AdamW, lr=1e-2, fused=True), nan_at=nan_at)
        seen = {}

        class Watch(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                seen[batch_idx] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if batch_idx == nan_at[0]:
                    for n, p in pl_module.named_parameters():
                        assert torch.equal(p, seen[batch_idx][n]), n
                else:
                    assert not torch.equal(pl_module.net.fc1.weight, seen[batch_idx]["net.fc1.weight"])

        callbacks = [lwd.WeightDecayCallback(mode="independent"), Watch()]
    else:
        model = WDNet(nan_at=nan_at)
        callbacks = [lwd.WeightDecayCallback(), StepRecorder(WDS, mode="decoupled", skipped=nan_at)]
    t = trainer(tmp_path, callbacks, plugins=[_amp_plugin()])
    t.fit(model, loader())
    for p in model.parameters():
        assert torch.isfinite(p).all()


def test_bf16_mixed_matches_reference(tmp_path):
    recorder = StepRecorder(WDS, mode="decoupled")
    t = trainer(tmp_path, [lwd.WeightDecayCallback(), recorder], precision="bf16-mixed")
    t.fit(WDNet(), loader())
    assert recorder.checked == 5


@pytest.mark.skipif(not cpu_backward_supports(torch.bfloat16), reason="this torch has no bf16 backward on CPU")
def test_low_precision_parameters_warn_when_decay_rounds_away(tmp_path):
    model = WDNet(optimizer=partial(torch.optim.SGD, lr=1e-4))
    with pytest.warns(UserWarning, match="rounds to nothing"):
        trainer(tmp_path, [lwd.WeightDecayCallback()], precision="bf16-true", max_steps=1).fit(model, loader())


# ---------------------------------------------------------------- logging
def _rows(logger: CSVLogger) -> list[dict[str, str]]:
    path = Path(logger.log_dir) / "metrics.csv"
    with path.open() as f:
        return list(csv.DictReader(f))


class _ParamTrace(L.Callback):
    def __init__(self):
        self.norms = {}
        self.lrs = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step the callback logs under
        ps = [pl_module.net.fc1.weight, pl_module.net.fc2.weight]
        self.norms[step] = math.sqrt(sum(float((p.double() ** 2).sum()) for p in ps))
        self.lrs[step] = trainer.optimizers[0].param_groups[1]["lr"]


def test_logged_metrics_in_csv_match_independent_computation(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    trace = _ParamTrace()
    cb = lwd.WeightDecayCallback(log_grad_norm=True)
    t = trainer(tmp_path, [cb, trace], logger=logger, log_every_n_steps=2)
    t.fit(WDNet(scheduler=step_scheduler), loader())
    rows = [r for r in _rows(logger) if r.get("wd/decay/param_norm")]
    assert [int(r["step"]) for r in rows] == [1, 3]
    for r in rows:
        step = int(r["step"])
        assert float(r["wd/decay/param_norm"]) == pytest.approx(trace.norms[step], rel=1e-5)
        assert float(r["wd/decay/weight_decay"]) == pytest.approx(WD)
        lr = LR * decaying_lr(step)  # lr used by that step
        assert float(r["wd/decay/timescale"]) == pytest.approx(1 / (lr * WD), rel=1e-6)
        assert float(r["wd/no_decay/weight_decay"]) == 0.0
        assert float(r["wd/decay/grad_norm"]) > 0
        assert "wd/no_decay/timescale" not in r or r["wd/no_decay/timescale"] == ""


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(dict(mode="relative"), id="relative-params-mean_abs"),
        pytest.param(dict(mode="relative", source="grad", metric="rms"), id="relative-grad-rms"),
        pytest.param(dict(mode="relative", source="update"), id="relative-update"),
    ],
)
def test_float64_parameters_decay_and_log(tmp_path, config):
    """float64 parameters (whose norms torch will not compute in float32): ``relative`` mode matches the
    reference step by step, and the logged norms match an independent computation."""
    from torch.utils.data import DataLoader, TensorDataset

    from tests.callback_helpers import make_data

    data = DataLoader(TensorDataset(*(t.double() for t in make_data().tensors)), batch_size=8)
    model = WDNet().double()
    recorder = StepRecorder(WDS, **config)
    trace = _ParamTrace()
    logger = CSVLogger(tmp_path, name="csv")
    callback = lwd.WeightDecayCallback(**config, log_grad_norm=True, log_update_norm=True)
    t = trainer(tmp_path, [callback, recorder, trace], logger=logger, log_every_n_steps=1)
    t.fit(model, data)
    assert recorder.checked == 5
    rows = [r for r in _rows(logger) if r.get("wd/decay/param_norm")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4]
    for r in rows:
        assert float(r["wd/decay/param_norm"]) == pytest.approx(trace.norms[int(r["step"])], rel=1e-6)
        assert float(r["wd/decay/grad_norm"]) > 0 and float(r["wd/decay/update_norm"]) > 0


def test_norms_are_computed_only_on_logged_steps(tmp_path, monkeypatch):
    calls = []
    original = lwd.functional.global_norm

    def counting(tensors, ord=2.0):
        calls.append(len(tensors))
        return original(tensors, ord)

    in_step = []
    decay_and_measure = lwd.functional._decay_and_square_sum_

    def counting_in_step(tensors, step, dtypes, numel=None, native=True):
        in_step.append(len(tensors))
        return decay_and_measure(tensors, step, dtypes, numel, native)

    monkeypatch.setattr(lwd.functional, "global_norm", counting)
    monkeypatch.setattr(lwd.functional, "_decay_and_square_sum_", counting_in_step)
    logger = CSVLogger(tmp_path, name="csv")
    t = trainer(tmp_path, [lwd.WeightDecayCallback()], logger=logger, log_every_n_steps=3, max_steps=7, max_epochs=None)
    t.fit(WDNet(), loader())
    # logged steps: batches_that_stepped + 1 in {3, 6} -> 2 logged steps x 2 groups; the decayed group's
    # norm is taken in its decay pass on those steps only, the other group's (not decayed) after the step
    assert len(calls) == 2
    assert len(in_step) == 2


def test_no_norms_without_a_logger(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(lwd.functional, "global_norm", lambda *a, **k: calls.append(1))
    trainer(tmp_path, [lwd.WeightDecayCallback()], log_every_n_steps=1).fit(WDNet(), loader())
    assert calls == []


def test_tensorboard_logger(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer(tmp_path, [lwd.WeightDecayCallback()], logger=logger, log_every_n_steps=1).fit(WDNet(), loader())
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    assert "wd/decay/param_norm" in acc.Tags()["scalars"]
    assert len(acc.Scalars("wd/decay/param_norm")) == 5


# ---------------------------------------------------------------- checkpoints and resume
def _fit_and_params(tmp_path: Path, max_epochs: int, ckpt: str | None, cb_kwargs: dict, save: str | None = None):
    torch.manual_seed(0)
    model = WDNet(
        optimizer=partial(torch.optim.AdamW, lr=1e-2),
        scheduler=step_scheduler,
    )
    cb = lwd.WeightDecayCallback(**cb_kwargs)
    t = trainer(tmp_path, [cb], max_epochs=max_epochs)
    t.fit(model, loader(), ckpt_path=ckpt)
    if save:
        t.save_checkpoint(save)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, cb


@pytest.mark.parametrize(
    "cb_kwargs",
    [
        dict(mode="lr_ratio", schedule=schedules.Cosine(start=1.0, end=0.2, total_steps=10)),
        dict(mode="relative", source="update", cautious=True),
    ],
    ids=["lr_ratio-cosine", "relative-update-cautious"],
)
def test_resume_is_bitwise_identical(tmp_path, cb_kwargs):
    straight, _ = _fit_and_params(tmp_path / "a", 2, None, cb_kwargs)
    ckpt = str(tmp_path / "half.ckpt")
    _fit_and_params(tmp_path / "b", 1, None, cb_kwargs, save=ckpt)
    checkpoint = torch.load(ckpt, weights_only=True)  # plain data only
    state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("WeightDecayCallback"))
    assert [e["steps"] for e in state["engines"]] == [5]
    resumed, cb = _fit_and_params(tmp_path / "c", 2, ckpt, cb_kwargs)
    for n in straight:
        assert torch.equal(straight[n], resumed[n]), n
    assert cb.engines[0].steps == 10


@pytest.mark.parametrize("changed", [dict(mode="lr_ratio"), dict(cautious=True), dict(ord=1)])
def test_a_resume_with_other_decay_options_keeps_the_step_count_and_says_so(tmp_path, changed):
    """mode, ord and cautious are part of state_key: the checkpoint's one unclaimed state is still this
    callback's, so a λ schedule goes on from where it was instead of restarting."""
    first = dict(mode="decoupled", schedule=schedules.LinearWarmup(warmup_steps=20))
    ckpt = str(tmp_path / "half.ckpt")
    _fit_and_params(tmp_path / "b", 1, None, first, save=ckpt)
    with pytest.warns(UserWarning, match=r"carries over to the new options"):
        _, cb = _fit_and_params(tmp_path / "c", 2, ckpt, {**first, **changed})
    assert cb.engines[0].steps == 10
    assert cb.engines[0]._multiplier() == pytest.approx(10 / 20)


def test_two_instances_keep_separate_state(tmp_path):
    a = lwd.WeightDecayCallback(mode="decoupled", rules=lwd.presets.standard(0.1))
    b = lwd.WeightDecayCallback(mode="independent", rules=lwd.presets.standard(0.0))
    assert a.state_key != b.state_key


class _WriteLambdaBeforeStep(L.Callback):
    """A hand-written λ schedule: the decayed group's weight_decay set in on_before_optimizer_step,
    which Lightning runs inside ``optimizer.step(closure)``."""

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        optimizer.param_groups[1]["weight_decay"] = self.values[trainer.global_step]


def test_a_lambda_schedule_written_in_on_before_optimizer_step_decays_once_with_that_steps_value(tmp_path):
    values = [0.3, 0.0, 0.5, 0.5, 0.1]
    module = WDNet(optimizer=partial(torch.optim.AdamW, lr=LR))
    ref = Net()
    ref.load_state_dict(module.net.state_dict())
    trainer(tmp_path, [_WriteLambdaBeforeStep(values), lwd.WeightDecayCallback(mode="decoupled")]).fit(module, loader())
    # the reference: AdamW without decay, then p <- p (1 - lr λ_t) on the two weights, λ_t as written
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.0)
    for step, (x, y) in enumerate(loader()):
        opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        opt.step()
        with torch.no_grad():
            for w in (ref.fc1.weight, ref.fc2.weight):
                w.mul_(1 - LR * values[step])
    for (name, p), q in zip(module.net.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6, msg=name)
    assert [g["weight_decay"] for g in module.trainer.optimizers[0].param_groups] == [0.0, values[-1]]
