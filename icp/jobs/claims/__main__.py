"""``python -m icp.jobs.claims``: the paper-claims study (see icp.jobs.claims.study)."""

import sys

from icp.jobs.claims.study import main

sys.exit(main())
