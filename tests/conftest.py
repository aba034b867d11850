import os
import sys

import pytest

# tests/models.py is a helper module, not a package under test: make it importable.
sys.path.insert(0, os.path.dirname(__file__))

try:
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    settings.register_profile("dev", deadline=None)
    settings.load_profile("ci" if os.environ.get("CI") else "dev")
except ImportError:  # hypothesis is a dev extra
    pass


@pytest.fixture(autouse=True)
def _deterministic_torch():
    import torch

    torch.manual_seed(0)
    yield


# ---- a table of prunable shares, printed at the end of the run (issue: report it) ----------
_SHARES: list[tuple[str, int, int, int, int]] = []


@pytest.fixture
def report_share():
    def record(name: str, graph) -> None:
        prunable, total = graph.prunable_share("conv")
        _SHARES.append((name, prunable, total, len(graph.units), len(graph.groups)))

    return record


def pytest_terminal_summary(terminalreporter):
    if not _SHARES:
        return
    terminalreporter.section("prunable conv output channels")
    terminalreporter.write_line(f"{'model':<28}{'prunable':>10}{'total':>8}{'share':>8}"
                                f"{'units':>8}{'groups':>8}")
    for name, p, t, u, g in _SHARES:
        share = f"{100 * p / t:.1f}%" if t else "-"
        terminalreporter.write_line(f"{name:<28}{p:>10}{t:>8}{share:>8}{u:>8}{g:>8}")
