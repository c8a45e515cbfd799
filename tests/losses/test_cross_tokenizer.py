"""Cross-tokenizer KD losses against float64 numpy re-computations of their formulas.

The numpy references below are written from the formulas in the docstring of
cot2align_jax/losses/cross_tokenizer.py (and METHOD §4, §8), one row and one position at a time,
without calling the JAX code. Shapes are deliberately all different: Ls=7, Lt=9, Vs=13, Vt=17,
dS=8, dT=12; the last batch row has empty response masks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cot2align_jax.losses import cross_tokenizer as ct
from cot2align_jax.losses.projectors import Projectors

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
  student = ct.KDSide(jnp.asarray(x["s_logits"]), jnp.asarray(x["s_hidden"]),
                      jnp.asarray(x["s_ids"]), jnp.asarray(x["s_labels"]), jnp.asarray(x["ms"]),
                      jnp.asarray(x["s_embed"]), jnp.asarray(x["s_head"]))
  teacher = ct.KDSide(jnp.asarray(x["t_logits"]), jnp.asarray(x["t_hidden"]),
                      jnp.asarray(x["t_ids"]), jnp.asarray(x["t_labels"]), jnp.asarray(x["mt"]),
                      _arr(x["t_embed"]), jnp.asarray(x["t_head"]))
  return student, teacher


def assert_close(got, want, rtol=RTOL, atol=1e-6):
  np.testing.assert_allclose(float(got), float(want), rtol=rtol, atol=atol)


def all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(tree))


# ------------------------------------------------------------------------------------------
# ULD
# ------------------------------------------------------------------------------------------

def np_uld(s_logits, t_logits, ms, mt, tau):
  total, count = 0.0, 0
  for b in range(B):
    s_idx, t_idx = np.nonzero(ms[b])[0], np.nonzero(mt[b])[0]
    for k in range(min(len(s_idx), len(t_idx))):
      ps = np.sort(np_softmax(s_logits[b, s_idx[k]] / tau))[::-1]
      pt = np.sort(np_softmax(t_logits[b, t_idx[k]] / tau))[::-1]
      size = max(len(ps), len(pt))
      ps, pt = np.pad(ps, (0, size - len(ps))), np.pad(pt, (0, size - len(pt)))
      total += np.sum(np.abs(ps - pt))
      count += 1
  return total, count


@pytest.mark.parametrize("tau", [1.0, TAU])
def test_uld_matches_numpy(tau):
  x = rand_inputs(1)
  got, count = ct.uld_loss(x["s_logits"], x["t_logits"], x["ms"], x["mt"], temperature=tau)
  want, want_count = np_uld(x["s_logits"], x["t_logits"], x["ms"], x["mt"], tau)
  assert_close(got, want)
  assert float(count) == want_count == 5 + 3


def test_uld_zero_for_identical_sorted_distributions():
  x = rand_inputs(2)
  rng = np.random.default_rng(3)
  t_logits = np.full((B, LT, VT), -np.inf, np.float32)   # extra teacher vocab: padded (-inf)
  for b in range(B):
    s_idx, t_idx = np.nonzero(x["ms"][b])[0], np.nonzero(x["mt"][b])[0]
    for k in range(min(len(s_idx), len(t_idx))):
      t_logits[b, t_idx[k], :VS] = rng.permutation(x["s_logits"][b, s_idx[k]])
  got, _ = ct.uld_loss(x["s_logits"], t_logits, x["ms"], x["mt"], temperature=TAU)
  assert abs(float(got)) < 1e-5


# ------------------------------------------------------------------------------------------
# MinED
# ------------------------------------------------------------------------------------------

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


def np_mined(x, tau):
  total, used_teacher = 0.0, 0
  for b in range(B):
    for i in range(LS):
      if not x["ms"][b, i]:
        continue
      j = x["mined_pos"][b, i]
      proj = np.full(VS, -np.inf)
      for t in range(VT):
        v = x["vocab_map"][t]
        if 0 <= v < VS:
          proj[v] = max(proj[v], float(x["t_logits"][b, j, t]))
      proj = np.maximum(proj, -1e5)
      label = x["s_labels"][b, i]
      aligned = (x["mined_mask"][b, i] == 1 and x["vocab_map"][x["t_labels"][b, j]] == label
                 and proj.max() > -1e5)
      if aligned:
        target = proj
        used_teacher += 1
      else:
        target = np.full(VS, -1e5)
        target[label] = 100.0
      total += np_fkl(x["s_logits"][b, i], target, tau)
  return total, used_teacher


@pytest.mark.parametrize("tau", [1.0, TAU])
def test_mined_matches_numpy(tau):
  x = mined_inputs()
  got, count = ct.mined_loss(x["s_logits"], x["t_logits"], x["s_labels"], x["ms"], x["t_labels"],
                             x["mined_pos"], x["mined_mask"], x["vocab_map"], temperature=tau)
  want, used_teacher = np_mined(x, tau)
  assert_close(got, want)
  assert float(count) == x["ms"].sum()
  _, aligned = ct.mined_targets(x["t_logits"], x["s_labels"], x["ms"], x["t_labels"],
                                x["mined_pos"], x["mined_mask"], x["vocab_map"], VS)
  assert int(aligned.sum()) == used_teacher > 0
  assert used_teacher < x["ms"].sum()          # both branches (teacher and one-hot) are tested


def test_mined_zero_with_identity_map_and_identical_logits():
  x = rand_inputs(5)
  logits = x["s_logits"][:, :, :VS]
  pos = np.broadcast_to(np.arange(LS), (B, LS)).astype(np.int32)
  got, count = ct.mined_loss(logits, logits, x["s_labels"], x["ms"], x["s_labels"], pos, x["ms"],
                             np.arange(VS, dtype=np.int32), temperature=TAU)
  assert abs(float(got)) < 1e-5 and float(count) == x["ms"].sum()


# ------------------------------------------------------------------------------------------
# DSKD (same tokenizer)
# ------------------------------------------------------------------------------------------

def same_vocab_inputs(seed=6):
  x = rand_inputs(seed)
  rng = np.random.default_rng(seed)
  x["t_logits"] = rng.normal(size=(B, LS, VS)).astype(np.float32) * 2
  x["t_hidden"] = rng.normal(size=(B, LS, DT)).astype(np.float32)
  x["t_head"] = rng.normal(size=(DT, VS)).astype(np.float32)
  x["t_ids"], x["t_labels"], x["mt"] = x["s_ids"], x["s_labels"], x["ms"]
  x["t_embed"] = None
  return x


def np_dskd(x, p, div, tau):
  t2s_ce = t2s_kd = s2t_kd = 0.0
  for b in range(B):
    for i in range(LS):
      if x["ms"][b, i]:
        t2s = lin(p["t2s"], x["t_hidden"][b, i].astype(np.float64)) @ x["s_head"]
        t2s_ce += np_ce(t2s, x["s_labels"][b, i])
        t2s_kd += NP_DIV[div](x["s_logits"][b, i], t2s, tau)
      if x["mt"][b, i]:
        s2t = lin(p["s2t"], x["s_hidden"][b, i].astype(np.float64)) @ x["t_head"]
        s2t_kd += np_fkl(s2t, x["t_logits"][b, i], tau)
  return t2s_ce, t2s_kd, s2t_kd


@pytest.mark.parametrize("div", ["fkl", "rkl"])
def test_dskd_matches_numpy(div):
  x = same_vocab_inputs()
  proj = Projectors(DS, DT, rngs=nnx.Rngs(0), names=("t2s", "s2t"))
  student, teacher = sides(x)
  total, count, parts = ct.dskd_loss(proj, student, teacher, divergence=div, temperature=TAU)
  t2s_ce, t2s_kd, s2t_kd = np_dskd(x, np_params(proj), div, TAU)
  assert_close(parts["t2s_ce"], t2s_ce)
  assert_close(parts["t2s_kd"], t2s_kd)
  assert_close(parts["s2t_kd"], s2t_kd)
  assert_close(total, t2s_ce + t2s_kd + s2t_kd)
  assert float(count) == x["ms"].sum()


def test_dskd_kd_terms_zero_when_projections_reproduce_the_other_model():
  """Same width, identity projectors, teacher = student: t2s_KD = s2t_KD = 0 (CE is not 0)."""
  x = same_vocab_inputs(7)
  proj = Projectors(DS, DS, rngs=nnx.Rngs(1), names=("t2s", "s2t"))
  for layer in (proj.t2s, proj.s2t):
    layer.kernel[...] = jnp.eye(DS)
    layer.bias[...] = jnp.zeros(DS)
  h = x["s_hidden"]
  logits = h @ x["s_head"]
  student = ct.KDSide(logits, h, None, x["s_labels"], x["ms"], None, x["s_head"])
  teacher = ct.KDSide(logits, h, None, x["s_labels"], x["ms"], None, x["s_head"])
  _, _, parts = ct.dskd_loss(proj, student, teacher, divergence="fkl", temperature=TAU)
  assert abs(float(parts["t2s_kd"])) < 1e-5 and abs(float(parts["s2t_kd"])) < 1e-5
  assert float(parts["t2s_ce"]) > 0


def test_dskd_rejects_different_lengths():
  x = rand_inputs(8)
  student, teacher = sides(x)
  with pytest.raises(ValueError, match="equal student/teacher lengths"):
    ct.dskd_loss(Projectors(DS, DT, rngs=nnx.Rngs(0), names=("t2s", "s2t")), student, teacher)


# ------------------------------------------------------------------------------------------
# DSKD-CMA
# ------------------------------------------------------------------------------------------

def cma_projectors(x, seed=0, favoured=3):
  """Projectors whose t2s bias pushes t2s argmax towards student id `favoured` (so that the
  agreement mask is on at positions labelled `favoured` and off elsewhere)."""
  proj = Projectors(DS, DT, rngs=nnx.Rngs(seed))
  column = x["s_head"][:, favoured]
  proj.t2s.bias[...] = jnp.asarray(20.0 * column / np.dot(column, column))
  return proj


def cma_inputs(seed=9, favoured=3):
  x = rand_inputs(seed)
  x["s_head"][:, favoured] *= 3.0                 # the longest column: the bias makes it win
  x["s_labels"][:, ::2] = favoured * x["ms"][:, ::2]
  return x


def np_cma(x, p, div, tau):
  ms, mt = x["ms"], x["mt"]
  t_embed = x["t_embed"].astype(np.float64)
  s_embed = x["s_embed"].astype(np.float64)
  e_t_rows, label_rows, h_rows = [], [], []
  for b in range(B):
    for j in range(LT):
      if mt[b, j]:
        e_t_rows.append(np.concatenate([t_embed[x["t_ids"][b, j]], t_embed[x["t_labels"][b, j]]]))
        label_rows.append(t_embed[x["t_labels"][b, j]])
        h_rows.append(x["t_hidden"][b, j].astype(np.float64))
  std_e, std_label, std_h = np_std(e_t_rows), np_std(label_rows), np_std(h_rows)
  t2s_ce = t2s_kd = s2t_kd = 0.0
  acc = 0
  for b in range(B):
    s_valid, t_valid = np.nonzero(ms[b])[0], np.nonzero(mt[b])[0]
    if len(s_valid) == 0 or len(t_valid) == 0:
      continue
    q = np.stack([lin(p["query"], np.concatenate([s_embed[x["s_ids"][b, i]],
                                                   s_embed[x["s_labels"][b, i]]]))
                  for i in s_valid])
    k = np.stack([np.concatenate([t_embed[x["t_ids"][b, j]], t_embed[x["t_labels"][b, j]]])
                  for j in t_valid]) / std_e
    a = q @ k.T / np.sqrt(2 * DT)                                   # [n_s, n_t] valid pairs
    v_t = np.stack([lin(p["t2s"], x["t_hidden"][b, j] / std_h + t_embed[x["t_labels"][b, j]]
                        / std_label) for j in t_valid])
    t2s_h = np_softmax(a) @ v_t
    for row, i in enumerate(s_valid):
      t2s = t2s_h[row] @ x["s_head"]
      label = x["s_labels"][b, i]
      t2s_ce += np_ce(t2s, label)
      if np.argmax(t2s) == label:
        acc += 1
        t2s_kd += NP_DIV[div](x["s_logits"][b, i], t2s, tau)
    v_s = np.stack([lin(p["s2t"], x["s_hidden"][b, i].astype(np.float64)) for i in s_valid])
    s2t_h = np_softmax(a.T) @ v_s
    for row, j in enumerate(t_valid):
      s2t_kd += np_fkl(s2t_h[row] @ x["t_head"], x["t_logits"][b, j], tau)
  return t2s_ce, t2s_kd, s2t_kd, acc


@pytest.mark.parametrize("div", ["fkl", "rkl"])
def test_dskd_cma_matches_numpy(div):
  x = cma_inputs()
  proj = cma_projectors(x)
  student, teacher = sides(x)
  total, count, parts = ct.dskd_cma_loss(proj, student, teacher, divergence=div, temperature=TAU)
  t2s_ce, t2s_kd, s2t_kd, acc = np_cma(x, np_params(proj), div, TAU)
  assert 0 < acc < x["ms"].sum()                 # the agreement mask is on and off somewhere
  assert float(parts["t2s_acc"]) == acc == float(parts["t2s_kd_count"])
  assert_close(parts["t2s_ce"], t2s_ce)
  assert_close(parts["t2s_kd"], t2s_kd)
  assert_close(parts["s2t_kd"], s2t_kd)
  assert_close(total, t2s_ce + t2s_kd + s2t_kd)
  assert float(count) == x["ms"].sum()


def test_dskd_cma_kd_terms_zero_when_projections_reproduce_the_other_model():
  """d_S = d_T, identity t2s/s2t, zero teacher embeddings (A = 0, uniform attention), every
  hidden state the same unit-std vector h0 with teacher logits h0·W_T: then t2s_logits equal
  the student logits and s2t_logits the teacher logits, so t2s_KD = s2t_KD = 0."""
  x = rand_inputs(10)
  rng = np.random.default_rng(10)
  h0 = rng.normal(size=DS)
  h0 = ((h0 - h0.mean()) / h0.std()).astype(np.float32)
  hidden_s = np.broadcast_to(h0, (B, LS, DS)).astype(np.float32)
  hidden_t = np.broadcast_to(h0, (B, LT, DS)).astype(np.float32)
  t_head = rng.normal(size=(DS, VT)).astype(np.float32)
  s_logits = hidden_s @ x["s_head"]
  labels = (np.argmax(s_logits, -1) * x["ms"]).astype(np.int32)   # every position agrees
  proj = Projectors(DS, DS, rngs=nnx.Rngs(2))
  for layer in (proj.t2s, proj.s2t):
    layer.kernel[...] = jnp.eye(DS)
    layer.bias[...] = jnp.zeros(DS)
  student = ct.KDSide(s_logits, hidden_s, x["s_ids"], labels, x["ms"], x["s_embed"], x["s_head"])
  teacher = ct.KDSide(hidden_t @ t_head, hidden_t, x["t_ids"], x["t_labels"], x["mt"],
                      np.zeros((VT, DS), np.float32), t_head)
  _, _, parts = ct.dskd_cma_loss(proj, student, teacher, divergence="fkl", temperature=TAU)
  assert float(parts["t2s_kd_count"]) == x["ms"].sum()
  assert abs(float(parts["t2s_kd"])) < 1e-5 and abs(float(parts["s2t_kd"])) < 1e-5
  assert float(parts["t2s_ce"]) > 0


# ------------------------------------------------------------------------------------------
# DSKD-ETA
# ------------------------------------------------------------------------------------------

def eta_inputs(seed=11, favoured=3):
  x = cma_inputs(seed, favoured)
  rng = np.random.default_rng(seed)
  x["eta_pos"] = rng.integers(0, LT, size=(B, LS)).astype(np.int32)
  x["eta_mask"] = (rng.random((B, LS)) < 0.7).astype(np.int32) * x["ms"]
  return x


def np_eta(x, p, div, tau):
  t2s_ce = t2s_kd = s2t_kd = 0.0
  pairs = 0
  for b in range(B):
    for i in range(LS):
      j = x["eta_pos"][b, i]
      if not (x["eta_mask"][b, i] and x["ms"][b, i] and x["mt"][b, j]):
        continue
      pairs += 1
      t2s = lin(p["t2s"], x["t_hidden"][b, j].astype(np.float64)) @ x["s_head"]
      label = x["s_labels"][b, i]
      t2s_ce += np_ce(t2s, label)
      if np.argmax(t2s) == label:
        t2s_kd += NP_DIV[div](x["s_logits"][b, i], t2s, tau)
      s2t = lin(p["s2t"], x["s_hidden"][b, i].astype(np.float64)) @ x["t_head"]
      s2t_kd += NP_DIV[div](s2t, x["t_logits"][b, j], tau)
  return t2s_ce, t2s_kd, s2t_kd, pairs


@pytest.mark.parametrize("div", ["fkl", "rkl"])
def test_dskd_eta_matches_numpy(div):
  x = eta_inputs()
  proj = cma_projectors(x, seed=3)
  student, teacher = sides(x)
  total, count, parts = ct.dskd_eta_loss(proj, student, teacher, x["eta_pos"], x["eta_mask"],
                                         divergence=div, temperature=TAU)
  t2s_ce, t2s_kd, s2t_kd, pairs = np_eta(x, np_params(proj), div, TAU)
  assert float(count) == pairs > 0
  assert float(parts["t2s_kd"]) > 0
  assert_close(parts["t2s_ce"], t2s_ce)
  assert_close(parts["t2s_kd"], t2s_kd)
  assert_close(parts["s2t_kd"], s2t_kd)
  assert_close(total, t2s_ce + t2s_kd + s2t_kd)


# ------------------------------------------------------------------------------------------
# MultiLevelOT
# ------------------------------------------------------------------------------------------

def np_std_normalise(x):
  return x / (np.std(x, axis=-1, ddof=1, keepdims=True) + 1e-4)


def np_top_mass(p, mask, k):
  mass = np.sum(p * mask[..., None], axis=(0, 1))
  cols = np.argsort(-mass, kind="stable")[:k]
  out = p[..., cols]
  return np.pad(out, [(0, 0), (0, 0), (0, k - out.shape[-1])])


def np_sinkhorn_plan(c, a, b, eps, iters):
  """Scaling-form Sinkhorn on the valid block: u = a / Kv, v = b / Kᵀu, P = diag(u) K diag(v)."""
  k = np.exp(-c / eps)
  v = np.ones(len(b))
  for _ in range(iters):
    u = a / (k @ v)
    v = b / (k.T @ u)
  return u[:, None] * k * v[None, :]


def np_multilevel(x, tau, top_k, ce_weight, seq_weight, eps, iters):
  ms, mt = x["ms"], x["mt"]
  s = np_top_mass(np_softmax(np_std_normalise(x["s_logits"].astype(np.float64)) / tau), ms, top_k)
  t = np_top_mass(np_softmax(np_std_normalise(x["t_logits"].astype(np.float64)) / tau), mt, top_k)
  l1 = ce = seq = 0.0
  for b in range(B):
    s_idx, t_idx = np.nonzero(ms[b])[0], np.nonzero(mt[b])[0]
    n = min(len(s_idx), len(t_idx))
    for k in range(n):
      sv, tv = s[b, s_idx[k]], t[b, t_idx[k]]
      l1 += np.sum(np.abs(sv - tv))
      ce += -np.sum(np_softmax(tv) * np_log_softmax(sv))
    if n:
      c = np.abs(s[b, s_idx][:, None, :] - t[b, t_idx][None, :, :]).sum(-1)
      plan = np_sinkhorn_plan(c, np.full(len(s_idx), 1 / len(s_idx)),
                              np.full(len(t_idx), 1 / len(t_idx)), eps, iters)
      seq += n * np.sum(plan * c)
  return l1 + ce_weight * ce + seq_weight * seq, l1, ce, seq


@pytest.mark.parametrize("top_k,seq_weight", [(50, 1e-4), (5, 1.0)])
def test_multilevel_ot_matches_numpy(top_k, seq_weight):
  x = rand_inputs(12)
  total, count, parts = ct.multilevel_ot_loss(
      x["s_logits"], x["t_logits"], x["ms"], x["mt"], temperature=TAU, top_k=top_k,
      seq_weight=seq_weight)
  want, l1, ce, seq = np_multilevel(x, TAU, top_k, 0.1, seq_weight, 0.1, 20)
  assert_close(parts["token_l1"], l1)
  assert_close(parts["token_ce"], ce)
  assert_close(parts["seq_ot"], seq)
  assert_close(total, want)
  assert float(count) == 5 + 3


# ------------------------------------------------------------------------------------------
# Empty masks, gradients, jit
# ------------------------------------------------------------------------------------------

def _all_losses(params, graphdef, s_logits, s_hidden, x, ms, mt):
  """Sum of every loss (each term once) as a function of the trainable inputs."""
  proj = nnx.merge(graphdef, params)
  student = ct.KDSide(s_logits, s_hidden, x["s_ids"], x["s_labels"], ms, x["s_embed"],
                      x["s_head"])
  teacher = ct.KDSide(x["t_logits"], x["t_hidden"], x["t_ids"], x["t_labels"], mt,
                      x["t_embed"], x["t_head"])
  total = ct.uld_loss(s_logits, x["t_logits"], ms, mt, temperature=TAU)[0]
  total += ct.mined_loss(s_logits, x["t_logits"], x["s_labels"], ms, x["t_labels"],
                         x["mined_pos"], x["mined_mask"] * ms, x["vocab_map"],
                         temperature=TAU)[0]
  total += ct.dskd_cma_loss(proj, student, teacher, divergence="srkl", temperature=TAU)[0]
  total += ct.dskd_eta_loss(proj, student, teacher, x["eta_pos"], x["eta_mask"] * ms,
                            divergence="akl", temperature=TAU)[0]
  total += ct.multilevel_ot_loss(s_logits, x["t_logits"], ms, mt, top_k=5,
                                 unrolled_grad=True)[0]
  return total


def test_gradients_finite_and_empty_masks_give_zero():
  """One jitted value_and_grad of all losses (padded −inf vocabulary rows on both sides), run
  with the real masks and with every mask empty."""
  x = eta_inputs(13)
  x.update({k: v for k, v in mined_inputs(13).items() if k in ("vocab_map", "mined_pos",
                                                               "mined_mask")})
  x["t_logits"][..., -2:] = -np.inf                     # padded teacher vocabulary rows
  x["s_logits"][..., -1:] = -np.inf                     # padded student vocabulary row
  x = {k: jnp.asarray(v) for k, v in x.items()}
  graphdef, params = nnx.split(cma_projectors(x, seed=4))
  fn = jax.jit(jax.value_and_grad(_all_losses, argnums=(0, 2, 3)), static_argnums=1)

  value, grads = fn(params, graphdef, x["s_logits"], x["s_hidden"], x, x["ms"], x["mt"])
  assert bool(jnp.isfinite(value)) and float(value) > 0
  assert all_finite(grads)
  assert float(jnp.max(jnp.abs(grads[0]["s2t"]["kernel"][...]))) > 0   # projectors learn
  assert float(jnp.max(jnp.abs(grads[0]["t2s"]["kernel"][...]))) > 0
  assert float(jnp.max(jnp.abs(grads[0]["query"]["kernel"][...]))) > 0
  assert float(jnp.max(jnp.abs(grads[1]))) > 0                          # student logits
  assert float(jnp.max(jnp.abs(grads[2]))) > 0                          # student states

  empty_s, empty_t = jnp.zeros_like(x["ms"]), jnp.zeros_like(x["mt"])
  value, grads = fn(params, graphdef, x["s_logits"], x["s_hidden"], x, empty_s, empty_t)
  assert float(value) == 0.0
  assert all_finite(grads)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree_util.tree_leaves(grads))


def test_projectors_shapes():
  proj = Projectors(DS, DT, rngs=nnx.Rngs(0))
  assert proj.query(jnp.ones((2, 2 * DS))).shape == (2, 2 * DT)
  assert proj.t2s(jnp.ones((2, DT))).shape == (2, DS)
  assert proj.s2t(jnp.ones((2, DS))).shape == (2, DT)
  only = Projectors(DS, DT, rngs=nnx.Rngs(0), names=("t2s", "s2t"))
  with pytest.raises(ValueError, match="query"):
    only.require("query")
