"""The README's code runs, its printed output is what the code prints, and its two commands are the real ones.

Every ```python block of README.md is executed, in order, in one namespace (like a notebook),
inside a temporary working directory. A run of ``# ...`` comment lines right after a
``print(...)`` line is the output the README claims: each of those lines must appear in what
the block printed. Blocks in other languages (```bash, ```yaml) are not executed; the commands
they show are exercised by ``tests/test_examples.py``.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

EXAMPLE_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[examples]" && python examples/digits.py'
TEST_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _blocks(language: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every fenced block in ``language``."""
    text = README.read_text(encoding="utf-8")
    return [(text[: m.start()].count("\n") + 1, m.group(2)) for m in _FENCE.finditer(text) if m.group(1) == language]


def _claimed_output(code: str) -> list[str]:
    """The comment lines that directly follow a ``print(`` line: the output the README shows."""
    claimed: list[str] = []
    after_print = False
    for line in code.splitlines():
        stripped = line.strip()
        if stripped.startswith("print("):
            after_print = True
        elif after_print and stripped.startswith("# "):
            claimed.append(stripped[2:].rstrip())
        else:
            after_print = False
    return claimed


def test_readme_python_blocks_run_and_print_what_they_claim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = _blocks("python")
    assert len(blocks) >= 8, "the README lost its code examples"
    monkeypatch.chdir(tmp_path)  # the examples write lightning_logs/ and logs/ into the working directory
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for line, code in blocks:
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"README.md python block at line {line} failed: {type(err).__name__}: {err}") from err
        printed = [ln.rstrip() for ln in out.getvalue().splitlines()]
        for claimed in _claimed_output(code):
            assert claimed in printed, (
                f"README.md block at line {line} claims the output line\n  {claimed!r}\nbut printed:\n  "
                + "\n  ".join(printed)
            )


def test_readme_starts_with_the_two_commands() -> None:
    line, first = _blocks("bash")[0]
    commands = [c for c in first.splitlines() if c.strip() and not c.lstrip().startswith("#")]
    assert commands == [EXAMPLE_COMMAND, TEST_COMMAND], f"README.md line {line}: {commands}"
    text = README.read_text(encoding="utf-8")
    assert text.index(EXAMPLE_COMMAND) < text.index("## "), "the two commands must come before the first section"


def test_the_two_commands_match_what_the_project_runs() -> None:
    # The main example is the script the first command runs, with the options the README describes.
    digits = (ROOT / "examples" / "digits.py").read_text(encoding="utf-8")
    assert "python examples/digits.py" in digits
    for option in ("--epochs", "--out", "--seed", '"outputs/digits"'):
        assert option in digits
    # Both extras the commands install exist, and the test command is the one CI runs.
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r"^examples = \[", pyproject, re.MULTILINE)
    assert re.search(r"^test = \[", pyproject, re.MULTILINE)
    assert "torch==2.13.0" in TEST_COMMAND
    ci = ROOT / ".ci" / "run"
    if not ci.exists():
        pytest.skip(".ci/run does not exist in this checkout")
    script = [line.strip() for line in ci.read_text(encoding="utf-8").splitlines()]
    assert TEST_COMMAND in script, ".ci/run must run the README's test command verbatim"


def test_readme_links_the_changelog() -> None:
    assert "[Changelog](CHANGELOG.md)" in README.read_text(encoding="utf-8")
