"""``python -m icma``: the same as the ``icma`` command."""

import sys

from icma.cli import main

if __name__ == "__main__":
    sys.exit(main())
