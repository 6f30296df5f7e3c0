"""``python -m robustpatch.cli``: the ``robustpatch`` command."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
