"""The documentation runs as written: every ```python block of README.md, BUILD.md and docs/*.md, each in a fresh
CPU process; the README stays short; relative links and anchors resolve inside the repository; and the README
holds the two setup commands that .ci/run calls."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", REPO / "BUILD.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_WORDS = 1600
BLOCK_TIMEOUT_S = 300
STDERR_TAIL_CHARS = 3000


def _fenced_blocks(path: pathlib.Path) -> list[tuple[str, int, str]]:
    """(language, line of the opening fence (1-based), code) of every fenced block in `path`."""
    blocks, language, start, body = [], None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if language is None and line.startswith("```"):
            language, start, body = line[3:].strip(), number, []
        elif language is not None and line.startswith("```"):
            blocks.append((language, start, "\n".join(body) + "\n"))
            language = None
        elif language is not None:
            body.append(line)
    assert language is None, f"{path.name}: the block opened at line {start} is never closed"
    return blocks


PYTHON_BLOCKS = [
    pytest.param(code, id=f"{path.relative_to(REPO)}:{line}")
    for path in DOCS
    for language, line, code in _fenced_blocks(path)
    if language == "python"
]


def _environment() -> dict[str, str]:
    """The caller's environment (XLA_FLAGS too: the tests' cheap CPU compiles) on the CPU, with the source tree
    importable; a block that wants several devices sets XLA_FLAGS itself."""
    environment = dict(os.environ)
    environment["JAX_PLATFORMS"] = "cpu"
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return environment


@pytest.mark.parametrize("code", PYTHON_BLOCKS)
def test_python_block_runs(code):
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"exit code {result.returncode}; stderr ends:\n{result.stderr[-STDERR_TAIL_CHARS:]}"


def test_readme_is_short():
    words = len((REPO / "README.md").read_text().split())
    assert words <= README_MAX_WORDS, f"README.md has {words} words (at most {README_MAX_WORDS}): move detail to docs/"


def test_readme_holds_the_commands_ci_runs():
    """.ci/run calls README's setup commands verbatim: each line after a '# README command' comment is in README."""
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    commands = [ci_lines[index + 1] for index, line in enumerate(ci_lines) if line.startswith("# README command")]
    assert len(commands) == 2, commands
    readme = (REPO / "README.md").read_text().splitlines()
    for command in commands:
        assert command in readme, f"README.md lacks the command .ci/run calls: {command}"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading's text."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {_anchor(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


_LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", DOCS, ids=lambda path: str(path.relative_to(REPO)))
def test_links_resolve_inside_the_repository(path):
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        assert resolved.is_relative_to(REPO), f"{path.name}: {target} points outside the repository"
        assert resolved.exists(), f"{path.name}: {target} does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{path.name}: no heading for #{anchor} in {file_part or path.name}"
