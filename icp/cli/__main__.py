"""``python -m icp.cli``: the ``icp`` command."""

import sys

from icp.cli import main

sys.exit(main())
