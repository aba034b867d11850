"""Run one benchmark job in a child process under a time and a memory limit.

A crash, a hang or running out of memory is a result to report, not a reason to lose the row:
:func:`run_job` always returns an :class:`Outcome`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

_EXCEPTION = re.compile(r"^[\w.]*(Error|Exception|Exit|Interrupt)\b")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass
class Outcome:
    """``status``: "ok", "error" (the job raised or crashed), "timeout" or "oom"."""

    status: str
    result: Optional[dict]
    error: str
    seconds: float
    peak_rss_mb: float


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MiB (0 once it has gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except (OSError, IndexError, ValueError):
        return 0.0


def run_job(job: dict, *, timeout_s: float, mem_mb: float, entry: str = "benchmarks.jobs",
            poll_s: float = 0.1) -> Outcome:
    """Run ``python -m <entry> <job-json> <result-file>`` and collect what it wrote.

    The child is killed (its whole process group) when it passes ``timeout_s`` or when its
    resident memory passes ``mem_mb``. Its stderr tail becomes the error text.
    """
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.json")
        err_path = os.path.join(tmp, "stderr.txt")
        start = time.perf_counter()
        peak = 0.0
        status = None
        with open(err_path, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", entry, json.dumps(job), result_path],
                                    stdout=subprocess.DEVNULL, stderr=err, env=_child_env(),
                                    start_new_session=True)
            while proc.poll() is None:
                peak = max(peak, rss_mb(proc.pid))
                elapsed = time.perf_counter() - start
                if elapsed > timeout_s:
                    status = "timeout"
                elif peak > mem_mb:
                    status = "oom"
                if status:
                    _kill(proc)
                    break
                time.sleep(poll_s)
        seconds = time.perf_counter() - start
        result = None
        if os.path.exists(result_path):
            with open(result_path) as f:
                result = json.load(f)
            peak = max(peak, result.get("peak_rss_mb", 0.0))
        if status == "timeout":
            error = f"timed out after {timeout_s:.0f} s"
        elif status == "oom":
            error = f"killed: resident memory passed {mem_mb / 1024:.1f} GiB"
        elif proc.returncode != 0 or result is None:
            status = "error"
            error = _last_error(err_path, proc.returncode)
        else:
            status = result.pop("status", "ok")
            error = result.pop("error", "")
        return Outcome(status, result, error, seconds, peak)


def _child_env() -> dict:
    """This environment, with the repository root importable (``benchmarks`` is no package
    that pip installs)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    # oneDNN's primitive cache, given room for a dozen models (see benchmarks/__init__.py)
    env.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "65536")
    return env


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _last_error(path: str, returncode: int) -> str:
    """The exception line of a traceback, or the exit status (a segfault, a kill)."""
    with open(path, errors="replace") as f:
        lines = [ln.rstrip() for ln in f if ln.strip()]
    for line in reversed(lines):
        if _EXCEPTION.match(line):
            return line[:300]
    if returncode < 0:
        return f"crashed with signal {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}" + (f": {lines[-1][:200]}" if lines else "")
