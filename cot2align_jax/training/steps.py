"""Pure, jitted train and eval steps (docs/architecture.md §6).

    train_step = make_train_step(student_gd, teacher_gd, proj_gd, method, kd_cfg, optimizer,
                                 mesh=mesh, accumulate=opt_cfg.accumulate)
    state, metrics = train_step(state, teacher_params, batch)     # state is donated
    metrics = make_eval_step(student_gd, teacher_gd, proj_gd, method, kd_cfg, mesh=mesh)(
        state, teacher_params, batch)

One step: teacher forward on the main view (under stop_gradient) -> student forward -> the
method's objective (losses/methods/) -> gradients w.r.t. the student and projector parameters
-> optax update. Metrics are {name: (sum, count)} float32 pairs over the global batch; the
loop reduces them with training/metrics.py `reduce_metrics`.

Paired views (docs/method.md §3) run only when the method's OT terms read them (cross_a: the
student's, cross_b: the teacher's), as hidden states only, and with `pair_saving=True` inside a
`lax.cond` on any(has_pair) whose other branch returns zeros (rows without a pair contribute 0
to the cross terms either way). `accumulate=k` scans over k micro-batches (rows i, i+k, ...),
each contributing its share of the full batch's loss, so the update equals one step on the
whole batch up to rounding (except a statistic a loss takes over its batch: DSKD-CMA's teacher
stds are the micro-batch's).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cot2align_jax.core import spec
from cot2align_jax.core.numerics import F32
from cot2align_jax.data.teacher_cache import CacheLayout, batch_key
from cot2align_jax.losses.methods import KDConfig, LossInputs, Method, objective, ot_config
from cot2align_jax.losses.ot_layers import hidden_states_request, state_index
from cot2align_jax.losses.vocab_chunk import head_spec
from cot2align_jax.models.transformer import ModelOutput
from cot2align_jax.training import mesh as mesh_lib
from cot2align_jax.training.state import TrainState

Metrics = dict[str, tuple[jax.Array, jax.Array]]


def pair_views_needed(method: Method, kd_cfg: KDConfig) -> tuple[bool, bool]:
  """(student needs the pair view, teacher needs the pair view) for this method."""
  if not method.ot:
    return False, False
  terms = ot_config(kd_cfg, method).terms
  return "cross_a" in terms, "cross_b" in terms


def hidden_states_needed(method: Method, kd_cfg: KDConfig) -> str:
  """The forwards' `hidden_states`: "ends", or "all" when the OT block compares other layers."""
  return hidden_states_request(ot_config(kd_cfg, method).layers) if method.ot else "ends"


def teacher_cache_layout(method: Method, kd_cfg: KDConfig, num_layers: int, hidden_size: int,
                         dtype: str = "bfloat16") -> CacheLayout:
  """What a teacher cache must hold for this method: the main view (and the paired view when
  the OT terms read the teacher's), the final state and the OT block's teacher layers, as
  indices into the forward's hidden_states ("ends": 2 states, "all": num_layers + 1)."""
  _, need_t_pair = pair_views_needed(method, kd_cfg)
  num_states = 2 if hidden_states_needed(method, kd_cfg) == "ends" else num_layers + 1
  indices = {num_states - 1}
  if method.ot:
    indices.update(state_index(l, "teacher", num_states) for l in ot_config(kd_cfg, method).layers)
  views = ("main", "pair") if need_t_pair else ("main",)
  return CacheLayout(views, tuple(sorted(indices)), num_states, hidden_size, dtype)


def cached_states(batch, view: str, layout: CacheLayout) -> tuple[jax.Array | None, ...]:
  """The teacher's hidden_states tuple of `view` from a batch's teacher-cache arrays (float32;
  None at the indices the method does not read)."""
  return tuple(batch[batch_key(view, i)].astype(F32) if i in layout.states else None
               for i in range(layout.num_states))


def _ids(batch, view, side):
  return (batch[spec.key(view, side, "input_ids")], batch[spec.key(view, side, "attention_mask")])


def _zeros_like_shapes(shapes):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def make_forward(student_graphdef, teacher_graphdef, proj_graphdef, method: Method,
                 kd_cfg: KDConfig, *, vocab_map=None, pair_saving: bool = True,
                 teacher_cache: CacheLayout | None = None
                 ) -> Callable[..., tuple[jax.Array, Metrics]]:
  """loss_fn(trainable {"student", "proj"}, teacher_params, batch) -> (loss, metrics): the
  forwards and the objective of one (micro-)batch, differentiable w.r.t. `trainable`.

  teacher_cache: the batch carries the teacher's hidden states (data/teacher_cache.py) and the
  teacher runs no forward; its logits, where the method reads them, come from the cached final
  state through its LM head (Transformer.logits), its embedding table and head from
  teacher_params as always."""
  need_s_pair, need_t_pair = pair_views_needed(method, kd_cfg)
  states = hidden_states_needed(method, kd_cfg)
  # kd.vocab_chunk > 0: the losses compute logits chunk by chunk from the final hidden states
  # and the LM heads, so the main forwards skip the LM head
  main_logits = "none" if kd_cfg.vocab_chunk > 0 else "all"
  vmap_arr = None if vocab_map is None else jnp.asarray(vocab_map, jnp.int32)

  def pair_forwards(params, tparams, batch):
    out_s, out_t = (), ()
    if need_s_pair:
      student = nnx.merge(student_graphdef, params)
      out_s = student(*_ids(batch, "pair", "student"), hidden_states=states,
                      logits="none").hidden_states
    if need_t_pair and teacher_cache is not None:
      out_t = cached_states(batch, "pair", teacher_cache)
    elif need_t_pair:
      teacher = nnx.merge(teacher_graphdef, tparams)
      out_t = teacher(*_ids(batch, "pair", "teacher"), hidden_states=states,
                      logits="none").hidden_states
    return out_s, out_t

  def loss_fn(trainable, teacher_params, batch):
    params, proj = trainable["student"], trainable["proj"]
    student = nnx.merge(student_graphdef, params)
    projectors = nnx.merge(proj_graphdef, proj) if proj_graphdef is not None else None
    s_main = student(*_ids(batch, "main", "student"), hidden_states=states,
                     logits=main_logits)
    s_out: dict[str, Any] = {"main": s_main, "pair": None}
    t_out: dict[str, Any] = {"main": None, "pair": None}
    teacher_embed = teacher_head = teacher_lm = None
    tparams = None
    if method.needs_teacher:
      tparams = jax.lax.stop_gradient(teacher_params)
      teacher = nnx.merge(teacher_graphdef, tparams)
      if teacher_cache is not None:
        cached = cached_states(batch, "main", teacher_cache)
        t_main = ModelOutput(teacher.logits(cached[-1]) if main_logits == "all" else None,
                             cached, None)
      else:
        t_main = teacher(*_ids(batch, "main", "teacher"), hidden_states=states,
                         logits=main_logits)
      t_out["main"] = jax.lax.stop_gradient(t_main)
      teacher_embed, teacher_head = teacher.embed[...], teacher.output_matrix()
      teacher_lm = head_spec(teacher.config)
    if need_s_pair or need_t_pair:
      operands = (params, tparams, batch)
      if pair_saving:
        shapes = jax.eval_shape(pair_forwards, *operands)
        sp, tp = jax.lax.cond(jnp.any(batch["has_pair"]), pair_forwards,
                              lambda *_: _zeros_like_shapes(shapes), *operands)
      else:
        sp, tp = pair_forwards(*operands)
      if need_s_pair:
        s_out["pair"] = ModelOutput(None, sp, None)
      if need_t_pair:
        t_out["pair"] = ModelOutput(None, jax.lax.stop_gradient(tp), None)
    inputs = LossInputs(batch=batch, student=s_out, teacher=t_out,
                        student_embed=jax.lax.stop_gradient(student.embed[...]),
                        student_head=student.output_matrix(),
                        teacher_embed=teacher_embed, teacher_head=teacher_head,
                        vocab_map=vmap_arr, student_lm=head_spec(student.config),
                        teacher_lm=teacher_lm)
    return objective(method, kd_cfg, inputs, projectors)

  return loss_fn


def _reweighted_loss(method: Method, kd_cfg: KDConfig, metrics: Metrics, n_total, b_total):
  """This micro-batch's share of the full batch's loss, from the objective's (sum, count)
  metrics: [(1 − λ)·CE_sum + λ·KD_sum] / N_total + λ·OT_sum / B_total (SFT: CE_sum / N_total)."""
  ce = metrics["ce"][0]
  if method.kd is None and not method.ot:
    return ce / n_total
  lam = kd_cfg.kd_rate
  kd = metrics["kd"][0] if "kd" in metrics else jnp.zeros((), F32)
  out = ((1.0 - lam) * ce + lam * kd) / n_total
  if "ot/total" in metrics:
    out = out + lam * metrics["ot/total"][0] / b_total
  return out


def _micro_batches(batch: Mapping[str, jax.Array], k: int, mesh: Mesh | None):
  """[k·B, ...] arrays -> [k, B, ...] with micro-batch i = rows i, i + k, i + 2k, ..."""
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into {k} micro-batches")
    y = jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
    if mesh is not None:
      y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, mesh_lib.BATCH_AXES)))
    return y
  return {key: split(v) for key, v in batch.items()}


def _f32_metrics(metrics: Metrics) -> Metrics:
  return {k: (jnp.asarray(s, F32), jnp.asarray(c, F32)) for k, (s, c) in metrics.items()}


def _grads_and_metrics(loss_fn, method, kd_cfg, trainable, teacher_params, batch, accumulate,
                       mesh):
  if accumulate == 1:
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable, teacher_params, batch)
    return grads, _f32_metrics(metrics)
  n_total = jnp.maximum(jnp.sum(batch[spec.key("main", "student", "loss_mask")]).astype(F32), 1.)
  b_total = jnp.asarray(batch["has_pair"].shape[0], F32)

  def micro(tr, mb):
    loss, metrics = loss_fn(tr, teacher_params, mb)
    share = _reweighted_loss(method, kd_cfg, metrics, n_total, b_total)
    metrics = dict(_f32_metrics(metrics))
    metrics["loss"] = (share, jnp.zeros((), F32))
    return share, metrics

  grad_fn = jax.value_and_grad(micro, has_aux=True)
  mbs = _micro_batches(batch, accumulate, mesh)
  first = jax.tree.map(lambda x: x[0], mbs)
  _, metric_shapes = jax.eval_shape(micro, trainable, first)

  def body(carry, mb):
    g_sum, m_sum = carry
    (_, metrics), g = grad_fn(trainable, mb)
    g_sum = jax.tree.map(jnp.add, g_sum, g)
    m_sum = jax.tree.map(jnp.add, m_sum, metrics)
    return (g_sum, m_sum), None

  zeros_g = jax.tree.map(jnp.zeros_like, trainable)
  zeros_m = _zeros_like_shapes(metric_shapes)
  (grads, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m), mbs)
  metrics = dict(metrics)
  metrics["loss"] = (metrics["loss"][0], jnp.ones((), F32))
  # per-micro-batch (value, 1) parts become (sum of values, k): their mean over micro-batches
  return grads, metrics


def _jit(fn, mesh, in_specs, out_specs, donate, compiler_options):
  kw = {"donate_argnums": (0,) if donate else (), "compiler_options": compiler_options}
  if mesh is None:
    return jax.jit(fn, **kw)
  return jax.jit(fn, in_shardings=in_specs, out_shardings=out_specs, **kw)


class _LazyJit:
  """Builds the jitted step on first call when shardings must be read from the arguments."""

  def __init__(self, fn, mesh, state_sh, teacher_sh, batch_sh, n_out_state: bool, donate: bool,
               compiler_options=None):
    self.fn, self.mesh, self.donate = fn, mesh, donate
    self.compiler_options = compiler_options
    self.state_sh, self.teacher_sh, self.batch_sh = state_sh, teacher_sh, batch_sh
    self.n_out_state = n_out_state
    self.jitted = None
    if mesh is None or None not in (state_sh, teacher_sh, batch_sh):
      self._build()

  def _build(self):
    if self.mesh is None:
      self.jitted = _jit(self.fn, None, None, None, self.donate, self.compiler_options)
      return
    rep = mesh_lib.replicated(self.mesh)
    out = (self.state_sh, rep) if self.n_out_state else rep
    self.jitted = _jit(self.fn, self.mesh, (self.state_sh, self.teacher_sh, self.batch_sh), out,
                       self.donate, self.compiler_options)

  def _prepare(self, state, teacher_params, batch):
    if self.jitted is not None:
      return
    if self.state_sh is None:
      self.state_sh = mesh_lib.state_shardings(state, self.mesh)
    if self.teacher_sh is None:
      self.teacher_sh = mesh_lib.state_shardings(teacher_params, self.mesh)
    if self.batch_sh is None:
      self.batch_sh = mesh_lib.batch_shardings(batch, self.mesh)
    self._build()

  def __call__(self, state, teacher_params, batch):
    self._prepare(state, teacher_params, batch)
    return self.jitted(state, teacher_params, batch)

  def lower(self, state, teacher_params, batch):
    """The jitted function lowered for these arguments (compile() it for cost / memory)."""
    self._prepare(state, teacher_params, batch)
    return self.jitted.lower(state, teacher_params, batch)


def make_train_step(student_graphdef, teacher_graphdef, proj_graphdef, method: Method,
                    kd_cfg: KDConfig, optimizer: optax.GradientTransformation, *,
                    mesh: Mesh | None = None, state_shardings=None, batch_shardings=None,
                    teacher_shardings=None, vocab_map=None, accumulate: int = 1,
                    pair_saving: bool = True, donate: bool = True, jit: bool = True,
                    compiler_options: dict | None = None,
                    teacher_cache: CacheLayout | None = None):
  """train_step(state, teacher_params, batch) -> (state, metrics), jitted, state donated.

  With a mesh, in/out shardings are `state_shardings` / `teacher_shardings` / `batch_shardings`
  (derived from the first call's arguments when None: logical rules for params and optimizer
  moments, batch rows over ("data", "fsdp")); metrics come back replicated. `accumulate`: number
  of micro-batches the batch is split into (module doc). Metrics: the objective's (sum, count)
  pairs plus "grad_norm" (global norm of the applied gradient, before clipping) with count 1.
  `jit=False` returns the pure function (for inspection: jax.make_jaxpr). `compiler_options`:
  XLA options for jax.jit (tests pass {"xla_backend_optimization_level": 0} to compile faster).
  `teacher_cache`: the batches carry the teacher's states (make_forward).
  """
  if accumulate < 1:
    raise ValueError(f"accumulate must be >= 1, got {accumulate}")
  loss_fn = make_forward(student_graphdef, teacher_graphdef, proj_graphdef, method, kd_cfg,
                         vocab_map=vocab_map, pair_saving=pair_saving,
                         teacher_cache=teacher_cache)

  def train_step(state: TrainState, teacher_params, batch):
    trainable = state.trainable
    grads, metrics = _grads_and_metrics(loss_fn, method, kd_cfg, trainable, teacher_params,
                                        batch, accumulate, mesh)
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    new = optax.apply_updates(trainable, updates)
    rng, _ = jax.random.split(jax.random.wrap_key_data(state.rng))
    metrics["grad_norm"] = (optax.tree.norm(grads).astype(F32), jnp.ones((), F32))
    new_state = state.replace(step=state.step + 1, params=new["student"], proj=new["proj"],
                              opt_state=opt_state, rng=jax.random.key_data(rng))
    return new_state, metrics

  if not jit:
    return train_step
  return _LazyJit(train_step, mesh, state_shardings, teacher_shardings, batch_shardings,
                  n_out_state=True, donate=donate, compiler_options=compiler_options)


def make_eval_step(student_graphdef, teacher_graphdef, proj_graphdef, method: Method,
                   kd_cfg: KDConfig, *, mesh: Mesh | None = None, state_shardings=None,
                   batch_shardings=None, teacher_shardings=None, vocab_map=None,
                   pair_saving: bool = True, jit: bool = True,
                   compiler_options: dict | None = None):
  """eval_step(state, teacher_params, batch) -> metrics {name: (sum, count)}: the training
  objective's terms on a batch, no update (nothing donated)."""
  loss_fn = make_forward(student_graphdef, teacher_graphdef, proj_graphdef, method, kd_cfg,
                         vocab_map=vocab_map, pair_saving=pair_saving)

  def eval_step(state: TrainState, teacher_params, batch):
    _, metrics = loss_fn(state.trainable, teacher_params, batch)
    return _f32_metrics(metrics)

  if not jit:
    return eval_step
  return _LazyJit(eval_step, mesh, state_shardings, teacher_shardings, batch_shardings,
                  n_out_state=False, donate=False, compiler_options=compiler_options)
