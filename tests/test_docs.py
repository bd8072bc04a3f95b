"""The documentation builds, every code block in it runs on its own, and the docstrings render.

* ``mkdocs build --strict`` (the ``docs`` extra, also in the ``test`` extra) builds the site into a
  temporary directory, so a broken link, a missing page or an API reference that does not resolve
  fails the suite.
* Every fenced ```python block of README.md and docs/**/*.md runs alone, in a fresh namespace as
  ``__main__``, in an empty working directory: a block that relies on an earlier one fails. A run
  of ``# ...`` comment lines right after a ``print(...)`` line is the output the block claims;
  each of those lines must appear in what it printed. Blocks in other languages (bash, yaml) are
  not run: ``tests/test_examples.py`` and ``tests/test_cli.py`` exercise what they show.
* So that each block does not pay the seconds that importing torch and Lightning takes, one server
  process imports them once and forks a child per block (two at a time); a child starts from that
  interpreter with nothing of any other block in it. The block is also written to ``block.py`` in
  its directory and is ``sys.argv[0]``, so a strategy that starts its other processes by re-running
  the script (DDP, FSDP2) runs the block there as a script.
* Docstrings: no Sphinx roles anywhere in the package, examples in the "Examples:" section form
  the site renders, and an example (``>>>``) for every public name (``lightning_wd.__all__``, every
  object the API reference renders, and the public functions and classes of those modules) and
  every public method.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PACKAGE = ROOT / "lightning_wd"

#: Modules the block server imports before forking: what most blocks import anyway.
PRELOAD = ["torch", "lightning", "lightning_wd", "lightning.pytorch.loggers"]
JOBS = 2
BLOCK_TIMEOUT_S = 120

_OPEN_FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    path: str  # relative to the repository root
    line: int  # of the opening fence
    language: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def _blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path`` that starts at the beginning of a line."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = _OPEN_FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        assert end < len(lines), f"{path}:{i + 1}: unclosed code fence"
        rel = path.relative_to(ROOT).as_posix()
        blocks.append(Block(rel, i + 1, match.group(1), "\n".join(lines[i + 1 : end]) + "\n"))
        i = end + 1
    return blocks


def python_blocks() -> list[Block]:
    return [b for path in DOC_FILES for b in _blocks(path) if b.language == "python"]


def claimed_output(code: str) -> list[str]:
    """The comment lines that directly follow a ``print(`` line: the output the block shows."""
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


# ------------------------------------------------------------------------------------------ block server
def _run_child(block: dict[str, str]) -> None:
    """In the forked child: run one block in ``block["cwd"]``, its output to files there; never returns."""
    code = 1
    try:
        os.chdir(block["cwd"])
        for fd, name in ((1, "stdout.txt"), (2, "stderr.txt")):
            out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        # The block is also a script file, so that a strategy that re-runs ``sys.argv`` (DDP, FSDP2) can start
        # its other processes from it.
        script = Path(block["cwd"], "block.py")
        script.write_text(block["code"], encoding="utf-8")
        sys.argv = [str(script)]
        namespace: dict[str, Any] = {"__name__": "__main__", "__file__": str(script)}
        exec(compile(block["code"], block["id"], "exec"), namespace)
        code = 0
    except SystemExit as err:
        code = 0 if err.code in (None, 0) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve() -> None:
    """Read ``{"preload": [...], "blocks": [...]}`` on stdin, import the modules to preload, fork a child per
    block (``JOBS`` at a time), and print the exit codes."""
    request = json.load(sys.stdin)
    for name in request["preload"]:
        importlib.import_module(name)
    pending: list[dict[str, str]] = list(request["blocks"])
    running: dict[int, tuple[str, float]] = {}
    codes: dict[str, int] = {}
    while pending or running:
        while pending and len(running) < JOBS:
            block = pending.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _run_child(block)
            running[pid] = (block["id"], time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for other, (_, started) in list(running.items()):
                if time.monotonic() - started > BLOCK_TIMEOUT_S:
                    os.kill(other, signal.SIGKILL)
            select.select([], [], [], 0.05)
            continue
        block_id, _ = running.pop(pid)
        codes[block_id] = os.waitstatus_to_exitcode(status)
    print(json.dumps(codes))


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str


def run_blocks(blocks: list[Block], workdir: Path, preload: list[str] = PRELOAD) -> dict[str, Result]:
    """Run ``blocks`` through one block server; each gets its own empty directory under ``workdir``."""
    request = []
    for n, block in enumerate(blocks):
        cwd = workdir / f"block{n}"
        cwd.mkdir()
        request.append({"id": block.id, "code": block.code, "cwd": str(cwd)})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    server = subprocess.run(
        [sys.executable, str(Path(__file__)), "--serve"],
        input=json.dumps({"preload": preload, "blocks": request}),
        capture_output=True,
        text=True,
        cwd=workdir,
        env=env,
        timeout=BLOCK_TIMEOUT_S * len(blocks) + 60,
    )
    assert server.returncode == 0, f"the block server failed:\n{server.stdout}\n{server.stderr}"
    codes = json.loads(server.stdout.strip().splitlines()[-1])
    results = {}
    for item in request:
        cwd = Path(item["cwd"])
        results[item["id"]] = Result(
            codes[item["id"]],
            (cwd / "stdout.txt").read_text(encoding="utf-8", errors="replace"),
            (cwd / "stderr.txt").read_text(encoding="utf-8", errors="replace"),
        )
    return results


BLOCKS = python_blocks()


@pytest.fixture(scope="module")
def block_results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    """The results of the blocks this pytest run selected, all run at once, two at a time."""
    selected = {
        item.callspec.params["block"].id
        for item in request.session.items
        if hasattr(item, "callspec") and isinstance(item.callspec.params.get("block"), Block)
    }
    blocks = [b for b in BLOCKS if b.id in selected]
    return run_blocks(blocks, tmp_path_factory.mktemp("blocks"))


def test_the_main_pages_keep_their_code_examples() -> None:
    with_code = {b.path for b in BLOCKS}
    for page in ("README.md", "docs/getting-started.md", "docs/guides/rules-and-presets.md"):
        assert page in with_code, f"{page} lost its code examples"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block_runs_alone_and_prints_what_it_claims(block: Block, block_results: dict[str, Result]) -> None:
    result = block_results[block.id]
    assert result.code == 0, (
        f"{block.id}: the block failed when run alone (exit {result.code}); each block needs its own imports "
        f"and setup.\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}"
    )
    printed = [line.rstrip() for line in result.stdout.splitlines()]
    for claimed in claimed_output(block.code):
        shown = "\n  ".join(printed)
        assert claimed in printed, f"{block.id} claims the output line\n  {claimed!r}\nbut printed:\n  {shown}"


def test_the_block_runner_runs_each_block_alone(tmp_path: Path) -> None:
    """A block that uses a name an earlier block defined fails; one that raises fails; output is captured."""
    blocks = [
        Block("a.md", 1, "python", "x = 1\nprint('defined', x)\n"),
        Block("a.md", 5, "python", "print(x)\n"),
        Block("a.md", 9, "python", "raise ValueError('boom')\n"),
    ]
    results = run_blocks(blocks, tmp_path, preload=["json"])
    assert results["a.md:1"] == Result(0, "defined 1\n", "")
    assert results["a.md:5"].code == 1 and "NameError: name 'x' is not defined" in results["a.md:5"].stderr
    assert results["a.md:9"].code == 1 and "ValueError: boom" in results["a.md:9"].stderr


def test_claimed_output_reads_the_comments_after_a_print() -> None:
    code = "y = 2\nprint(y)\n# 2\n# more\nz = 3  # not output\n# not output either\n"
    assert claimed_output(code) == ["2", "more"]


def _table_rows(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.startswith("| ") and "---" not in line]


def test_the_comparison_page_shows_the_readmes_table() -> None:
    """The README's table is checked against the script's output (``tests/test_benchmarks.py``); the guide
    repeats it, so it must be the same table."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8").split("## How other tools group parameters", 1)[1]
    guide = (ROOT / "docs" / "guides" / "comparison.md").read_text(encoding="utf-8")
    claimed = _table_rows(readme.split("\n## ", 1)[0])
    assert claimed, "the README lost its comparison table"
    assert _table_rows(guide)[: len(claimed)] == claimed


# ------------------------------------------------------------------------------------------ the site
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason="the `docs` extra is not installed")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "api" / "engine" / "index.html").exists()


def _nav_pages(nav: object) -> Iterator[str]:
    if isinstance(nav, str):
        yield nav
    elif isinstance(nav, list):
        for item in nav:
            yield from _nav_pages(item)
    elif isinstance(nav, dict):
        for value in nav.values():
            yield from _nav_pages(value)


def test_every_page_is_in_the_nav() -> None:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    in_nav = set(_nav_pages(config["nav"]))
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert pages - in_nav == set(), "pages missing from the nav of mkdocs.yml"
    assert in_nav - pages == set(), "the nav of mkdocs.yml names pages that do not exist"


# ------------------------------------------------------------------------------------------ docstrings
_SPHINX_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|ref|const|term):`")


def test_no_sphinx_roles_in_the_package() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if _SPHINX_ROLE.search(line)
    ]
    assert not found, "Sphinx roles do not render on the site; write `name` instead:\n" + "\n".join(found)


def test_examples_are_in_the_section_the_site_renders() -> None:
    """``Example::`` is reStructuredText; the site renders ``Examples:`` followed directly by the ``>>>`` lines."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines, 1):
            header = line.strip()
            if header in ("Example::", "Examples::", "Example:") or (
                header == "Examples:" and n < len(lines) and not lines[n].strip()
            ):
                found.append(f"{path.relative_to(ROOT)}:{n}: {header}")
    assert not found, "write `Examples:` with the example on the next line:\n" + "\n".join(found)


def _members(obj: Any) -> Iterator[tuple[str, Any]]:
    """The public functions, classes and methods that ``obj`` itself defines.

    Properties are attributes, documented in a line; hooks (``on_*``, and overrides of a torch or
    Lightning base class's methods) are called by the framework, which documents them.
    """
    if inspect.ismodule(obj):
        for name, value in vars(obj).items():
            defined_here = (inspect.isfunction(value) or inspect.isclass(value)) and value.__module__ == obj.__name__
            if defined_here and not name.startswith("_"):
                yield name, value
                yield from ((f"{name}.{m}", v) for m, v in _members(value))
    elif inspect.isclass(obj):
        external_bases = [b for b in obj.__mro__[1:] if not b.__module__.startswith("lightning_wd")]
        for name, value in vars(obj).items():
            is_method = inspect.isfunction(value) or isinstance(value, (classmethod, staticmethod))
            if name.startswith(("_", "on_")) or not is_method:
                continue
            if any(name in vars(base) for base in external_bases):
                continue  # a hook of Lightning's or torch's base class, documented there
            yield name, value


def _public_names() -> list[str]:
    """``lightning_wd.__all__`` (read from the source: collecting the tests imports nothing), and every
    object the API reference of the site renders (its ``::: name`` lines)."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    exported = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets)
    )
    names = {f"lightning_wd.{n}" for n in exported if n != "__version__"}
    for page in sorted((ROOT / "docs" / "api").glob("*.md")):
        names.update(re.findall(r"^::: ([\w.]+)", page.read_text(encoding="utf-8"), re.MULTILINE))
    return sorted(names)


def _resolve(dotted: str) -> Any:
    """The object a dotted name names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:n]))
        except ImportError:
            continue
        for attr in parts[n:]:
            obj = getattr(obj, attr)
        return obj
    raise AssertionError(f"{dotted} does not resolve")


@pytest.mark.parametrize("name", _public_names())
def test_every_public_name_has_an_example(name: str) -> None:
    obj = _resolve(name)
    missing = [
        qual
        for qual, value in [(name, obj), *((f"{name}.{m}", v) for m, v in _members(obj))]
        if ">>>" not in (inspect.getdoc(value) or "")
    ]
    assert not missing, f"public names without an example (`>>>` lines in an `Examples:` section): {missing}"


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
