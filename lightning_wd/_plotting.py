"""Read the ``wd/...`` metrics that ``WeightDecayCallback`` logs, and plot them.

Shared by the ``lightning-wd plot`` command and the examples. Reading needs nothing
beyond the standard library (CSV) or ``tensorboard`` (event files); drawing needs
matplotlib, which is imported only when a plot is drawn (``pip install 'lightning-wd[plot]'``).

Logged names are ``wd/<group>/<metric>`` for one optimizer and
``wd/<Optimizer>/<group>/<metric>`` for several; the metric is always the last component,
so the group is everything between ``wd/`` and it.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "METRICS",
    "Series",
    "diagnose",
    "find_log_file",
    "import_pyplot",
    "parse_metric_name",
    "plot_metrics",
    "read_csv",
    "read_logs",
    "read_tensorboard",
    "summarize",
]

#: ``{metric: {group: (steps, values)}}``, steps ascending.
Series = dict[str, dict[str, tuple[list[int], list[float]]]]

#: The metrics the callback logs, in panel order, with the panel's title, y label and y scale.
METRICS: dict[str, tuple[str, str, str]] = {
    "param_norm": ("Parameter norm per group (L2 over all its tensors)", "‖θ‖₂", "auto"),
    "weight_decay": ("Weight decay λ in force (after any schedule)", "λ", "linear"),
    "timescale": ("Decay timescale 1/(η·λ): steps to shrink weights by 1/e", "steps (log scale)", "log"),
    "threshold": ("L1 soft-threshold step per optimizer step (η·λ)", "threshold (log scale)", "log"),
    "grad_norm": ("Gradient norm per group (L2)", "‖∇θ‖₂ (log scale)", "log"),
    "update_norm": ("Optimizer update norm per group (L2, before decay)", "‖Δθ‖₂ (log scale)", "log"),
    "effective_decay": ("Effective decay per step (η_t·λ, the step applied)", "step (log scale)", "log"),
    "update_ratio": ("Update-to-weight ratio ‖Δθ‖/‖θ‖ per step", "ratio (log scale)", "log"),
    "angular_update": ("Angular update per step (dotted: √(2ηλ), AdamW's equilibrium)", "radians (log scale)", "log"),
}
#: Metrics drawn inside another's panel (dashed), not in their own: metric -> the panel's metric.
_OVERLAYS = {"timescale_target": "timescale"}

_HOW_TO_READ = """How to read these panels
• Parameter norm: a decayed group's norm settles where the
  optimizer's updates and the decay balance; a steady fall
  means the decay dominates, a steady rise that the updates do.
• λ: the weight decay the callback applied (no_decay groups: 0).
• Timescale 1/(η·λ): optimizer steps for the decay alone to
  shrink the weights by 1/e. Far above the dashed run length,
  the decay barely acted; far below, it dominates training.
  With mode="decoupled" it follows 1/η: it rises as the
  learning rate is annealed."""

_PLOT_HINT = "pip install 'lightning-wd[plot]'"
_EVENT_PREFIX = "events.out.tfevents."


def parse_metric_name(name: str) -> tuple[str, str] | None:
    """Split a logged name into ``(metric, group)``, or None when it is not a ``wd/`` metric.

    Args:
        name: A logged metric name.

    Returns:
        ``(metric, group)``; the group keeps an optimizer prefix (``"AdamW/decay"``).

    Examples:
        >>> parse_metric_name("wd/decay/param_norm")
        ('param_norm', 'decay')
        >>> parse_metric_name("wd/SGD/pg1/no_decay/weight_decay")
        ('weight_decay', 'SGD/pg1/no_decay')
        >>> parse_metric_name("train_loss") is None
        True
    """
    if not name.startswith("wd/"):
        return None
    group, _, metric = name[3:].rpartition("/")
    if not group or not metric:
        return None
    return metric, group


def _add(series: Series, name: str, step: int, value: float) -> None:
    parsed = parse_metric_name(name)
    if parsed is None:
        return
    metric, group = parsed
    steps, values = series.setdefault(metric, {}).setdefault(group, ([], []))
    steps.append(step)
    values.append(value)


def _sorted(series: Series) -> Series:
    """Order each line by step (CSV rows and event files need not be ordered)."""
    out: Series = {}
    for metric, groups in series.items():
        out[metric] = {}
        for group, (steps, values) in groups.items():
            pairs = sorted(zip(steps, values, strict=True), key=lambda sv: sv[0])
            out[metric][group] = ([s for s, _ in pairs], [v for _, v in pairs])
    return out


def read_csv(path: str | os.PathLike[str]) -> Series:
    """Read the ``wd/`` metrics of a CSVLogger ``metrics.csv``.

    Args:
        path: The CSV file (its ``step`` column gives the x axis).

    Returns:
        ``{metric: {group: (steps, values)}}``; empty when the file has no ``wd/`` column.

    Raises:
        ValueError: if the file has no ``step`` column.

    Examples:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "metrics.csv"
        >>> _ = path.write_text("step,train_loss,wd/decay/param_norm\\n0,1.5,\\n1,,3.0\\n2,,2.5\\n")
        >>> read_csv(path)
        {'param_norm': {'decay': ([1, 2], [3.0, 2.5])}}
    """
    series: Series = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise ValueError(
                f"{str(path)!r} has no 'step' column, so it is not a CSVLogger metrics.csv. Give the metrics.csv"
                " written by lightning.pytorch.loggers.CSVLogger, or the directory that holds it."
            )
        columns = [c for c in reader.fieldnames if parse_metric_name(c) is not None]
        for row in reader:
            step = row.get("step") or ""
            if not step:
                continue
            for column in columns:
                cell = row.get(column) or ""
                if cell:
                    _add(series, column, int(float(step)), float(cell))
    return _sorted(series)


def read_tensorboard(path: str | os.PathLike[str]) -> Series:
    """Read the ``wd/`` scalars of TensorBoard event files (needs ``tensorboard``).

    Args:
        path: An event file, or a directory holding event files (searched recursively).

    Returns:
        ``{metric: {group: (steps, values)}}``.

    Raises:
        ImportError: if ``tensorboard`` is not installed.
        FileNotFoundError: if ``path`` holds no event file.

    Examples:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> logdir = tempfile.mkdtemp()
        >>> with SummaryWriter(logdir) as writer:
        ...     writer.add_scalar("wd/decay/weight_decay", 0.05, global_step=3)
        >>> read_tensorboard(logdir)
        {'weight_decay': {'decay': ([3], [0.05000000074505806])}}
    """
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError as err:  # pragma: no cover - tensorboard is installed with lightning's extras
        raise ImportError(
            "Reading TensorBoard logs needs `tensorboard`: pip install tensorboard (or read a CSVLogger metrics.csv)."
        ) from err
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob(f"{_EVENT_PREFIX}*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"No TensorBoard event file ({_EVENT_PREFIX}*) under {str(root)!r}.")
    series: Series = {}
    for file in files:
        acc = event_accumulator.EventAccumulator(str(file), size_guidance={event_accumulator.SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if parse_metric_name(tag) is None:
                continue
            for event in acc.Scalars(tag):
                _add(series, tag, int(event.step), float(event.value))
    return _sorted(series)


def find_log_file(path: str | os.PathLike[str]) -> Path:
    """The log to read under ``path``: the file itself, or the newest ``metrics.csv`` or event file below it.

    A ``metrics.csv`` is preferred to event files; among several, the most recently modified
    one wins (Lightning writes each run to a new ``version_N`` directory).

    Args:
        path: A ``metrics.csv``, an event file, or a directory holding either.

    Returns:
        The file to read.

    Raises:
        FileNotFoundError: if ``path`` does not exist or holds neither kind of file.

    Examples:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> (root / "version_0").mkdir()
        >>> _ = (root / "version_0" / "metrics.csv").write_text("step\\n")
        >>> find_log_file(root).relative_to(root).as_posix()
        'version_0/metrics.csv'
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(
            f"{str(root)!r} does not exist. Give a CSVLogger metrics.csv, a TensorBoard event file, or a log"
            " directory (for example lightning_logs/version_0)."
        )
    if root.is_file():
        return root
    for pattern in ("metrics.csv", f"{_EVENT_PREFIX}*"):
        found = [p for p in root.rglob(pattern) if p.is_file()]
        if found:
            return max(found, key=lambda p: (p.stat().st_mtime, str(p)))
    raise FileNotFoundError(
        f"{str(root)!r} holds no metrics.csv and no TensorBoard event file. Log with"
        " lightning.pytorch.loggers.CSVLogger or TensorBoardLogger and WeightDecayCallback, then point here"
        " at the logger's directory."
    )


def read_logs(path: str | os.PathLike[str]) -> tuple[Series, Path]:
    """Read the ``wd/`` metrics of a CSV file, an event file, or the newest log under a directory.

    Args:
        path: See ``find_log_file``.

    Returns:
        The series and the file they were read from.

    Raises:
        FileNotFoundError: as ``find_log_file``.
        ValueError: if the file holds no ``wd/`` metric.

    Examples:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (root / "metrics.csv").write_text("step,wd/decay/weight_decay\\n0,0.05\\n")
        >>> series, source = read_logs(root)
        >>> series, source.name
        ({'weight_decay': {'decay': ([0], [0.05])}}, 'metrics.csv')
    """
    source = find_log_file(path)
    if source.name.endswith(".csv"):
        series = read_csv(source)
    elif source.name.startswith(_EVENT_PREFIX):
        series = read_tensorboard(source.parent if Path(path).is_dir() else source)
    else:
        raise ValueError(
            f"{str(source)!r} is neither a .csv file nor a TensorBoard event file ({_EVENT_PREFIX}*)."
            " Give a CSVLogger metrics.csv, an event file, or the directory holding one."
        )
    if not series:
        raise ValueError(
            f"{str(source)!r} has no 'wd/...' metric. Add lightning_wd.WeightDecayCallback to the Trainer's"
            " callbacks (with log_norms=True, the default) and log at least one logging step."
        )
    return series, source


def _decay_integral(steps: list[int], timescales: list[float]) -> float:
    """Σ η_t·λ over the run from the logged timescales 1/(η·λ): trapezoids between logged steps.

    Before the first logged step the first value is assumed (steps count from 0).
    """
    rates = [0.0 if t <= 0 or math.isinf(t) else 1.0 / t for t in timescales]
    total = rates[0] * steps[0]
    for i in range(1, len(steps)):
        total += 0.5 * (rates[i] + rates[i - 1]) * (steps[i] - steps[i - 1])
    return total


def summarize(series: Series) -> str:
    """A short text table per group: parameter norm first and last, λ, timescale range, and total shrink.

    The shrink factor is what the decay alone did to the group's weights over the run,
    ``exp(-Σ η_t·λ)``, integrated from the logged timescales: ``x1.00`` means the decay
    barely acted, ``x0.37`` that it alone would have shrunk them by ``1/e``.

    Args:
        series: As returned by ``read_logs``.

    Returns:
        The table, followed by the run length.

    Examples:
        >>> series = {
        ...     "param_norm": {"decay": ([0, 100], [10.0, 8.0]), "no_decay": ([0, 100], [2.0, 2.5])},
        ...     "weight_decay": {"decay": ([0, 100], [0.05, 0.05]), "no_decay": ([0, 100], [0.0, 0.0])},
        ...     "timescale": {"decay": ([0, 100], [100.0, 100.0])},
        ... }
        >>> print(summarize(series))
        group     param_norm first -> last  λ (last)  timescale (steps)  shrink by decay alone
        --------  ------------------------  --------  -----------------  ---------------------
        decay               10 -> 8 (-20%)      0.05                100                  x0.37
        no_decay           2 -> 2.5 (+25%)         0                  -                      -
        run length: 100 optimizer steps. Timescale 1/(η·λ): steps for the decay alone to shrink weights by 1/e.
    """
    groups = list(dict.fromkeys(g for metric in series.values() for g in metric))
    header = ("group", "param_norm first -> last", "λ (last)", "timescale (steps)", "shrink by decay alone")
    rows = []
    for group in groups:
        norms = series.get("param_norm", {}).get(group, ([], []))[1]
        if norms:
            change = f" ({(norms[-1] / norms[0] - 1) * 100:+.0f}%)" if norms[0] else ""
            norm = f"{norms[0]:.3g} -> {norms[-1]:.3g}{change}"
        else:
            norm = "-"
        wds = series.get("weight_decay", {}).get(group, ([], []))[1]
        steps, timescales = series.get("timescale", {}).get(group, ([], []))
        finite = [t for t in timescales if math.isfinite(t) and t > 0]
        if finite:
            low, high = min(finite), max(finite)
            timescale = f"{low:,.0f}" if high < 1.05 * low else f"{low:,.0f}..{high:,.0f}"
            shrink = f"x{math.exp(-_decay_integral(steps, timescales)):.2f}"
        else:
            timescale = shrink = "-"
        rows.append((group, norm, f"{wds[-1]:g}" if wds else "-", timescale, shrink))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    last_step = max((steps[-1] for groups_ in series.values() for steps, _ in groups_.values() if steps), default=0)
    lines.append(
        f"run length: {last_step:,} optimizer steps. Timescale 1/(η·λ): steps for the decay alone to shrink"
        " weights by 1/e."
    )
    return "\n".join(line.rstrip() for line in lines)


def import_pyplot() -> Any:
    """Import ``matplotlib.pyplot`` with a non-interactive backend, or explain how to install it.

    Returns:
        The ``matplotlib.pyplot`` module.

    Raises:
        ImportError: if matplotlib is not installed; the message gives the install command.

    Examples:
        >>> plt = import_pyplot()
        >>> plt.__name__
        'matplotlib.pyplot'
    """
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            f"Plotting weight-decay metrics needs matplotlib, which is not installed. Install it with: {_PLOT_HINT}"
        ) from err
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_scale_helps(lines: Mapping[str, tuple[list[int], list[float]]]) -> bool:
    positive = [v for _, values in lines.values() for v in values if v > 0 and math.isfinite(v)]
    if not positive or len(positive) < sum(len(values) for _, values in lines.values()):
        return False
    return max(positive) / min(positive) > 20


def plot_metrics(
    series: Series,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> Path:
    """Draw one panel per logged metric kind, one line per group, and save the figure.

    Panels follow ``METRICS``' order (parameter norm, λ, timescale or threshold, gradient
    and update norms when logged). The timescale panel shows the run length as a dashed line:
    a timescale far above it means the decay barely acted during the run.

    Args:
        series: As returned by ``read_logs``.
        path: Where to save the figure (the suffix picks the format, e.g. ``.png``).
        title: Figure title.

    Returns:
        The path written.

    Raises:
        ImportError: if matplotlib is not installed (the message says ``pip install 'lightning-wd[plot]'``).
        ValueError: if ``series`` is empty.

    Examples:
        >>> import tempfile, pathlib
        >>> series = {"param_norm": {"decay": ([1, 2, 3], [3.0, 2.9, 2.8])}}
        >>> out = plot_metrics(series, pathlib.Path(tempfile.mkdtemp()) / "wd.png", title="demo")
        >>> out.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
        True
    """
    if not series:
        raise ValueError("`series` is empty: there is nothing to plot.")
    plt = import_pyplot()
    metrics = [m for m in METRICS if m in series] + sorted(m for m in series if m not in METRICS and m not in _OVERLAYS)
    groups = list(dict.fromkeys(g for m in metrics for g in series[m]))
    colors = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    labels = {g: g for g in groups}
    for group, (_, values) in series.get("weight_decay", {}).items():
        if values and min(values) == max(values):
            labels[group] = f"{group} (λ={values[-1]:g})"
    last_step = max(steps[-1] for m in metrics for steps, _ in series[m].values() if steps)

    ncols = 1 if len(metrics) == 1 else 2
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 3.6 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):  # spare axes stay empty
        panel_title, ylabel, scale = METRICS.get(metric, (metric, metric, "auto"))
        lines = series[metric]
        for group, (steps, values) in lines.items():
            marker = "o" if len(steps) < 15 else None
            ax.plot(steps, values, label=labels[group], color=colors[group], marker=marker, markersize=3)
        positive = all(v > 0 for _, values in lines.values() for v in values)
        if positive and (scale == "log" or (scale == "auto" and _log_scale_helps(lines))):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
            if scale == "auto":
                ylabel += " (log scale)"
        if metric == "timescale":
            ax.axhline(last_step, color="gray", linestyle="--", linewidth=1, label=f"run length ({last_step:,} steps)")
            for group, (steps, values) in series.get("timescale_target", {}).items():
                ax.plot(steps, values, color=colors.get(group, "gray"), linestyle=":", label=f"{group} target")
        if metric == "angular_update":  # equilibrium of AdamW (Kosson et al. 2024): √(2ηλ) per step
            for group, (steps, values) in series.get("effective_decay", {}).items():
                if group in lines and any(v > 0 for v in values):
                    ax.plot(steps, [math.sqrt(2 * v) for v in values], color=colors[group], linestyle=":")
        if ax.get_yscale() == "log":  # minor ticks labelled only where the axis spans under a decade
            low, high = ax.get_ylim()  # (the lines drawn above, such as the run length, included)
            minor = ax.yaxis.get_major_formatter() if high < 10 * low else plt.NullFormatter()
            ax.yaxis.set_minor_formatter(minor)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # steps are whole numbers
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(title="parameter group", fontsize=8, title_fontsize=8)
    spare = list(axes.flat)[len(metrics) :]
    for ax in spare:
        ax.axis("off")
    if spare:
        spare[0].text(
            0.02, 0.95, _HOW_TO_READ, va="top", ha="left", fontsize=9, wrap=True, transform=spare[0].transAxes
        )
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _last_part(steps: list[int], values: list[float], start: float) -> list[float]:
    """The finite values logged at steps >= ``start``."""
    return [v for s, v in zip(steps, values, strict=True) if s >= start and math.isfinite(v)]


def _timescale_reading(timescale: float, run: int) -> str:
    share = timescale / run
    head = f"timescale 1/(η·λ) = {timescale:,.0f} steps, {share:.0%} of the {run:,}-step run"
    if share > 1:
        return (
            f"{head}: longer than the run, so the decay barely acted (alone it would have shrunk the weights only"
            f" x{math.exp(-1 / share):.2f}) and the norm cannot reach the equilibrium λ and η set. Raise λ, or set it"
            " with timescale_fraction."
        )
    if share < 0.01:
        return (
            f"{head}: under 1% of the run, so the weights forget every update older than {timescale:,.0f} steps; λ"
            " is probably too large, unless that is intended."
        )
    return f"{head}: the weights average the updates of about the last {share:.0%} of the run."


def _norm_reading(steps: list[int], norms: list[float], run: int) -> str:
    window = _last_part(steps, norms, 0.75 * run)
    if len(window) < 2 or not window[0]:
        return "param_norm: too few logged steps in the last quarter of the run to say whether it settled."
    drift = window[-1] / window[0] - 1
    head = f"param_norm over the last quarter: {window[0]:.4g} -> {window[-1]:.4g} ({drift:+.1%})"
    if abs(drift) <= 0.05:
        return f"{head}: settled; the norm is at the equilibrium that the updates and the decay set."
    direction = "falling" if drift < 0 else "rising"
    return (
        f"{head}: still {direction}, not settled; the norm is still moving toward its equilibrium (a longer run, or a"
        " shorter timescale, gets it there)."
    )


def _angle_reading(series: Series, group: str, run: int) -> str | None:
    steps, angles = series.get("angular_update", {}).get(group, ([], []))
    decay = series.get("effective_decay", {}).get(group, ([], []))
    window, rates = _last_part(steps, angles, 0.75 * run), _last_part(*decay, 0.75 * run)
    if not window or not rates or max(rates) <= 0:
        return None
    angle, expected = sum(window) / len(window), math.sqrt(2 * sum(rates) / len(rates))
    ratio = angle / expected
    verdict = "close to it" if 0.7 <= ratio <= 1.4 else ("below it" if ratio < 0.7 else "above it")
    return (
        f"angular update {angle:.3g} rad per step over the last quarter; AdamW's rotational equilibrium is"
        f" √(2ηλ) = {expected:.3g}: {verdict} ({ratio:.2f}x)."
    )


def diagnose(series: Series, *, run_length: int | None = None) -> str:
    """A plain-language report per group: the decay timescale against the run, and whether the norm settled.

    For each group: the last logged ``timescale`` as a share of the run (longer than the run: the
    decay barely acted; under 1%: it forgets almost everything), the drift of ``param_norm`` over the
    last quarter of the run (within ±5%: settled at its equilibrium), and, where ``angular_update``
    and ``effective_decay`` were logged, the angular update against ``√(2ηλ)``, its value at AdamW's
    rotational equilibrium (Kosson et al. 2024).

    Args:
        series: As returned by ``read_logs``.
        run_length: The run's optimizer steps; default: the last logged step.

    Returns:
        The report, one paragraph per group.

    Examples:
        >>> series = {
        ...     "param_norm": {"decay": ([0, 800, 1000], [10.0, 6.1, 6.0])},
        ...     "timescale": {"decay": ([0, 800, 1000], [250.0, 250.0, 250.0])},
        ... }
        >>> print(diagnose(series))
        Weight decay over 1,000 optimizer steps
        decay: timescale 1/(η·λ) = 250 steps, 25% of the 1,000-step run: the weights average the updates of about the last 25% of the run.
          param_norm over the last quarter: 6.1 -> 6 (-1.6%): settled; the norm is at the equilibrium that the updates and the decay set.
    """  # noqa: E501
    run = run_length or max((s[-1] for groups in series.values() for s, _ in groups.values() if s), default=0)
    run = max(run, 1)
    groups = list(
        dict.fromkeys(g for m in ("param_norm", "timescale", "threshold", "weight_decay") for g in series.get(m, {}))
    )
    lines = [f"Weight decay over {run:,} optimizer steps"]
    for group in groups:
        steps, timescales = series.get("timescale", {}).get(group, ([], []))
        finite = [t for t in timescales if math.isfinite(t) and t > 0]
        thresholds = [t for t in series.get("threshold", {}).get(group, ([], []))[1] if t > 0]
        if finite:
            reading = _timescale_reading(finite[-1], run)
        elif thresholds:  # ord=1: a soft threshold, which has no timescale
            reading = f"L1 soft threshold of {thresholds[-1]:.3g} per step (no timescale: it zeroes what it reaches)."
        else:
            reading = "not decayed (λ = 0)."
        lines.append(f"{group}: {reading}")
        steps, norms = series.get("param_norm", {}).get(group, ([], []))
        if norms:
            lines.append("  " + _norm_reading(steps, norms, run))
        angle = _angle_reading(series, group, run)
        if angle is not None:
            lines.append("  " + angle)
    return "\n".join(lines)
