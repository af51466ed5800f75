"""``python -m iomux``: see :mod:`iomux.cli`."""

import sys

from .cli import main

sys.exit(main())
