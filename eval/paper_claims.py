"""Reproduce IC-Portrait's claims at small scale: ``python eval/paper_claims.py [--config C] [k=v ...]``.

The study lives in the package (``icp.jobs.claims``); this script is its entry point beside the
rules it is judged by (eval/claims/, eval/paper_claims.yaml).
"""

import sys

from icp.jobs.claims.study import main

if __name__ == "__main__":
    sys.exit(main())
