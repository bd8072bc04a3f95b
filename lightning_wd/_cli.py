"""Command line: ``lightning-wd explain`` (a model's decay plan) and ``lightning-wd plot`` (logged metrics).

Run as ``lightning-wd ...`` (console script) or ``python -m lightning_wd ...``::

    lightning-wd explain my_models:Net --rules gpt --weight-decay 0.1
    lightning-wd explain path/to/models.py:Net --init-args '{"width": 64}' --param head.weight
    lightning-wd explain my_models:LM --example-input int64:2x16    # roles traced from a forward pass
    lightning-wd plot lightning_logs/version_0 -o wd.png

Errors in the arguments (an import path that does not import, a class that is not there,
an unknown preset, malformed JSON) exit with status 2 and a message naming the argument
and the fix; a missing optional dependency (matplotlib) exits with status 1.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

__all__ = ["main"]

#: Presets usable by name with ``--rules``; the value says whether the preset takes a weight decay.
_PRESETS: dict[str, bool] = {"standard": True, "gpt": True, "uniform": True, "none": False}


#: How the model argument is named in messages (as in the usage line).
_MODEL_ARG = "MODULE:CLASS"


class UsageError(Exception):
    """A bad command-line argument: reported with the argument's name and a fix, exit status 2."""


def _fail(message: str, status: int = 2) -> NoReturn:
    print(f"lightning-wd: error: {message}", file=sys.stderr)
    raise SystemExit(status)


# ---------------------------------------------------------------------------- imports
def _import_module(spec: str, argument: str) -> ModuleType:
    """Import ``spec``: a dotted module path (the current directory is searched too) or a ``.py`` file path."""
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        path = Path(spec)
        if not path.is_file():
            raise UsageError(
                f"`{argument}`: the file {spec!r} does not exist. Give a path to a .py file, relative to"
                f" {os.getcwd()!r}, or a dotted import path such as 'my_package.models'."
            )
        name = f"_lightning_wd_cli_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        sys.path.insert(0, str(path.resolve().parent))  # so that the file's own sibling imports work
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            sys.modules.pop(name, None)
            raise UsageError(f"`{argument}`: running {spec!r} failed with {type(err).__name__}: {err}") from err
        finally:
            sys.path.remove(str(path.resolve().parent))
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if spec == missing or spec.startswith(missing + "."):
            raise UsageError(
                f"`{argument}`: no module named {missing!r} can be imported (searched the current directory"
                f" {os.getcwd()!r} and the installed packages). Check the spelling, run from the directory that"
                f" contains it, or give a file path such as 'path/to/{spec.rsplit('.', 1)[-1]}.py'."
            ) from err
        raise UsageError(
            f"`{argument}`: importing {spec!r} failed because it imports {missing!r}, which is not installed."
            f" Install it (pip install {missing.split('.')[0]}) or fix the import."
        ) from err
    except Exception as err:
        raise UsageError(f"`{argument}`: importing {spec!r} failed with {type(err).__name__}: {err}") from err


def _module_classes(module: ModuleType) -> list[str]:
    from torch import nn

    return sorted(
        name
        for name, obj in vars(module).items()
        if inspect.isclass(obj) and issubclass(obj, nn.Module) and obj.__module__ == module.__name__
    )


def _resolve(target: str, argument: str, example: str) -> tuple[ModuleType, Any]:
    """Resolve ``MODULE:ATTR`` (ATTR may be dotted) to the module and the object."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        module_example, _, attr_example = example.partition(":")
        raise UsageError(
            f"`{argument}` must be a module and an attribute separated by ':', for example {example!r} or"
            f" 'path/to/{module_example}.py:{attr_example}', got {target!r}."
        )
    module = _import_module(module_name, argument)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = _module_classes(module) if obj is module else [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            listing = f" It defines: {', '.join(names)}." if names else ""
            raise UsageError(f"`{argument}`: {module_name!r} has no attribute {attr!r}.{hint}{listing}")
        obj = getattr(obj, part)
    return module, obj


# ---------------------------------------------------------------------------- explain
def _load_model(target: str, init_args: str | None) -> Any:
    from torch import nn

    _, factory = _resolve(target, _MODEL_ARG, "my_models:Net")
    kwargs: dict[str, Any] = {}
    if init_args:
        try:
            kwargs = json.loads(init_args)
        except json.JSONDecodeError as err:
            raise UsageError(
                f"`--init-args` is not valid JSON ({err.msg} at character {err.pos}): {init_args!r}. Write an"
                ' object such as \'{"width": 64, "depth": 2}\' (double quotes inside single quotes).'
            ) from err
        if not isinstance(kwargs, dict):
            raise UsageError(
                f"`--init-args` must be a JSON object of keyword arguments, got {type(kwargs).__name__}"
                f" {init_args!r}. Write for example '{{\"width\": 64}}'."
            )
    if not callable(factory):
        raise UsageError(
            f"`{_MODEL_ARG}`: {target!r} is a {type(factory).__name__}, not a class. Name an nn.Module class."
        )
    try:
        model = factory(**kwargs)
    except TypeError as err:
        raise UsageError(
            f"`--init-args`: {target}(**{kwargs!r}) failed: {err}. Pass the constructor's arguments as a JSON"
            " object with --init-args."
        ) from err
    if not isinstance(model, nn.Module):
        raise UsageError(f"`{_MODEL_ARG}`: {target!r} returned {type(model).__name__}, not a torch.nn.Module.")
    return model


def _load_rules(spec: str | None, weight_decay: float | None, model: Any) -> tuple[Any, dict[str, Any], str]:
    """The rules to plan with, the plan options, and a label saying where they came from."""
    import lightning_wd as lwd

    if spec is None:
        own = getattr(model, "decay_rules", None)
        if own is not None:
            if weight_decay is not None:
                raise UsageError(
                    f"`--weight-decay` applies to a preset, but {type(model).__name__} defines its own"
                    " `decay_rules`, which are used when `--rules` is not given. Drop --weight-decay, or give"
                    " a preset: --rules standard --weight-decay X."
                )
            options = dict(getattr(model, "decay_plan_options", {}) or {})
            return own, options, f"{type(model).__name__}.decay_rules"
        spec = "standard"
    if ":" not in spec:
        if spec not in _PRESETS:
            close = difflib.get_close_matches(spec, list(_PRESETS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UsageError(
                f"`--rules`: unknown preset {spec!r}.{hint} Use any of the following: {', '.join(_PRESETS)}; or"
                " MODULE:ATTR naming a list of DecayRule (or a function returning one), e.g. 'my_rules:RULES'."
            )
        factory: Callable[..., Any] = getattr(lwd.presets, spec)
        if not _PRESETS[spec]:
            if weight_decay is not None:
                raise UsageError(f"`--weight-decay`: preset {spec!r} decays nothing and takes no weight decay.")
            return factory(), {}, f"preset {spec}()"
        if weight_decay is None:
            if spec == "uniform":
                raise UsageError("`--weight-decay` is required with preset 'uniform', e.g. --weight-decay 0.01.")
            return factory(), {}, f"preset {spec}()"
        return factory(weight_decay), {}, f"preset {spec}(weight_decay={weight_decay:g})"
    _, obj = _resolve(spec, "--rules", "my_rules:RULES")
    if callable(obj) and not isinstance(obj, (list, tuple)):
        try:
            obj = obj() if weight_decay is None else obj(weight_decay=weight_decay)
        except TypeError as err:
            raise UsageError(f"`--rules`: calling {spec} failed: {err}.") from err
    elif weight_decay is not None:
        raise UsageError(f"`--weight-decay`: {spec} is a list of rules, not a function; drop --weight-decay.")
    return obj, {}, spec


_SHAPE = re.compile(r"^\d+(?:[x,]\d+)*$")


def _example_tensor(spec: str) -> Any:
    """``2x16`` (float32 zeros), ``int64:2x16`` (a dtype, then the shape), or ``MODULE:ATTR`` naming the input
    (a tensor, a tuple of positional arguments, a dict of keywords, or a function returning one)."""
    import torch

    dtype_name, sep, shape = spec.rpartition(":")
    if not sep:
        dtype_name, shape = "float32", spec
    dtype = getattr(torch, dtype_name, None) if dtype_name.isidentifier() else None
    if _SHAPE.match(shape) and isinstance(dtype, torch.dtype):
        return torch.zeros([int(n) for n in re.split("[x,]", shape)], dtype=dtype)
    if not sep or _SHAPE.match(shape):
        raise UsageError(
            f"`--example-input` must be a shape such as '2x16', a dtype and a shape such as 'int64:2x16', or"
            f" MODULE:ATTR naming the input, got {spec!r}."
        )
    _, obj = _resolve(spec, "--example-input", "my_models:EXAMPLE_INPUT")
    if callable(obj) and not isinstance(obj, torch.Tensor):
        try:
            obj = obj()
        except Exception as err:
            raise UsageError(f"`--example-input`: calling {spec} failed with {type(err).__name__}: {err}") from err
    return obj


def _example_inputs(args: argparse.Namespace, model: Any) -> Any:
    """The inputs to trace with: ``--example-input`` (several are positional), else the model's
    ``example_input_array``; None with ``--no-trace``."""
    if args.no_trace:
        if args.example_input:
            raise UsageError("`--no-trace` and `--example-input` were both given; drop one of them.")
        return None
    if args.example_input:
        inputs = [_example_tensor(spec) for spec in args.example_input]
        return inputs[0] if len(inputs) == 1 else tuple(inputs)
    return getattr(model, "example_input_array", None)


def _explain(args: argparse.Namespace) -> None:
    import lightning_wd as lwd

    model = _load_model(args.model, args.init_args)
    rules, options, label = _load_rules(args.rules, args.weight_decay, model)
    example = _example_inputs(args, model)
    try:
        plan = lwd.DecayPlan.from_module(model, rules, example_inputs=example, **options)
    except (TypeError, ValueError) as err:
        raise UsageError(f"cannot plan {type(model).__name__} with {label}: {err}") from err
    print(f"Weight decay plan for {args.model} (rules: {label})")
    print("\n".join(line.rstrip() for line in plan.table().splitlines()))
    for name in args.param or []:
        try:
            print(plan.explain(name))
        except KeyError as err:  # the plan's message already suggests close names
            raise UsageError(f"`--param`: {err.args[0]}") from err
    if args.params:
        print()
        width = max(len(e.name) for e in plan.entries)
        for e in plan.entries:
            rule = e.rule if e.rule is not None else "<default>"
            line = f"{e.name.ljust(width)}  {e.group:<12} {rule:<16} {tuple(e.shape)!s:<18} {'/'.join(e.owners)}"
            if plan.trace is not None:
                line += f"  {e.traced.evidence if e.traced is not None else '(structure)'}"
            print(line)


# ---------------------------------------------------------------------------- plot
def _plot(args: argparse.Namespace) -> None:
    from lightning_wd import _plotting

    try:
        series, source = _plotting.read_logs(args.logs)
    except FileNotFoundError as err:
        raise UsageError(f"`LOG_DIR_OR_CSV`: {err}") from err
    except ValueError as err:
        raise UsageError(f"`LOG_DIR_OR_CSV`: {err}") from err
    out = Path(args.output) if args.output else source.parent / "weight_decay.png"
    try:
        _plotting.plot_metrics(series, out, title=args.title or f"Weight decay metrics: {source}")
    except ImportError as err:
        _fail(str(err), status=1)
    print(f"read {sum(len(g) for g in series.values())} series of {len(series)} metrics from {source}")
    print(_plotting.summarize(series))
    print(_plotting.diagnose(series))
    print(f"wrote {out}")


# ---------------------------------------------------------------------------- entry point
def _parser() -> argparse.ArgumentParser:
    from lightning_wd import __version__

    parser = argparse.ArgumentParser(
        prog="lightning-wd",
        description="Inspect weight-decay plans and plot the metrics logged by lightning_wd.WeightDecayCallback.",
    )
    parser.add_argument("--version", action="version", version=f"lightning-wd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{explain,plot}")

    explain = sub.add_parser(
        "explain",
        help="print the decay plan of a model class, without training",
        description="Instantiate a model class and print which parameters each decay rule claims.",
        epilog="Example: lightning-wd explain tests/cli_models.py:Net --rules gpt --param head.weight",
    )
    explain.add_argument("model", metavar="MODULE:CLASS", help="e.g. my_package.models:Net or path/to/models.py:Net")
    explain.add_argument(
        "--rules",
        metavar="PRESET_OR_MODULE:ATTR",
        help="a preset (standard, gpt, uniform, none) or MODULE:ATTR naming a list of DecayRule or a function"
        " returning one; default: the model's own decay_rules, else standard",
    )
    explain.add_argument("--weight-decay", type=float, metavar="X", help="λ passed to the preset (or function)")
    explain.add_argument("--init-args", metavar="JSON", help="constructor keyword arguments, e.g. '{\"width\": 64}'")
    explain.add_argument(
        "--param", action="append", metavar="NAME", help="explain why this parameter lands where it does (repeatable)"
    )
    explain.add_argument("--params", action="store_true", help="list every parameter with its group and rule")
    explain.add_argument(
        "--example-input",
        action="append",
        metavar="SPEC",
        help="trace one forward pass on this input and take each parameter's role from its use: a shape (2x16,"
        " float32 zeros), a dtype and a shape (int64:2x16), or MODULE:ATTR naming the input or a function"
        " returning it; repeat for several positional arguments. Default: the model's example_input_array",
    )
    explain.add_argument(
        "--no-trace", action="store_true", help="ignore the model's example_input_array: every role from structure"
    )
    explain.set_defaults(func=_explain)

    plot = sub.add_parser(
        "plot",
        help="plot the wd/... metrics of a CSVLogger or TensorBoard log",
        description="Plot the wd/<group>/<metric> series logged by WeightDecayCallback: one panel per metric,"
        " one line per parameter group.",
        epilog="Example: lightning-wd plot lightning_logs/version_0 -o wd.png",
    )
    plot.add_argument(
        "logs",
        metavar="LOG_DIR_OR_CSV",
        help="a metrics.csv, a TensorBoard event file, or a directory holding one (the newest is used)",
    )
    plot.add_argument("-o", "--output", metavar="FILE.png", help="image to write (default: next to the log)")
    plot.add_argument("--title", help="figure title")
    plot.set_defaults(func=_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``lightning-wd`` command line.

    Args:
        argv: Arguments without the program name; default ``sys.argv[1:]``.

    Raises:
        SystemExit: with status 2 on a bad argument (the message names it and the fix), 1 when
            matplotlib is missing for ``plot``, and 0 after ``--help``/``--version``.

    Examples:
        >>> main(["explain", "torch.nn:Linear", "--init-args", '{"in_features": 4, "out_features": 2}'])
        Weight decay plan for torch.nn:Linear (rules: preset standard())
        group     rules   tensors  elements  weight_decay  lr_scale
        --------  ------  -------  --------  ------------  --------
        no_decay  bias          1         2             0         1
        decay     linear        1         8          0.05         1
        --------  ------  -------  --------  ------------  --------
        total                   2        10
    """
    args = _parser().parse_args(argv)
    try:
        args.func(args)
    except UsageError as err:
        _fail(str(err))
