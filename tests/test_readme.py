"""The README's Python examples run as written, each in a fresh interpreter.

The README is the front door: a quick-start that fails on its first line costs a user more
than any missing feature. Each ```python block runs in its own process, in a scratch folder
(the examples write plan.json, ONNX files, an HTML report). One block is not run here: the
hardware-aware example times real layers and models for about a minute, and timing belongs
in the benchmarks (``python -m benchmarks.hardware`` makes the same calls).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TIMES_THE_MACHINE = "Hardware-aware"  # the heading of the one block not run here


def _blocks() -> list[tuple[str, str]]:
    """(the heading above it, the code) of every ```python block, in order."""
    out, heading = [], "top"
    for part in re.split(r"^(```python\n.*?^```)\n", README.read_text(), flags=re.M | re.S):
        if part.startswith("```python"):
            out.append((heading, part[len("```python\n"):-3]))
        else:
            headings = re.findall(r"^#+ (.+)$", part, flags=re.M)
            heading = headings[-1] if headings else heading
    return out


BLOCKS = _blocks()


def test_every_block_is_run_but_the_one_that_times_the_machine():
    skipped = [h for h, _ in BLOCKS if h.startswith(TIMES_THE_MACHINE)]
    assert len(BLOCKS) >= 6 and len(skipped) == 1


@pytest.mark.parametrize("heading,code", [b for b in BLOCKS
                                          if not b[0].startswith(TIMES_THE_MACHINE)],
                         ids=[h for h, _ in BLOCKS if not h.startswith(TIMES_THE_MACHINE)])
def test_readme_example_runs_as_written(heading, code, tmp_path):
    if "ultralytics" in code:
        pytest.importorskip("ultralytics")
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(README.parent)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README example under '{heading}' failed:\n{done.stderr[-3000:]}"
