"""python -m tests.array: the emulated array's control CLI (tests/array/cli.py)."""

import sys

from tests.array.cli import main

sys.exit(main())
