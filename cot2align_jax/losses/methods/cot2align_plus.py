"""CoT2Align+ : CoT2Align (a base method's KD term plus the OT block, trained on CoT records)
with an OT block that aligns (docs/losses.md, "OT that aligns"; the paper's future work).

Composed like cot2align (`get_method("cot2align_plus", base)`, default base dskd_cma). Its OT
settings are `Params` (config section kd.cot2align_plus) laid over kd.ot: the fields of Params
replace those of kd.ot, every other kd.ot key (num_iters, grad, lse_mode, terms, layers,
ot_term_scale) still applies. Setting a kd.ot key that Params overrides is refused, so a
config cannot believe it changed what this method ignores.
"""

from __future__ import annotations

import dataclasses

from cot2align_jax.losses.methods.base import KDConfig, Method, params_of
from cot2align_jax.losses.ot import OTConfig


@dataclasses.dataclass(frozen=True)
class Params:
  """The OT settings this method owns (field meanings: `losses.ot.OTConfig`).

  Defaults (a best guess, to be settled on dev by experiments):
  cost "cosine": scale-free in [0, 2] whatever the sequence length (the attention cost's row
    softmax crowds every entry near 1 − 1/m), symmetric with a zero diagonal, so the self terms
    of the divergence mean "identical sequence" and exp(−C/ε) is a positive kernel.
  relative_epsilon "std", epsilon 0.5: ε = 0.5 × the std of the valid costs, so a cost
    difference of one std weighs e^2 in the kernel whatever the models: a plan that prefers
    partners yet spreads its gradient over a few of them (the paper's ε = 10 on costs within
    [0, 1] leaves the plan within ±7% of uniform). The std, not the mean: an offset of every
    cost (anisotropic hidden states put all cosines near one value) leaves the plan unchanged.
    Measured on random 64-d states with a shared direction (n, m = 200, 260): plan_peak 68
    at 0.5, ~190 (a near-permutation) at 0.1 - 0.2; ott's marginals are within 2e-7 after 20
    iterations at 0.5, so no ε schedule (one would only be refused at the demo's 20).
  value "entropic", debiased: the Sinkhorn divergence (Feydy et al. 2019), 0 for identical
    sequences and >= 0 for a positive kernel, so the term measures misalignment instead of the
    entropic bias.
  tau_cross_cot 0.9: the marginal of a cross term's CoT side is relaxed (ρ = 9ε), so rationale
    tokens, most of which have no counterpart in the plain answer, may receive no mass; the
    plain side stays exact (each answer token's mass is transported), the same term balanced.
  layer_weighting "uncertainty": learned log-variances that start at "fixed" and balance the
    two layers' scales (the embedding layer's OT differs in size from the final one's). The
    layers stay the paper's two (kd.ot.layers): which middle depths help is model-specific and
    costs all hidden states, so "mid" / "s<i>:t<j>" are an ablation.
  """
  cost: str = "cosine"
  relative_epsilon: str = "std"
  epsilon: float = 0.5
  value: str = "entropic"
  debiased: bool = True
  tau_same: float = 1.0
  tau_cross_cot: float = 0.9
  tau_cross_plain: float = 1.0
  layer_weighting: str = "uncertainty"

  def ot_config(self, ot: OTConfig) -> OTConfig:
    """`ot` with these fields replaced; ValueError if `ot` changes one of them from its
    default (set kd.cot2align_plus.<field> instead)."""
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    paper = OTConfig()
    changed = sorted(k for k in fields if getattr(ot, k) != getattr(paper, k))
    if changed:
      raise ValueError(f"cot2align_plus sets its own kd.ot.{changed[0]}; change "
                       f"kd.cot2align_plus.{changed[0]} instead (overridden keys: "
                       f"{', '.join(sorted(fields))})")
    return dataclasses.replace(ot, **fields)


def ot_settings(cfg: KDConfig) -> OTConfig:
  """The OT block's settings: kd.ot under this method's Params."""
  return params_of(cfg, METHOD).ot_config(cfg.ot)


METHOD = Method("cot2align_plus", kd=None, ot=True, uses_rationales=True, params=Params,
                ot_settings=ot_settings)
