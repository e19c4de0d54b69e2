"""``python -m sparselab demo`` runs the command line (see :mod:`sparselab.cli`)."""

import sys

from sparselab.cli import main

sys.exit(main())
