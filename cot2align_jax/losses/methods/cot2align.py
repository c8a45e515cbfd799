"""CoT2Align (docs/method.md §1, §4): a base method's KD term on the main view plus the OT block
between student and teacher hidden states of the main and paired views, trained on CoT records.

No KD term of its own: `get_method("cot2align", base)` composes it with `base` (default
dskd_cma), taking over the base's requirements.
"""

from __future__ import annotations

from cot2align_jax.losses.methods.base import Method

METHOD = Method("cot2align", kd=None, ot=True, uses_rationales=True)
