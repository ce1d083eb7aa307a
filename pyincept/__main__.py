"""`python -m pyincept ...` is the same as the `pyincept` command."""

import sys

from .cli import main

sys.exit(main())
