"""Render and loader rates: ``python eval/bench_data.py --help`` (the code is ``icp.bench.data``)."""

import sys

from icp.bench.data import main

if __name__ == "__main__":
    sys.exit(main())
