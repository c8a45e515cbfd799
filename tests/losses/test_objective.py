"""The method registry and the CoT2Align objective on a hand-built batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cot2align_jax.core import spec
from cot2align_jax.losses import methods as M
from cot2align_jax.losses.methods.dskd_cma import dskd_cma_loss
from cot2align_jax.losses.ot import OTConfig, sinkhorn_ot
from cot2align_jax.models import ModelOutput

B, LS, LT, VS, VT, DS, DT = 3, 6, 7, 11, 13, 8, 12


def _batch(rng, has_pair=(True, False, True)):
  b = {}
  for view in spec.VIEWS:
    for side, (length, vocab) in (("student", (LS, VS)), ("teacher", (LT, VT))):
      ids = rng.integers(0, vocab, (B, length)).astype(np.int32)
      labels = rng.integers(0, vocab, (B, length)).astype(np.int32)
      start = rng.integers(1, 3, B)
      end = rng.integers(length - 2, length + 1, B)
      pos = np.arange(length)
      loss_mask = ((pos >= start[:, None]) & (pos < end[:, None])).astype(np.int32)
      if view == "pair":
        loss_mask *= np.asarray(has_pair, np.int32)[:, None]
      b[spec.key(view, side, "input_ids")] = ids
      b[spec.key(view, side, "labels")] = labels * loss_mask
      b[spec.key(view, side, "loss_mask")] = loss_mask
      b[spec.key(view, side, "attention_mask")] = (pos < end[:, None]).astype(np.int32)
  b[spec.align_key("eta_pos")] = rng.integers(0, LT, (B, LS)).astype(np.int32)
  b[spec.align_key("eta_mask")] = rng.integers(0, 2, (B, LS)).astype(np.int32)
  b[spec.align_key("mined_pos")] = rng.integers(0, LT, (B, LS)).astype(np.int32)
  b[spec.align_key("mined_mask")] = rng.integers(0, 2, (B, LS)).astype(np.int32)
  b["has_pair"] = np.asarray(has_pair)
  b["example_id"] = np.arange(B, dtype=np.int32)
  return {k: jnp.asarray(v) for k, v in b.items()}


def _outputs(rng, length, vocab, dim):
  return ModelOutput(jnp.asarray(rng.normal(size=(B, length, vocab)), jnp.float32),
                     (jnp.asarray(rng.normal(size=(B, length, dim)), jnp.float32),
                      jnp.asarray(rng.normal(size=(B, length, dim)), jnp.float32)), None)


def _inputs(seed=0, has_pair=(True, False, True)):
  rng = np.random.default_rng(seed)
  return M.LossInputs(
      batch=_batch(rng, has_pair),
      student={v: _outputs(rng, LS, VS, DS) for v in spec.VIEWS},
      teacher={v: _outputs(rng, LT, VT, DT) for v in spec.VIEWS},
      student_embed=jnp.asarray(rng.normal(size=(VS, DS)), jnp.float32),
      student_head=jnp.asarray(rng.normal(size=(DS, VS)), jnp.float32),
      teacher_embed=jnp.asarray(rng.normal(size=(VT, DT)), jnp.float32),
      teacher_head=jnp.asarray(rng.normal(size=(DT, VT)), jnp.float32),
      vocab_map=jnp.asarray(rng.integers(0, VS, VT), jnp.int32))


def _ce_numpy(inputs):
  b = inputs.batch
  logits = np.asarray(inputs.student["main"].logits, np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                         keepdims=True)) - logits.max(-1, keepdims=True)
  labels = np.asarray(b["main/student/labels"])
  mask = np.asarray(b["main/student/loss_mask"], np.float64)
  nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
  return (nll * mask).sum(), mask.sum()


@pytest.mark.parametrize("has_pair", [(True, False, True), (False, False, False)])
def test_cot2align_objective_equals_sum_of_terms(has_pair):
  cfg = M.KDConfig(method="cot2align", base="dskd_cma", kd_rate=0.3, temperature=2.0,
                   ot=OTConfig(num_iters=30))
  method = M.method_from_config(cfg)
  inputs = _inputs(1, has_pair)
  proj = M.build_projectors(method, DS, DT, rngs=nnx.Rngs(0))
  loss, metrics = M.objective(method, cfg, inputs, proj)

  ce_sum, n_tok = _ce_numpy(inputs)
  s, t = M.side(inputs, "student"), M.side(inputs, "teacher")
  kd_sum, _, _ = dskd_cma_loss(proj.kd, s, t, divergence="fkl", temperature=2.0)
  b = inputs.batch
  ot_total = 0.0
  views = {"same": ("main", "main"), "cross_a": ("pair", "main"), "cross_b": ("main", "pair")}
  for term, (sv, tv) in views.items():
    for layer in (0, -1):
      x = inputs.student[sv].hidden_states[layer]
      y = proj.ot(inputs.teacher[tv].hidden_states[layer])
      per = np.asarray(sinkhorn_ot(x, y, b[f"{sv}/student/loss_mask"],
                                   b[f"{tv}/teacher/loss_mask"], num_iters=30))
      if term != "same":
        per = per * np.asarray(has_pair, np.float64)
        assert not any(has_pair) or per.sum() != 0
      ot_total += 0.25 * per.mean()
  expected = (0.7 * ce_sum + 0.3 * float(kd_sum)) / n_tok + 0.3 * ot_total
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(metrics["ce"][0]) == pytest.approx(ce_sum, rel=1e-5)
  assert float(metrics["ot/total"][0] / metrics["ot/total"][1]) == pytest.approx(ot_total,
                                                                               rel=1e-5)
  if not any(has_pair):
    assert float(metrics["ot/cross_a/final"][0]) == 0.0
    assert float(metrics["ot/cross_b/embed"][0]) == 0.0


def test_sft_is_mean_cross_entropy():
  inputs = _inputs(2)
  cfg = M.KDConfig(method="sft")
  loss, metrics = M.objective(M.method_from_config(cfg), cfg, inputs, None)
  ce_sum, n_tok = _ce_numpy(inputs)
  assert float(loss) == pytest.approx(ce_sum / n_tok, rel=1e-6)
  assert set(metrics) == {"ce", "loss"}


def test_switching_ot_terms_off_removes_them():
  inputs = _inputs(3)
  full = M.KDConfig(method="cot2align", base="uld", ot=OTConfig(num_iters=20))
  none = M.KDConfig(method="cot2align", base="uld", ot=OTConfig(num_iters=20, terms=()))
  plain = M.KDConfig(method="uld")
  method = M.method_from_config(full)
  proj = M.build_projectors(method, DS, DT, rngs=nnx.Rngs(0))
  l_full, m_full = M.objective(method, full, inputs, proj)
  l_none, _ = M.objective(method, none, inputs, proj)
  l_plain, _ = M.objective(M.method_from_config(plain), plain, inputs, None)
  assert float(l_none) == pytest.approx(float(l_plain), rel=1e-6)
  ot = float(m_full["ot/total"][0] / m_full["ot/total"][1])
  assert float(l_full) == pytest.approx(float(l_plain) + 0.5 * ot, rel=1e-5)


METHOD_CONFIGS = ([M.KDConfig(method=m) for m in M.METHODS]
                  + [M.KDConfig(method="cot2align", base=b, ot=OTConfig(num_iters=10))
                     for b in ("dskd_cma", "uld", "mined", "kd", "kd_topk")])


@pytest.mark.parametrize("cfg", METHOD_CONFIGS, ids=lambda c: f"{c.method}-{c.base}")
def test_every_method_gives_finite_loss_and_gradients(cfg):
  method = M.method_from_config(cfg)
  inputs = _inputs(4)
  kd_name = cfg.base if cfg.method == "cot2align" else cfg.method
  # same-tokenizer terms (plain KD, kd_topk; dskd pairs positions 1:1): the teacher shares the
  # student's vocabulary and length
  if M.get_method(kd_name).same_vocab or kd_name == "dskd":
    inputs = inputs._replace(
        teacher={v: o._replace(logits=o.logits[:, :LS, :VS] * 0.5,
                               hidden_states=tuple(h[:, :LS] for h in o.hidden_states))
                 for v, o in inputs.teacher.items()},
        teacher_head=inputs.teacher_head[:, :VS],
        batch={**inputs.batch,
               **{f"{v}/teacher/{f}": inputs.batch[f"{v}/student/{f}"] for v in spec.VIEWS
                  for f in ("input_ids", "labels", "loss_mask", "attention_mask")}})
  proj = M.build_projectors(method, DS, DT, rngs=nnx.Rngs(0)) if (method.projectors or
                                                                  method.ot) else None
  graphdef, state = (nnx.split(proj) if proj is not None else (None, None))

  def f(student_logits, student_hidden, state):
    p = nnx.merge(graphdef, state) if graphdef is not None else None
    main = inputs.student["main"]
    student = {**inputs.student, "main": main._replace(
        logits=student_logits, hidden_states=(main.hidden_states[0], student_hidden))}
    return M.objective(method, cfg, inputs._replace(student=student), p)[0]

  main = inputs.student["main"]
  value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(
      main.logits, main.hidden_states[-1], state)
  assert np.isfinite(float(value)) and float(value) > 0
  for g in jax.tree_util.tree_leaves(grads):
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.abs(np.asarray(grads[0])).sum() > 0


def test_registry_errors_name_the_known_methods():
  with pytest.raises(ValueError, match="unknown KD method 'dkd'; known: .*cot2align.*dskd_cma"):
    M.get_method("dkd")
  with pytest.raises(ValueError, match="cot2align needs a base KD method"):
    M.get_method("cot2align", "sft")
  with pytest.raises(ValueError, match="needs the MinED vocabulary map"):
    cfg = M.KDConfig(method="mined")
    M.objective(M.method_from_config(cfg), cfg, _inputs(5)._replace(vocab_map=None), None)
