"""The benchmark scripts run (smoke runs), their memory claims hold, and the README's comparison is theirs.

Timings are not asserted here (they live in BENCHMARKS.md); what is asserted is what does not depend
on the machine: every script runs against the current private step path of the callback, the
modes that need no update hold no copy of the parameters while those that do hold exactly one
(what the callback's docstring documents), and the grouping table in the README is the one the
script prints.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_wd import functional as F

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _rows(text: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines() if line.startswith("|")
    ]


@pytest.mark.parametrize(
    ("script", "args", "expect"),
    [
        ("bench_decay.py", ["--quick"], "callback decoupled at >= 80% of the copy bandwidth (GPU)"),
        ("bench_fit.py", ["--quick"], "target: end to end, default logging, <= 1% over AdamW's own decay"),
        ("bench_plan.py", ["--sizes", "10000", "--repeat", "1"], "target: 10,000 tensors planned"),
        ("bench_host.py", ["--quick"], "target: host time per step flat"),
    ],
    ids=["decay", "fit", "plan", "host"],
)
def test_benchmark_smoke_runs(script, args, expect):
    assert expect in _run(script, *args)


def _bytes(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]


#: On CPU, a few large tensors are measured (`relative`) and masked (`cautious`) block by block, with
#: scratch blocks of `_BLOCK` float32: one for the measure, two for the mask (2 MiB), plus a few bytes.
_SCRATCH = 2 * 4 * F._BLOCK + 2**14


def test_memory_benchmark_shows_the_documented_cost():
    output = _run("bench_memory.py", "--quick")
    decayed = 4 * int(output.split("bench_memory: ", 1)[1].split()[0].replace(",", ""))  # float32 bytes
    rows = _rows(output)
    step = {(r[0], r[1]): r for r in rows if len(r) == 7 and r[0].endswith(" tensors") and r[0][0].isdigit()}
    assert step, "no step-memory table"
    for (tensors, mode), (_, _, held, kept, peak, peak_bytes, left) in step.items():
        assert left == "0.00", (tensors, mode)  # nothing is left behind after the step
        needs_update = "cautious" in mode or "source=update" in mode or "log_update_norm" in mode
        if needs_update:
            assert held == "1.00", (tensors, mode)  # exactly one copy of the decayed parameters
        else:
            assert held == "None", (tensors, mode)
        # a few large CPU tensors: that copy is kept for the next step's (the same memory, no new pages)
        assert kept == ("1.00" if needs_update and tensors == "4 tensors" else "0.00"), (tensors, mode)
        if mode in ("decoupled", "lr_ratio", "independent"):
            assert float(peak) == 0.0, (tensors, mode)  # no copy at all (a few bytes of step factors)
        elif mode in ("relative, source=params", "relative, source=grad"):
            assert _bytes(peak_bytes) <= _SCRATCH, (tensors, mode)  # no copy: at most the measure's scratch block
        elif mode == "relative, source=update":
            assert decayed <= _bytes(peak_bytes) <= decayed + _SCRATCH, (tensors, mode)  # the copy, and the scratch
        elif mode == "ord=1 (L1)" and tensors != "4 tensors":
            assert float(peak) == 1.0, (tensors, mode)
        elif mode == "ord=1 (L1)":  # a few large tensors: the soft threshold in place, no temporary
            assert float(peak) == 0.0, (tensors, mode)
        elif mode in ("cautious", "cautious, ord=1") and tensors == "4 tensors":  # the copy, and the scratch blocks
            assert decayed <= _bytes(peak_bytes) <= decayed + _SCRATCH, (tensors, mode)
        elif mode == "cautious, fused=True" and tensors == "4 tensors":  # the copy, and no temporary
            assert decayed <= _bytes(peak_bytes) <= decayed + 2**10, (tensors, mode)
        elif mode.startswith("cautious"):  # the copy, and the mask's temporary (fused=True: foreach for these)
            assert float(peak) == 2.0, (tensors, mode)


def test_readme_grouping_table_is_what_the_script_measures():
    measured = [r for r in _rows(_run("grouping_comparison.py")) if not set("".join(r)) <= set("-:")]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## How other tools group parameters", 1)[1]
    claimed = [r for r in _rows(section.split("\n## ", 1)[0]) if not set("".join(r)) <= set("-:")]
    assert claimed == measured
