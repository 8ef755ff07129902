"""``python -m flopwise`` (also what ``torchrun -m flopwise`` runs)."""

import sys

from flopwise.cli import main

sys.exit(main())
