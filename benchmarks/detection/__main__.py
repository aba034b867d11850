"""``python -m benchmarks.detection``: see ``benchmarks/detection/run.py``."""

from .run import main

main()
