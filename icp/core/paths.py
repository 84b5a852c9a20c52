"""Where the checkout's non-code folders are (experiments, eval rules, sbatch templates).

The package is installed editable from its checkout (``make setup``), so these sit beside it;
one definition here instead of ``parents[N]`` arithmetic in every module that needs them.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"
EVAL = REPO / "eval"
RESULTS = EVAL / "results"
SLURM_TEMPLATES = REPO / "slurm"
