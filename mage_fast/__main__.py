"""``python -m mage_fast``: the command line, :mod:`mage_fast.cli` (``--help`` lists the commands)."""
import sys

from mage_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
