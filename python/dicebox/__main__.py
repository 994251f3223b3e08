"""``python -m dicebox``: the same as the ``dicebox`` command."""

import sys

from dicebox.cli import main

sys.exit(main())
