"""``python -m robustpatch``: the ``robustpatch`` command (as ``python -m robustpatch.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
