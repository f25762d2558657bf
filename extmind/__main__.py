"""``python -m extmind ...``: the ``extmind`` command (extmind/cli.py) without the venv's scripts on PATH."""

import sys

from extmind.cli import main

sys.exit(main())
