"""The train state (a pytree) and the optimizer (optax AdamW in two groups; docs/architecture.md
§8, the paper's settings in docs/method.md §5).

    opt_cfg = OptimConfig(lr=5e-4, total_steps=1000)
    state, (student_gd, proj_gd) = init_state(student_model, projectors, opt_cfg, seed=10)
    optimizer = make_optimizer(opt_cfg, state.params, state.proj)   # the same one init_state used

TrainState fields: `step` int32 scalar; `params` the student's `nnx.State` of Params; `proj` the
projectors' `nnx.State` (empty for SFT); `opt_state` optax state over {"student": params,
"proj": proj}; `rng` a PRNG key (uint32[2]) split by the step for any randomness.

Optimizer: global-norm clipping over student and projectors together, then one AdamW per group
(the student at `lr`, the projectors at `proj_lr`), no weight decay on biases and norm scales.
With LoRA factors in the student (models/layers.py `LoRAParam`) only they and the projectors
train: the other student leaves are labelled "frozen" (gradient zeroed before the clipping,
update `optax.set_to_zero()`, the weight bitwise unchanged). Gradient accumulation is done by
the train step (training/steps.py); `make_optimizer(..., multisteps=True)` gives optax.MultiSteps
instead (equal-weight average: exact only when every micro-batch has the same token count).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cot2align_jax.models.layers import LoRAParam

SCHEDULES = ("cosine", "linear", "constant")
FROZEN = "frozen"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW settings (the paper's defaults: wd 0.01, cosine to 1e-7, no warmup, clip 1.0).

  lr / proj_lr: peak learning rates of the student and of the projectors. schedule: "cosine",
  "linear" (both decay from the peak to end_lr at total_steps) or "constant"; warmup_steps of
  linear warmup from 0 first. clip_norm: global-norm clipping (None or <= 0: off).
  accumulate: micro-batches per optimizer step (split inside the train step).
  """
  lr: float = 5e-4
  proj_lr: float = 1e-3
  weight_decay: float = 0.01
  schedule: str = "cosine"
  warmup_steps: int = 0
  total_steps: int = 1000
  end_lr: float = 1e-7
  clip_norm: float | None = 1.0
  accumulate: int = 1
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"unknown schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
    if self.accumulate < 1:
      raise ValueError(f"accumulate must be >= 1, got {self.accumulate}")
    if self.total_steps < 1 or self.warmup_steps < 0:
      raise ValueError("total_steps must be >= 1 and warmup_steps >= 0")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  proj: Any
  opt_state: Any
  rng: jax.Array

  @property
  def trainable(self) -> dict:
    """The tree the optimizer sees."""
    return {"student": self.params, "proj": self.proj}


def make_schedule(cfg: OptimConfig, peak: float) -> optax.Schedule:
  """Warmup (linear from 0) then the configured decay from `peak` to `cfg.end_lr`."""
  decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
  if cfg.schedule == "cosine":
    # optax's alpha is the final fraction of the peak.
    main = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr / peak if peak else 0.)
  elif cfg.schedule == "linear":
    main = optax.linear_schedule(peak, cfg.end_lr, decay_steps)
  else:
    main = optax.constant_schedule(peak)
  if cfg.warmup_steps <= 0:
    return main
  warm = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
  return optax.join_schedules([warm, main], [cfg.warmup_steps])


def _path_names(path) -> list[str]:
  out = []
  for k in path:
    name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
    out.append(str(name))
  return out


def no_decay(path_names: list[str]) -> bool:
  """True for biases and norm scales: the last name ends with "bias" or is "scale"."""
  names = [n for n in path_names if n not in ("value", "None")]
  last = names[-1] if names else ""
  return last.endswith("bias") or last == "scale"


def decay_mask(tree) -> Any:
  """A tree of bools like `tree`: True where weight decay applies."""
  return jax.tree_util.tree_map_with_path(lambda p, _: not no_decay(_path_names(p)), tree)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _labels(tree) -> dict:
  """The group of every leaf: its top-level key ("student" / "proj"), or FROZEN for the
  student's non-LoRA leaves when the student has LoRA factors."""
  out = {}
  for k, v in tree.items():
    lora = k == "student" and any(isinstance(n, LoRAParam)
                                  for n in jax.tree.leaves(v, is_leaf=_is_var))

    def label(node, k=k, lora=lora):
      name = k if not lora or isinstance(node, LoRAParam) else FROZEN
      return jax.tree.map(lambda _: name, node)
    out[k] = jax.tree.map(label, v, is_leaf=_is_var)
  return out


def _clip_trainable(max_norm: float) -> optax.GradientTransformation:
  """clip_by_global_norm over the trainable leaves (frozen gradients are zeroed first); the
  same (empty) state as clip_by_global_norm."""
  clip = optax.clip_by_global_norm(max_norm)

  def update(updates, state, params=None):
    frozen = jax.tree.map(lambda label: label == FROZEN, _labels(updates))
    updates = jax.tree.map(lambda f, u: jnp.zeros_like(u) if f else u, frozen, updates)
    return clip.update(updates, state, params)
  return optax.GradientTransformation(clip.init, update)


def _adamw(cfg: OptimConfig, peak: float) -> optax.GradientTransformation:
  return optax.adamw(make_schedule(cfg, peak), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                     weight_decay=cfg.weight_decay, mask=decay_mask)


def make_optimizer(cfg: OptimConfig, params=None, proj=None, *,
                   multisteps: bool = False) -> optax.GradientTransformation:
  """clip(global norm of the trainable leaves) -> multi_transform({student: AdamW(lr),
  proj: AdamW(proj_lr), frozen: set_to_zero}) (frozen = LoRA's base weights; see module doc).

  Applies to the tree {"student": params, "proj": proj} (TrainState.trainable). `params` and
  `proj` are accepted for the contract (the labels are derived from the tree's top-level keys).
  multisteps: wrap in optax.MultiSteps(every_k_schedule=cfg.accumulate) (see module doc).
  """
  del params, proj
  parts = []
  if cfg.clip_norm is not None and cfg.clip_norm > 0:
    parts.append(_clip_trainable(cfg.clip_norm))
  parts.append(optax.multi_transform({"student": _adamw(cfg, cfg.lr),
                                      "proj": _adamw(cfg, cfg.proj_lr),
                                      FROZEN: optax.set_to_zero()}, _labels))
  tx = optax.chain(*parts)
  if multisteps and cfg.accumulate > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.accumulate)
  return tx


def learning_rates(cfg: OptimConfig, step) -> dict[str, jax.Array]:
  """The (student, projector) learning rates at `step` (for logging)."""
  return {"lr": make_schedule(cfg, cfg.lr)(step), "proj_lr": make_schedule(cfg, cfg.proj_lr)(step)}


def split_params(module: nnx.Module | None):
  """(graphdef, nnx.State of Params) of a module; ValueError if it holds other state."""
  if module is None:
    return None, nnx.State({})
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"{type(module).__name__} holds non-Param state; the train state keeps "
                     "only parameters")
  return graphdef, params


def cast_params(params, dtype):
  """A copy of a params tree with floating leaves cast to `dtype` (e.g. a bf16 teacher)."""
  dtype = jnp.dtype(dtype)
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      params)


def init_state(student_model: nnx.Module, projectors: nnx.Module | None, opt_cfg: OptimConfig,
               seed: int = 0, *, optimizer: optax.GradientTransformation | None = None):
  """(TrainState at step 0, (student_graphdef, proj_graphdef)).

  The optimizer defaults to `make_optimizer(opt_cfg)`; pass the one the step uses if it differs.
  Under a mesh, jit this function's array part with `out_shardings=state_shardings(...)` or
  `jax.device_put` the result (see training/mesh.py).
  """
  student_gd, params = split_params(student_model)
  proj_gd, proj = split_params(projectors)
  tx = optimizer or make_optimizer(opt_cfg, params, proj)
  opt_state = tx.init({"student": params, "proj": proj})
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, proj=proj,
                     opt_state=opt_state, rng=jax.random.key_data(jax.random.key(seed)))
  return state, (student_gd, proj_gd)


def abstract_state(make_student, make_projectors, opt_cfg: OptimConfig, seed: int = 0, *,
                   optimizer: optax.GradientTransformation | None = None):
  """(abstract TrainState, (student_graphdef, proj_graphdef)) without allocating any array:
  the state `init_state` would build, every leaf a jax.ShapeDtypeStruct (nnx metadata such as
  the logical axes kept), for planning memory and lowering the step ahead of time.

  make_student / make_projectors: zero-argument callables building the modules (the
  projectors' may be None); they run under nnx.eval_shape, so no parameter is initialised.
  """
  student = nnx.eval_shape(make_student)
  projectors = nnx.eval_shape(make_projectors) if make_projectors is not None else None
  student_gd, params = split_params(student)
  proj_gd, proj = split_params(projectors)
  tx = optimizer or make_optimizer(opt_cfg, params, proj)

  def arrays(params, proj):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, proj=proj,
                      opt_state=tx.init({"student": params, "proj": proj}),
                      rng=jax.random.key_data(jax.random.key(seed)))
  return jax.eval_shape(arrays, params, proj), (student_gd, proj_gd)


def abstract_params(make_module):
  """(graphdef, nnx.State of ShapeDtypeStruct Params) of a module built by `make_module` under
  nnx.eval_shape (e.g. the frozen teacher), nothing allocated."""
  return split_params(nnx.eval_shape(make_module))
