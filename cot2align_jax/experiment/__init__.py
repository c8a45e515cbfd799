"""Multi-seed experiments: specs (spec.py), plans (plan.py), the runner (runner.py, one
subprocess train + evaluation per run × budget × seed), statistics (stats.py) and the report
(report.py). The command is `python -m cot2align_jax.experiment` (__main__.py)."""
