"""Where the project finds the shared data, tokenizers and docs (never copied into the repo).

`COT2ALIGN_SHARED` overrides; the default is `../shared` beside the project root, then
`./shared` under the current directory.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # cot2align_jax/core/paths.py -> the repo


def shared_dir() -> Path | None:
  """The shared directory if it exists, else None."""
  env = os.environ.get("COT2ALIGN_SHARED")
  candidates = [Path(env)] if env else [PROJECT_ROOT.parent / "shared", Path.cwd() / "shared"]
  for c in candidates:
    if c.is_dir():
      return c.resolve()
  return None


def cache_dir() -> Path:
  """Per-user cache for derived artifacts (assembled GGUF files, vocabulary maps)."""
  return Path(os.environ.get("COT2ALIGN_CACHE", Path.home() / ".cache" / "cot2align_jax"))
