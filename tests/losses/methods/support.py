"""Shared pieces of the per-method loss tests: float64 numpy building blocks and inputs.

The numpy references in the test files are written from the formulas in the method files'
docstrings (cot2align_jax/losses/methods/*.py, docs/method.md §4, §8), one row and one position
at a time, without calling the JAX code. Shapes are deliberately all different: Ls=7, Lt=9,
Vs=13, Vt=17, dS=8, dT=12; the last batch row has empty response masks.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cot2align_jax.core import spec
from cot2align_jax.losses.cross_tokenizer import KDSide
from cot2align_jax.losses.methods import LossInputs
from cot2align_jax.losses.projectors import Projectors
from cot2align_jax.models import ModelOutput

B, LS, LT, VS, VT, DS, DT = 3, 7, 9, 13, 17, 8, 12
TAU = 2.0
RTOL = 1e-5


# ------------------------------------------------------------------------------------------
# numpy (float64) building blocks
# ------------------------------------------------------------------------------------------

def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = np.max(x, axis=-1, keepdims=True)
  return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def np_softmax(x):
  return np.exp(np_log_softmax(x))


def np_fkl(student, teacher, tau):
  """KL(p_teacher ‖ q_student) at τ for one position's logits."""
  lq, lp = np_log_softmax(student / tau), np_log_softmax(teacher / tau)
  p = np.exp(lp)
  return float(np.sum(np.where(p > 0, p * (lp - lq), 0.0)))


def np_rkl(student, teacher, tau):
  return np_fkl(teacher, student, tau)


NP_DIV = {"fkl": np_fkl, "rkl": np_rkl}


def np_ce(logits, label):
  return float(-np_log_softmax(logits)[label])


def np_std(rows):
  """Population std of a list of valid rows (all features); 1 if zero / empty."""
  if len(rows) == 0:
    return 1.0
  s = float(np.std(np.stack(rows)))
  return s if s > 0 else 1.0


def lin(params, x):
  w, b = params
  return x @ w + b


def np_params(projectors):
  """{name: (W float64 [in, out], b [out])} of the projectors that exist."""
  out = {}
  for name in ("query", "t2s", "s2t"):
    layer = getattr(projectors, name)
    if layer is not None:
      out[name] = (np.asarray(layer.kernel[...], np.float64),
                   np.asarray(layer.bias[...], np.float64))
  return out


# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------

def masks():
  """Response masks: contiguous spans after a prompt; row 2 is empty on both sides."""
  ms = np.zeros((B, LS), np.int32)
  mt = np.zeros((B, LT), np.int32)
  ms[0, 2:7] = 1      # 5 student tokens
  mt[0, 3:9] = 1      # 6 teacher tokens
  ms[1, 1:5] = 1      # 4 student tokens
  mt[1, 2:5] = 1      # 3 teacher tokens
  return ms, mt


def rand_inputs(seed=0):
  rng = np.random.default_rng(seed)
  ms, mt = masks()
  return dict(
      s_logits=rng.normal(size=(B, LS, VS)).astype(np.float32) * 2,
      t_logits=rng.normal(size=(B, LT, VT)).astype(np.float32) * 2,
      s_hidden=rng.normal(size=(B, LS, DS)).astype(np.float32),
      t_hidden=rng.normal(size=(B, LT, DT)).astype(np.float32) * 3,
      s_ids=rng.integers(0, VS, size=(B, LS)).astype(np.int32),
      t_ids=rng.integers(0, VT, size=(B, LT)).astype(np.int32),
      s_labels=(rng.integers(0, VS, size=(B, LS)) * ms).astype(np.int32),
      t_labels=(rng.integers(0, VT, size=(B, LT)) * mt).astype(np.int32),
      s_embed=rng.normal(size=(VS, DS)).astype(np.float32),
      t_embed=rng.normal(size=(VT, DT)).astype(np.float32) * 0.5,
      s_head=rng.normal(size=(DS, VS)).astype(np.float32),
      t_head=rng.normal(size=(DT, VT)).astype(np.float32),
      ms=ms, mt=mt)


def _arr(v):
  return None if v is None else jnp.asarray(v)


def sides(x):
  student = KDSide(jnp.asarray(x["s_logits"]), jnp.asarray(x["s_hidden"]),
                      jnp.asarray(x["s_ids"]), jnp.asarray(x["s_labels"]), jnp.asarray(x["ms"]),
                   jnp.asarray(x["s_embed"]), jnp.asarray(x["s_head"]))
  teacher = KDSide(jnp.asarray(x["t_logits"]), jnp.asarray(x["t_hidden"]),
                      jnp.asarray(x["t_ids"]), jnp.asarray(x["t_labels"]), jnp.asarray(x["mt"]),
                      _arr(x["t_embed"]), jnp.asarray(x["t_head"]))
  return student, teacher


def assert_close(got, want, rtol=RTOL, atol=1e-6):
  np.testing.assert_allclose(float(got), float(want), rtol=rtol, atol=atol)


def all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(tree))



def mined_inputs(seed=4):
  x = rand_inputs(seed)
  rng = np.random.default_rng(seed)
  vocab_map = rng.integers(0, VS - 3, size=VT).astype(np.int32)  # student ids 10..12 unmapped
  vocab_map[[1, 5]] = -1                                           # teacher ids with no map
  mined_pos = rng.integers(0, LT, size=(B, LS)).astype(np.int32)
  mined_mask = (rng.random((B, LS)) < 0.8).astype(np.int32) * x["ms"]
  # Make about half of the aligned teacher tokens map to the student's label.
  for b in range(B):
    for i in range(LS):
      if rng.random() < 0.6:
        candidates = np.nonzero(vocab_map == x["s_labels"][b, i])[0]
        if len(candidates):
          x["t_labels"][b, mined_pos[b, i]] = candidates[0]
  x.update(vocab_map=vocab_map, mined_pos=mined_pos, mined_mask=mined_mask)
  return x


def cma_projectors(x, seed=0, favoured=3):
  """Projectors whose t2s bias pushes t2s argmax towards student id `favoured` (so that the
  agreement mask is on at positions labelled `favoured` and off elsewhere)."""
  proj = Projectors.dskd(DS, DT, rngs=nnx.Rngs(seed))
  column = x["s_head"][:, favoured]
  proj.t2s.bias[...] = jnp.asarray(20.0 * column / np.dot(column, column))
  return proj


def cma_inputs(seed=9, favoured=3):
  x = rand_inputs(seed)
  x["s_head"][:, favoured] *= 3.0                 # the longest column: the bias makes it win
  x["s_labels"][:, ::2] = favoured * x["ms"][:, ::2]
  return x


def eta_inputs(seed=11, favoured=3):
  x = cma_inputs(seed, favoured)
  rng = np.random.default_rng(seed)
  x["eta_pos"] = rng.integers(0, LT, size=(B, LS)).astype(np.int32)
  x["eta_mask"] = (rng.random((B, LS)) < 0.7).astype(np.int32) * x["ms"]
  return x


def loss_inputs(seed=0, same_vocab=False):
  """LossInputs (losses.methods) of a batch built from rand_inputs, with every alignment array
  and a vocabulary map; same_vocab: the teacher shares the student's length and vocabulary."""
  x = rand_inputs(seed)
  rng = np.random.default_rng(seed + 1000)  # not rand_inputs' stream
  if same_vocab:
    x["t_logits"] = rng.normal(size=(B, LS, VS)).astype(np.float32) * 2
    x["t_hidden"] = rng.normal(size=(B, LS, DT)).astype(np.float32)
    x["t_head"] = rng.normal(size=(DT, VS)).astype(np.float32)
    x["t_embed"] = rng.normal(size=(VS, DT)).astype(np.float32)
    x["t_ids"], x["t_labels"], x["mt"] = x["s_ids"], x["s_labels"], x["ms"]
  lt, vt = x["t_logits"].shape[1:]
  batch = {}
  for view in spec.VIEWS:
    for side, ids, labels, mask in (("student", x["s_ids"], x["s_labels"], x["ms"]),
                                    ("teacher", x["t_ids"], x["t_labels"], x["mt"])):
      batch[spec.key(view, side, "input_ids")] = ids
      batch[spec.key(view, side, "labels")] = labels
      batch[spec.key(view, side, "loss_mask")] = mask
      batch[spec.key(view, side, "attention_mask")] = np.ones_like(mask)
  for kind in ("eta", "mined"):
    batch[spec.align_key(f"{kind}_pos")] = rng.integers(0, lt, (B, LS)).astype(np.int32)
    batch[spec.align_key(f"{kind}_mask")] = (rng.random((B, LS)) < 0.7).astype(np.int32) * x["ms"]
  batch["has_pair"] = np.array([True, False, True])
  batch["example_id"] = np.arange(B, dtype=np.int32)

  def outputs(logits, hidden):
    return ModelOutput(jnp.asarray(logits), (jnp.asarray(hidden), jnp.asarray(hidden)), None)

  student = outputs(x["s_logits"], x["s_hidden"])
  teacher = outputs(x["t_logits"], x["t_hidden"])
  return LossInputs(
      batch={k: jnp.asarray(v) for k, v in batch.items()},
      student={"main": student, "pair": student}, teacher={"main": teacher, "pair": teacher},
      student_embed=jnp.asarray(x["s_embed"]), student_head=jnp.asarray(x["s_head"]),
      teacher_embed=jnp.asarray(x["t_embed"]), teacher_head=jnp.asarray(x["t_head"]),
      vocab_map=jnp.asarray(rng.integers(0, VS, vt), jnp.int32))
