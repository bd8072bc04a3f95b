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
        ("bench_decay.py", ["--quick"], "flat buffer mul_ (reference)"),
        ("bench_fit.py", ["--quick"], "A: AdamW's own decay, no callback"),
        ("bench_plan.py", ["--sizes", "1000", "--repeat", "1"], "1,000"),
    ],
    ids=["decay", "fit", "plan"],
)
def test_benchmark_smoke_runs(script, args, expect):
    assert expect in _run(script, *args)


def test_memory_benchmark_shows_the_documented_cost():
    rows = _rows(_run("bench_memory.py", "--quick"))
    step = {(r[0], r[1]): r for r in rows if len(r) == 6 and r[0].endswith(" tensors") and r[0][0].isdigit()}
    assert step, "no step-memory table"
    for (tensors, mode), (_, _, held, peak, _, left) in step.items():
        assert left == "0.00", (tensors, mode)  # nothing is left behind after the step
        needs_update = "cautious" in mode or "source=update" in mode or "log_update_norm" in mode
        if needs_update:
            assert held == "1.00", (tensors, mode)  # exactly one copy of the decayed parameters
        else:
            assert held == "None", (tensors, mode)
        if mode in ("decoupled", "lr_ratio", "independent", "relative, source=params", "relative, source=grad"):
            assert float(peak) == 0.0, (tensors, mode)  # no copy at all (a few bytes of step factors)
        elif mode in ("relative, source=update", "ord=1 (L1)"):
            assert float(peak) == 1.0, (tensors, mode)
        elif mode == "cautious":
            assert float(peak) == 2.0, (tensors, mode)


def test_readme_grouping_table_is_what_the_script_measures():
    measured = [r for r in _rows(_run("grouping_comparison.py")) if not set("".join(r)) <= set("-:")]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## How other tools group parameters", 1)[1]
    claimed = [r for r in _rows(section.split("\n## ", 1)[0]) if not set("".join(r)) <= set("-:")]
    assert claimed == measured
