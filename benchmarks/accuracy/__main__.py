"""``python -m benchmarks.accuracy``: see ``benchmarks/accuracy/run.py``."""

from .run import main

main()
