"""``python -m factorcl``: the ``factorcl`` command."""

import sys

from .cli import main

sys.exit(main())
