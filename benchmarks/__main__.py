"""``python -m benchmarks``: the comparison with Torch-Pruning (see benchmarks/compare.py)."""

from .compare import main

main()
