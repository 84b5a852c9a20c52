"""Helpers of eval/paper_claims.py: the plan of fits and evaluations, the runner, held-out pairs,
the measurements, the verdict rules and the report (see docs/decisions/paper_claims.md)."""
