"""GPU training/sampling throughput against plain diffusers loops: ``python eval/bench_train.py --help``.

The benchmark lives in the package (``icp.bench.train``); results go to eval/results/.
"""

import sys

from icp.bench.train import main

if __name__ == "__main__":
    sys.exit(main())
