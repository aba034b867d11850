"""``python -m pruners``: see ``pruners/cli.py``."""

import sys

from .cli import main

sys.exit(main())
