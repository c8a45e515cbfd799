"""SFT: cross-entropy on the gold responses only, no teacher (docs/method.md §4)."""

from __future__ import annotations

from cot2align_jax.losses.methods.base import Method

METHOD = Method("sft", kd=None, needs_teacher=False)
