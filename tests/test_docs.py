"""Every Python code block of the README and the docs site runs as it is, each page's blocks in order in one
namespace (as a reader runs them), in a fresh folder. A block that cannot run here says why on its first line
(``# not run here: ...``), and the list of those is checked, so none is left out silently."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = "# not run here:"
NOT_RUN_EXPECTED = {  # parts of the reader's own LightningModule; a two-process FSDP2 run
    ("compression.md", 0), ("compression.md", 1), ("distributed.md", 0)}


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", page.read_text(encoding="utf-8"), flags=re.M | re.S)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_every_python_block_of_the_page_runs(page: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for index, block in enumerate(python_blocks(page)):
        if block.startswith(NOT_RUN):
            continue
        exec(compile(block, f"{page.name}[{index}]", "exec"), namespace)  # noqa: S102 - the docs' own code


def test_only_the_known_blocks_are_not_run() -> None:
    skipped = {(page.name, i) for page in PAGES for i, block in enumerate(python_blocks(page)) if block.startswith(NOT_RUN)}
    assert skipped == {(name, i) for name, i in NOT_RUN_EXPECTED}
    assert sum(len(python_blocks(page)) for page in PAGES) >= 8


def test_the_site_builds_without_warnings(tmp_path) -> None:
    """``make docs``: Sphinx with warnings as errors (a broken link, a docstring that does not parse)."""
    import subprocess
    import sys

    build = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(ROOT / "docs"),
                            str(tmp_path / "html")], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    api = (tmp_path / "html" / "api.html").read_text(encoding="utf-8")
    assert all(name in api for name in ("lightning_rank.collect", "lightning_rank.RankMonitor", "threshold"))
