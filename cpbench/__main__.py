"""``python -m cpbench ...`` is the ``cpbench`` command."""

import sys

from cpbench.cli import main

if __name__ == "__main__":
    sys.exit(main())
