"""The users' side: the examples run, the LightningCLI config works, and the ``lightning-wd`` command behaves.

The examples and the console script run in subprocesses, as a user runs them (short: a few
epochs or steps each); ``explain`` and ``plot`` also run in-process through
:func:`lightning_wd._cli.main` to check their output and their errors.
"""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

import lightning_wd as lwd
from lightning_wd import _plotting
from lightning_wd._cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(args: list[str], cwd: Path = ROOT, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    height, width = matplotlib.image.imread(path).shape[:2]  # decodes the whole image
    assert height > 200 and width > 300


def _wd_columns(path: Path) -> list[str]:
    with path.open(newline="") as f:
        return [c for c in next(csv.reader(f)) if c.startswith("wd/")]


# ---------------------------------------------------------------------------- examples
@pytest.mark.slow
def test_digits_example(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    proc = _run([sys.executable, "examples/digits.py", "--epochs", "1", "--out", str(out), "--seed", "3"])
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert "Weight decay plan for DigitsCNN" in text
    assert re.search(r"^epoch +1/1 .* val_acc +\d+\.\d%", proc.stdout, re.MULTILINE), proc.stdout
    assert re.search(r"^test accuracy: \d+\.\d% on \d+ held-out images", proc.stdout, re.MULTILINE), proc.stdout
    png = out / "weight_decay.png"
    _assert_png(png)
    assert f"plot: {png}" in proc.stdout
    (metrics,) = out.glob("logs/version_*/metrics.csv")
    assert f"logs: {metrics}" in proc.stdout
    columns = _wd_columns(metrics)
    for name in ("wd/decay/param_norm", "wd/decay/weight_decay", "wd/decay/timescale", "wd/no_decay/param_norm"):
        assert name in columns


@pytest.mark.slow
def test_tiny_gpt_example() -> None:
    proc = _run([sys.executable, "examples/tiny_gpt.py", "--steps", "10"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    # The tied embedding and the position table are where the presets differ; RMSNorm gains agree.
    assert "<- differs" in rows["tok_emb.weight"] and "no decay (embedding)" in rows["tok_emb.weight"]
    assert "<- differs" in rows["pos_emb"]
    assert "differs" not in rows["norm.weight"] and "no decay (normalization)" in rows["norm.weight"]
    assert "They disagree on 2 of 16 tensors" in proc.stdout
    assert "tied: reachable as tok_emb.weight and head.weight" in proc.stdout
    assert re.search(r"reversal exact-match on 2,048 fresh sequences: \d+\.\d%", proc.stdout)


@pytest.mark.slow
def test_lightning_cli_config(tmp_path: Path) -> None:
    proc = _run(
        [
            sys.executable,
            str(EXAMPLES / "cli.py"),
            "fit",
            "--config",
            str(EXAMPLES / "config.yaml"),
            "--trainer.max_steps=3",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--trainer.log_every_n_steps=1",
        ],
        cwd=tmp_path,  # the config's CSVLogger writes to outputs/cli, relative to here
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    table = text[text.index("Weight decay plan for DigitsMLP") :]
    assert re.search(r"^head +head +1 +1,280 +0\.01 +0\.5$", table, re.MULTILINE), table
    assert re.search(r"^norms +norms +3 ", table, re.MULTILINE), table
    assert "weight_decay=0.01, but every parameter group" not in text  # the config sets the optimizer's to 0
    (metrics,) = tmp_path.glob("outputs/cli/lightning_logs/version_*/metrics.csv")
    columns = _wd_columns(metrics)
    for name in ("wd/linear/param_norm", "wd/head/timescale", "wd/norms/weight_decay", "wd/linear/grad_norm"):
        assert name in columns


# ---------------------------------------------------------------------------- lightning-wd explain
@pytest.fixture
def in_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # model paths below are relative to the repository root


def _explain(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    main(["explain", *argv])
    return capsys.readouterr().out


def _groups(table: str) -> dict[str, tuple[int, float]]:
    """``{group: (tensors, weight_decay)}`` from a printed plan table."""
    out = {}
    for line in table.splitlines():
        m = re.match(r"^(\S+)\s+\S+\s+(\d+)\s+[\d,]+\s+([\d.e-]+)\s+[\d.]+$", line)
        if m and m.group(1) != "total":
            out[m.group(1)] = (int(m.group(2)), float(m.group(3)))
    return out


@pytest.mark.usefixtures("in_root")
def test_explain_file_path_with_param(capsys: pytest.CaptureFixture[str]) -> None:
    out = _explain(capsys, "tests/cli_models.py:Net", "--param", "head.weight", "--param", "norm.weight")
    assert out.startswith("Weight decay plan for tests/cli_models.py:Net (rules: preset standard())")
    assert _groups(out) == {"no_decay": (3, 0.0), "decay": (1, 0.05)}
    assert "claimed by rule 'embedding'" in out and "aliases ['embed.weight', 'head.weight']" in out
    assert "norm.weight: group 'no_decay'" in out and "owner RMSNorm" in out


@pytest.mark.usefixtures("in_root")
@pytest.mark.parametrize(
    ("argv", "groups"),
    [
        (
            ["tests.cli_models:Net", "--rules", "gpt", "--weight-decay", "0.1"],
            {"decay": (2, 0.1), "no_decay": (2, 0.0)},
        ),
        (
            ["tests/cli_models.py:Net", "--rules", "tests/cli_models.py:RULES"],
            {"matrices": (2, 0.2), "vectors": (2, 0.0)},
        ),
        (["tests.cli_models:Net", "--rules", "tests.cli_models:rules", "--weight-decay", "0.7"], {"all": (4, 0.7)}),
        (["tests.cli_models:WithRules"], {"everything": (4, 0.3)}),
        (
            ["tests.cli_models:Net", "--init-args", '{"width": 4, "vocab": 5}', "--rules", "none"],
            {"no_decay": (4, 0.0)},
        ),
        (
            ["torch.nn:Linear", "--init-args", '{"in_features": 3, "out_features": 2}'],
            {"no_decay": (1, 0.0), "decay": (1, 0.05)},
        ),
    ],
)
def test_explain_rules_sources(capsys: pytest.CaptureFixture[str], argv: list[str], groups: dict[str, Any]) -> None:
    assert _groups(_explain(capsys, *argv)) == groups


@pytest.mark.usefixtures("in_root")
def test_explain_lists_every_parameter(capsys: pytest.CaptureFixture[str]) -> None:
    out = _explain(capsys, "tests/cli_models.py:Net", "--params")
    listing = {line.split()[0]: line.split()[1:3] for line in out.split("\n\n", 1)[1].splitlines()}
    assert listing == {
        "embed.weight": ["no_decay", "embedding"],
        "proj.weight": ["decay", "linear"],
        "proj.bias": ["no_decay", "bias"],
        "norm.weight": ["no_decay", "normalization"],
    }


@pytest.mark.usefixtures("in_root")
@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["explain", "tests/cli_models.py"], "`MODULE:CLASS` must be a module and an attribute separated by ':'"),
        (["explain", "no_such_module_xyz:Net"], "no module named 'no_such_module_xyz' can be imported"),
        (["explain", "tests/missing_models.py:Net"], "the file 'tests/missing_models.py' does not exist"),
        (["explain", "tests/cli_models.py:Nett"], "has no attribute 'Nett'. Did you mean 'Net'?"),
        (
            ["explain", "tests.cli_models:Net", "--rules", "stadard"],
            "unknown preset 'stadard'. Did you mean 'standard'?",
        ),
        (
            ["explain", "tests.cli_models:Net", "--rules", "tests.cli_models:NOPE"],
            "`--rules`: 'tests.cli_models' has no",
        ),
        (["explain", "tests.cli_models:Net", "--init-args", "{width: 3}"], "`--init-args` is not valid JSON"),
        (["explain", "tests.cli_models:Net", "--init-args", "[3]"], "`--init-args` must be a JSON object"),
        (["explain", "tests.cli_models:Net", "--init-args", '{"widht": 3}'], "unexpected keyword argument 'widht'"),
        (["explain", "tests.cli_models:Net", "--param", "head.wieght"], "Did you mean 'head.weight'"),
        (["explain", "tests.cli_models:WithRules", "--weight-decay", "0.1"], "`--weight-decay` applies to a preset"),
        (
            ["explain", "tests.cli_models:Net", "--rules", "uniform"],
            "`--weight-decay` is required with preset 'uniform'",
        ),
        (["plot", "no/such/dir"], "`LOG_DIR_OR_CSV`: 'no/such/dir' does not exist"),
        (["plot", "examples"], "holds no metrics.csv and no TensorBoard event file"),
    ],
)
def test_bad_arguments_exit_2_naming_the_argument(
    capsys: pytest.CaptureFixture[str], argv: list[str], match: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-wd: error: ")
    assert match in err, err


@pytest.mark.slow
def test_python_m_and_console_script() -> None:
    proc = _run([sys.executable, "-m", "lightning_wd", "explain", "tests/cli_models.py:Net", "--rules", "gpt"])
    assert proc.returncode == 0, proc.stderr
    assert _groups(proc.stdout) == {"decay": (2, 0.1), "no_decay": (2, 0.0)}
    script = shutil.which("lightning-wd")
    if script is None:
        pytest.skip("the lightning-wd console script is not on PATH (package not installed with pip)")
    proc = _run([script, "explain", "tests/cli_models.py:Nett"])
    assert proc.returncode == 2 and "has no attribute 'Nett'. Did you mean 'Net'" in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------- lightning-wd plot
class _Model(lwd.WDMixin, BoringModel):
    configure_optimizers = lwd.WDMixin.configure_optimizers  # BoringModel has its own
    show_decay_plan = False


@pytest.fixture(scope="module")
def fit_logs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real short fit logged by CSVLogger and TensorBoardLogger at once: (csv file, event directory)."""
    root = tmp_path_factory.mktemp("fit")
    csv_logger, tb_logger = CSVLogger(root, name="csv"), TensorBoardLogger(root, name="tb")
    trainer = L.Trainer(
        max_steps=8,
        logger=[csv_logger, tb_logger],
        callbacks=[lwd.WeightDecayCallback(log_grad_norm=True, log_update_norm=True)],
        log_every_n_steps=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(_Model())
    return Path(csv_logger.log_dir) / "metrics.csv", Path(tb_logger.log_dir)


EXPECTED_METRICS = {"param_norm", "weight_decay", "timescale", "grad_norm", "update_norm"}


def test_read_csv_and_tensorboard_agree(fit_logs: tuple[Path, Path]) -> None:
    csv_file, tb_dir = fit_logs
    from_csv, _ = _plotting.read_logs(csv_file.parent)
    from_tb, source = _plotting.read_logs(tb_dir)
    assert source.name.startswith("events.out.tfevents.")
    assert set(from_csv) == EXPECTED_METRICS
    assert set(from_csv["param_norm"]) == {"decay", "no_decay"}
    assert set(from_csv["timescale"]) == {"decay"}  # an undecayed group has no timescale
    assert from_csv.keys() == from_tb.keys()
    for metric, groups in from_csv.items():
        for group, (steps, values) in groups.items():
            tb_steps, tb_values = from_tb[metric][group]
            assert steps == tb_steps and len(steps) == 4
            assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(values, tb_values, strict=True))
    # AdamW at lr 1e-3 (WDMixin's default) with λ = 0.05: timescale 1 / (1e-3 * 0.05)
    assert from_csv["timescale"]["decay"][1] == pytest.approx([20_000.0] * 4)


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
def test_plot_command(
    fit_logs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    logs = fit_logs[0] if kind == "csv" else fit_logs[1]
    png = tmp_path / "out" / "wd.png"
    main(["plot", str(logs), "-o", str(png), "--title", "short fit"])
    out = capsys.readouterr().out
    _assert_png(png)
    assert f"wrote {png}" in out
    assert re.search(r"^decay +\S+ -> \S+ \([+-]\d+%\) +0\.05 +20,000 +x1\.00$", out, re.MULTILINE), out
    assert "run length: 7 optimizer steps" in out


def test_plot_default_output_next_to_the_log(fit_logs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    main(["plot", str(fit_logs[0])])
    _assert_png(fit_logs[0].parent / "weight_decay.png")


def test_plot_without_wd_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "metrics.csv").write_text("step,train_loss\n0,1.0\n")
    with pytest.raises(SystemExit) as exc:
        main(["plot", str(tmp_path)])
    assert exc.value.code == 2
    assert "has no 'wd/...' metric. Add lightning_wd.WeightDecayCallback" in capsys.readouterr().err


def test_plot_without_matplotlib(
    fit_logs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(ImportError, match=re.escape("pip install 'lightning-wd[plot]'")):
        _plotting.import_pyplot()
    with pytest.raises(SystemExit) as exc:
        main(["plot", str(fit_logs[0]), "-o", str(tmp_path / "wd.png")])
    assert exc.value.code == 1
    assert "needs matplotlib, which is not installed. Install it with: pip install 'lightning-wd[plot]'" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "wd.png").exists()


@pytest.mark.slow
def test_package_imports_without_matplotlib() -> None:
    # torchmetrics (through lightning) imports matplotlib when it is installed, so lightning is imported
    # first; then matplotlib is made unimportable and every module of the package must still import.
    code = (
        "import sys, lightning\n"
        "for name in [m for m in sys.modules if m == 'matplotlib' or m.startswith('matplotlib.')]:\n"
        "    del sys.modules[name]\n"
        "sys.modules['matplotlib'] = None\n"
        "import lightning_wd, lightning_wd._cli, lightning_wd._plotting, lightning_wd.__main__\n"
        "assert sys.modules['matplotlib'] is None\n"
        "print('ok')\n"
    )
    proc = _run([sys.executable, "-c", code])
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


class _TwoOptimizers(BoringModel):
    """Manual optimization with an SGD and an Adam: metrics are named wd/<Optimizer>/<group>/<metric>."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.other = torch.nn.Linear(32, 2)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        sgd, adam = self.optimizers()  # type: ignore[misc]
        loss = self.layer(batch).sum() + self.other(batch).sum()
        sgd.zero_grad()
        adam.zero_grad()
        self.manual_backward(loss)
        sgd.step()
        adam.step()

    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.layer.parameters(), lr=0.1), torch.optim.Adam(self.other.parameters(), lr=0.01)]


def test_plot_several_optimizers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logger = CSVLogger(tmp_path)
    trainer = L.Trainer(
        max_steps=4,
        logger=logger,
        callbacks=[lwd.WeightDecayCallback(rules=lwd.presets.standard(0.05))],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(_TwoOptimizers())
    series, _ = _plotting.read_logs(logger.log_dir)
    assert set(series["param_norm"]) == {"SGD/decay", "SGD/no_decay", "Adam/decay", "Adam/no_decay"}
    assert set(series["timescale"]) == {"SGD/decay", "Adam/decay"}
    main(["plot", logger.log_dir, "-o", str(tmp_path / "two.png")])
    out = capsys.readouterr().out
    assert re.search(r"^SGD/decay +.* 200 ", out, re.MULTILINE), out  # 1 / (0.1 * 0.05)
    assert re.search(r"^Adam/decay +.* 2,000 ", out, re.MULTILINE), out  # 1 / (0.01 * 0.05)
    _assert_png(tmp_path / "two.png")


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"lightning-wd {lwd.__version__}"
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--help"])
    assert exc.value.code == 0 and "--init-args JSON" in capsys.readouterr().out
