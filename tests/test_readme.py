"""Every Python block in README.md runs as written.

Each ```python block runs alone, in a fresh namespace named ``__main__`` (as a script
would), in a temporary working directory. A block that uses pyspark gets the suite's
``local[2]`` session first, so its ``SparkSession.builder.getOrCreate()`` finds it. A block
that cannot run here is marked by an HTML comment on the line before its fence, giving the
reason: ``<!-- readme-test: skip needs a YARN cluster -->``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\b\s*(.*?)\s*-->")


@dataclass(frozen=True)
class Block:
    """One ```python block: where it starts, the section it is in, and its code."""

    line: int
    section: str
    code: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"L{self.line}-{re.sub(r'[^a-z0-9]+', '-', self.section.lower()).strip('-')}"


def python_blocks(text: str) -> list[Block]:
    """The README's ```python blocks, with the skip reason of each marked one."""
    blocks, section, lines = [], "top", text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("#"):
            section = lines[i].lstrip("#").strip()
        if lines[i].strip() == "```python":
            start, i = i, i + 1
            while lines[i].strip() != "```":
                i += 1
            marked = SKIP.search(lines[start - 1]) if start else None
            skip = marked.group(1) if marked else None
            code = "\n".join(lines[start + 1 : i]) + "\n"
            blocks.append(Block(start + 1, section, code, skip))
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_python_blocks_and_every_skip_gives_its_reason():
    assert len(BLOCKS) >= 3
    assert all(block.skip for block in BLOCKS if block.skip is not None)
    assert sum(block.skip is not None for block in BLOCKS) <= 2, "skips must stay rare"


def test_a_block_is_found_with_its_skip_reason():
    text = "# A\n```python\nx = 1\n```\n## B\n"
    text += "<!-- readme-test: skip no cluster -->\n```python\ny\n```\n"
    found = python_blocks(text)
    assert [(b.line, b.section, b.code, b.skip) for b in found] == [
        (2, "A", "x = 1\n", None),
        (7, "B", "y\n", "no cluster"),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_the_readme_block_runs_as_written(block, request, tmp_path, monkeypatch):
    if block.skip:
        pytest.skip(f"README.md:{block.line}: {block.skip}")
    if "pyspark" in block.code:
        request.getfixturevalue("spark")
    monkeypatch.chdir(tmp_path)
    exec(compile(block.code, f"README.md:{block.line}", "exec"), {"__name__": "__main__"})
