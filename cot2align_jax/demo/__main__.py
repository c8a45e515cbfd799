"""`python -m cot2align_jax.demo`: the embedded demo (flags in demo/cli.py)."""

from __future__ import annotations

from absl import app

from cot2align_jax.demo.cli import main

if __name__ == "__main__":
  app.run(main)
