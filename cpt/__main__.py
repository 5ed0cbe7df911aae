"""``python -m cpt``: the same as the ``cpt`` command."""

import sys

from cpt.cli import main

sys.exit(main())
