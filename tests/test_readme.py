"""The README stays short and points to the documentation, and its two commands are the real ones.

Its ```python blocks run alone, with the documentation's, in ``tests/test_docs.py``. Blocks in other
languages (```bash) are not executed; the commands they show are exercised by ``tests/test_examples.py``
and by ``.ci/run``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

EXAMPLE_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[examples]" && python examples/digits.py'
TEST_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _text() -> str:
    return README.read_text(encoding="utf-8")


def _blocks(language: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every fenced block in ``language``."""
    text = _text()
    return [(text[: m.start()].count("\n") + 1, m.group(2)) for m in _FENCE.finditer(text) if m.group(1) == language]


def test_readme_is_short_with_one_complete_example() -> None:
    lines = _text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines: move reference material to docs/"
    assert len(_blocks("python")) == 1, "the README shows one complete example; the guides hold the rest"


def test_readme_starts_with_the_two_commands() -> None:
    line, first = _blocks("bash")[0]
    commands = [c for c in first.splitlines() if c.strip() and not c.lstrip().startswith("#")]
    assert commands == [EXAMPLE_COMMAND, TEST_COMMAND], f"README.md line {line}: {commands}"
    text = _text()
    assert text.index(EXAMPLE_COMMAND) < text.index("## "), "the two commands must come before the first section"
    assert "about 8 minutes on 2 CPU cores" in " ".join(text.split()), "the README says how long the tests take"


def test_the_two_commands_match_what_the_project_runs() -> None:
    # The main example is the script the first command runs, with the options the README describes.
    digits = (ROOT / "examples" / "digits.py").read_text(encoding="utf-8")
    assert "python examples/digits.py" in digits
    for option in ("--epochs", "--out", "--seed", '"outputs/digits"'):
        assert option in digits
    # Both extras the commands install exist, the test extra installs the docs tools (so CI builds the
    # site), and the test command is the one CI runs.
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r"^examples = \[", pyproject, re.MULTILINE)
    test_extra = re.search(r"^test = \[(.*?)^\]", pyproject, re.MULTILINE | re.DOTALL)
    docs_extra = re.search(r"^docs = \[(.*?)^\]", pyproject, re.MULTILINE | re.DOTALL)
    assert test_extra and docs_extra, "pyproject.toml needs the `test` and `docs` extras"
    for package in ("mkdocs-material", "mkdocstrings[python]"):
        assert package in docs_extra.group(1) and package in test_extra.group(1), package
    assert "torch==2.13.0" in TEST_COMMAND
    ci = ROOT / ".ci" / "run"
    if not ci.exists():
        pytest.skip(".ci/run does not exist in this checkout")
    script = [line.strip() for line in ci.read_text(encoding="utf-8").splitlines()]
    assert TEST_COMMAND in script, ".ci/run must run the README's test command verbatim"


def test_readme_links_every_guide_and_each_link_resolves() -> None:
    text = _text()
    targets = {m.group(1) for m in _LINK.finditer(text) if "://" not in m.group(1)}
    for target in sorted(targets):
        assert (ROOT / target).exists(), f"README.md links {target}, which does not exist"
    guides = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs" / "guides").glob("*.md")}
    assert guides - targets == set(), "README.md has no link to these guides"
    for page in ("CHANGELOG.md", "docs/getting-started.md", "docs/architecture.md"):
        assert page in targets, page


def test_readme_cites_only_files_of_the_repository() -> None:
    assert "DESIGN.md" not in _text(), "the design lives in docs/architecture.md"
