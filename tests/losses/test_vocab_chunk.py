"""Vocabulary-chunked losses (losses/vocab_chunk.py, kd.vocab_chunk) against the unchunked code.

Every chunked term is compared with the existing materialised path: values within 1e-5
relative, gradients within 1e-4 (relative to the largest entry of each gradient), with masks,
padded vocabularies (−inf rows, V not a multiple of the chunk), a softcap and temperatures;
then every method's loss on the tiny problem with kd.vocab_chunk on vs off, one step on a
(data, fsdp, tensor) mesh, and the config errors.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cot2align_jax.core.numerics import log_probs, masked_sum
from cot2align_jax.losses import cross_tokenizer as ct
from cot2align_jax.losses import divergences as dv
from cot2align_jax.losses import vocab_chunk as vc
from cot2align_jax.losses.methods import KDConfig, get_method, mined, multilevel_ot
from cot2align_jax.losses.methods.kd_topk import topk_kl, topk_kl_chunked
from cot2align_jax.losses.ot import OTConfig
from cot2align_jax.training import config as C
from cot2align_jax.training import mesh as mesh_lib
from cot2align_jax.training import state as state_lib
from cot2align_jax.training.steps import make_forward
from tests.support import tiny

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
B, T, D, V = 2, 5, 6, 13
CHUNK = 4                     # 13 ids -> 4 chunks of 4, three padded columns
TAU = 2.0

DIVS = [("fkl", {}), ("rkl", {}), ("js", {}), ("tvd", {}), ("skl", {"lam": 0.1}),
        ("srkl", {"lam": 0.1}), ("akl", {"mu": 0.5}),
        ("gjsd", {"beta": 0.3, "normalize": True})]


def _arrays(seed=0, v=V):
  rng = np.random.default_rng(seed)
  hs = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  ht = jnp.asarray(rng.normal(size=(B, T, D)) * 2, jnp.float32)
  ws = jnp.asarray(rng.normal(size=(D, v)), jnp.float32)
  wt = jnp.asarray(rng.normal(size=(D, v)), jnp.float32)
  mask = jnp.asarray([[0, 1, 1, 1, 0], [0, 0, 0, 0, 0]], jnp.int32)   # row 1 empty
  return hs, ht, ws, wt, mask


def _student(h, w):
  return vc.Logits(h, w, softcap=3.0, valid=V - 2)       # two −inf rows, softcapped


def _teacher(h, w):
  return vc.Logits(h, w, valid=V - 1)                    # one −inf row


def _close_grads(got, want, tol=1e-4):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g), np.asarray(w)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol * max(np.max(np.abs(w)), 1e-6))


def test_layout_strided_ids_and_padding():
  lay = vc.layout(13, 4)
  assert (lay.n_chunks, lay.width) == (4, 4)
  ids = np.stack([np.asarray(lay.ids(j)) for j in range(lay.n_chunks)])
  assert sorted(ids.ravel().tolist()) == list(range(16))          # every id once, 3 padded
  np.testing.assert_array_equal(np.asarray(lay.to_vocab(jnp.asarray(ids))), np.arange(13))
  assert vc.layout(416, 16) == vc.Layout(416, 26, 16)            # a divisor: no padding
  with pytest.raises(ValueError, match="chunk"):
    vc.layout(13, 0)


def test_logits_full_matches_transformer_logits():
  """Logits.full() is models.Transformer.logits (softcap, then −inf past valid)."""
  hs, _, ws, _, _ = _arrays()
  z = jnp.einsum("btd,dv->btv", hs, ws)
  want = jnp.where(jnp.arange(V) < V - 2, jnp.tanh(z / 3.0) * 3.0, -jnp.inf)
  np.testing.assert_allclose(np.asarray(_student(hs, ws).full()), np.asarray(want), rtol=1e-6)


@pytest.mark.parametrize("name,params", DIVS, ids=[d[0] for d in DIVS])
def test_divergence_chunked_matches_unchunked(name, params):
  hs, ht, ws, wt, mask = _arrays(1)

  def ref(h, w, h_t, w_t):
    per = dv.token_divergence(name, _student(h, w).full(), _teacher(h_t, w_t).full(),
                              temperature=TAU, **params)
    return masked_sum(per, mask)[0], per

  def got(h, w, h_t, w_t):
    per = vc.divergence(name, _student(h, w), _teacher(h_t, w_t), temperature=TAU,
                        chunk=CHUNK, **params)
    return masked_sum(per, mask)[0], per

  (v_ref, per_ref), g_ref = jax.jit(jax.value_and_grad(ref, (0, 1, 2, 3), has_aux=True))(
      hs, ws, ht, wt)
  (v_got, per_got), g_got = jax.jit(jax.value_and_grad(got, (0, 1, 2, 3), has_aux=True))(
      hs, ws, ht, wt)
  np.testing.assert_allclose(np.asarray(per_got), np.asarray(per_ref), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(v_got), float(v_ref), rtol=1e-5)
  _close_grads(g_got, g_ref)
  assert not np.any(np.asarray(g_got[2])) and not np.any(np.asarray(g_got[3]))   # teacher sg


def test_akl_ties_and_small_mu():
  """AKL's head/tail split with exactly tied teacher probabilities (duplicated head columns)
  and a μ that cuts inside the tie group; chunked equals the sorted reference."""
  hs, ht, ws, wt, _ = _arrays(2)
  wt = wt.at[:, 3].set(wt[:, 7]).at[:, 9].set(wt[:, 7]).at[:, 11].set(wt[:, 7])
  def both(mu):
    want = dv.token_divergence("akl", _student(hs, ws).full(), _teacher(ht, wt).full(),
                               temperature=1.0, mu=mu)
    got = vc.divergence("akl", _student(hs, ws), _teacher(ht, wt), temperature=1.0,
                        chunk=CHUNK, mu=mu)
    w_want, _ = dv.akl_weights(log_probs(_student(hs, ws).full()),
                               log_probs(_teacher(ht, wt).full()), mu=mu)
    return got, want, w_want

  for mu in (0.2, 0.9):
    got, want, w_want = jax.jit(both, static_argnums=0)(mu)
    assert 0.0 < float(jnp.min(w_want)) and float(jnp.max(w_want)) < 1.0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)


def test_cross_entropy_and_argmax_and_empty_mask():
  hs, _, ws, _, mask = _arrays(3)
  labels = jnp.asarray(np.random.default_rng(3).integers(0, V - 2, size=(B, T)), jnp.int32)
  full = _student(hs, ws).full()
  ce, arg = vc.cross_entropy(_student(hs, ws), labels, CHUNK, with_argmax=True)
  np.testing.assert_allclose(np.asarray(ce), np.asarray(ct.cross_entropy(full, labels)),
                             rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(arg), np.asarray(jnp.argmax(full, -1)))
  # ties: argmax takes the first maximal id, as jnp.argmax
  w_tie = ws.at[:, 10].set(ws[:, 2])
  _, arg = vc.cross_entropy(vc.Logits(hs, w_tie), labels, CHUNK, with_argmax=True)
  np.testing.assert_array_equal(np.asarray(arg),
                                np.asarray(jnp.argmax(vc.Logits(hs, w_tie).full(), -1)))

  def loss(h, w, m):
    return masked_sum(vc.cross_entropy(_student(h, w), labels, CHUNK), m)[0]

  g_ref = jax.grad(lambda h, w: masked_sum(ct.cross_entropy(_student(h, w).full(), labels),
                                           mask)[0], (0, 1))(hs, ws)
  _close_grads(jax.grad(loss, (0, 1))(hs, ws, mask), g_ref)
  empty = jnp.zeros_like(mask)
  assert float(loss(hs, ws, empty)) == 0.0
  g = jax.grad(loss, (0, 1))(hs, ws, empty)
  assert all(np.all(np.asarray(x) == 0) for x in g)
  g = jax.grad(lambda h, w: masked_sum(vc.divergence("fkl", _student(h, w), _teacher(h, w),
                                                     temperature=TAU, chunk=CHUNK), empty)[0],
               (0, 1))(hs, ws)
  assert all(np.all(np.asarray(x) == 0) for x in g)


def test_kd_topk_chunked_matches():
  hs, ht, ws, wt, mask = _arrays(4)
  for k in (3, 12):      # 12: more than the teacher's 12 finite rows minus ties at −inf
    def ref(h, w):
      return masked_sum(topk_kl(_student(h, w).full(), _teacher(ht, wt).full(), k=k,
                                temperature=TAU), mask)[0]

    def got(h, w):
      return masked_sum(topk_kl_chunked(_student(h, w), _teacher(ht, wt), k=k, chunk=CHUNK,
                                        temperature=TAU), mask)[0]

    v_got, g_got = jax.jit(jax.value_and_grad(got, (0, 1)))(hs, ws)
    v_ref, g_ref = jax.jit(jax.value_and_grad(ref, (0, 1)))(hs, ws)
    np.testing.assert_allclose(float(v_got), float(v_ref), rtol=1e-5)
    _close_grads(g_got, g_ref)


def test_multilevel_ot_top_mass_chunked_matches():
  hs, _, ws, _, mask = _arrays(5)
  mask = mask.at[1, 2].set(1)
  params = multilevel_ot.Params(top_k=5)

  def ref(h, w):
    p = jnp.exp(log_probs(multilevel_ot.std_normalise(_student(h, w).full()), TAU))
    return multilevel_ot.top_mass_vocab(p, mask, params.top_k)

  def got(h, w):
    return multilevel_ot.top_mass_chunked(_student(h, w), mask, params.top_k, temperature=TAU,
                                          chunk=CHUNK)

  np.testing.assert_allclose(np.asarray(jax.jit(got)(hs, ws)), np.asarray(jax.jit(ref)(hs, ws)),
                             rtol=1e-5, atol=1e-7)
  weights = jnp.asarray(np.random.default_rng(5).normal(size=(B, T, params.top_k)), jnp.float32)
  _close_grads(jax.jit(jax.grad(lambda h, w: jnp.sum(got(h, w) * weights), (0, 1)))(hs, ws),
               jax.jit(jax.grad(lambda h, w: jnp.sum(ref(h, w) * weights), (0, 1)))(hs, ws))


def test_mined_chunked_matches():
  """MinED's segment-max target, chunked over the student vocabulary (host table)."""
  rng = np.random.default_rng(6)
  vt = 17
  hs, _, ws, _, mask = _arrays(6)
  ht = jnp.asarray(rng.normal(size=(B, 7, D)), jnp.float32)
  wt = jnp.asarray(rng.normal(size=(D, vt)), jnp.float32)
  vocab_map = rng.integers(0, V - 4, size=vt).astype(np.int32)
  vocab_map[[1, 5]] = -1
  s_labels = jnp.asarray(rng.integers(0, V - 4, size=(B, T)), jnp.int32)
  t_labels = jnp.asarray(rng.integers(0, vt, size=(B, 7)), jnp.int32)
  pos = jnp.asarray(rng.integers(0, 7, size=(B, T)), jnp.int32)
  # every aligned teacher label maps to the student label (student labels are mapped ids)
  inv = {int(s): int(t) for t, s in enumerate(vocab_map) if s >= 0}
  s_labels = jnp.where(jnp.asarray(np.vectorize(lambda s: s in inv)(np.asarray(s_labels))),
                       s_labels, int(vocab_map[0]))
  t_np = np.asarray(t_labels).copy()
  for b in range(B):
    for i in range(T):
      t_np[b, int(pos[b, i])] = inv[int(s_labels[b, i])]
  t_labels = jnp.asarray(t_np)
  mined_mask = jnp.asarray([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]], jnp.int32)
  t_mask = jnp.ones((B, 7), jnp.int32)
  teacher_spec = vc.HeadSpec(None, vt - 1)

  def sides(h, w):
    s = ct.KDSide(_student(h, w).full(), h, None, s_labels, mask, None, w,
                  vc.HeadSpec(3.0, V - 2))
    t = ct.KDSide(vc.Logits(ht, wt, valid=vt - 1).full(), ht, None, t_labels, t_mask, None, wt,
                  teacher_spec)
    return s, t

  def ref(h, w):
    s, t = sides(h, w)
    return mined.mined_loss(s.logits, t.logits, s.labels, s.mask, t.labels, pos, mined_mask,
                            jnp.asarray(vocab_map), temperature=TAU)[0]

  def got(h, w):
    s, t = sides(h, w)
    return mined.mined_loss_chunked(s, t, pos, mined_mask, vocab_map, chunk=CHUNK,
                                    temperature=TAU)[0]

  _, aligned = mined.mined_targets(vc.Logits(ht, wt, valid=vt - 1).full(), s_labels, mask,
                                   t_labels, pos, mined_mask, jnp.asarray(vocab_map), V)
  assert 0 < int(jnp.sum(aligned)) < int(jnp.sum(mask))     # both kinds of target occur
  v_got, g_got = jax.jit(jax.value_and_grad(got, (0, 1)))(hs, ws)
  v_ref, g_ref = jax.jit(jax.value_and_grad(ref, (0, 1)))(hs, ws)
  np.testing.assert_allclose(float(v_got), float(v_ref), rtol=1e-5)
  _close_grads(g_got, g_ref)


# ------------------------------------------------------------------------------------------
# Every method's objective on the tiny problem, vocab_chunk on vs off
# ------------------------------------------------------------------------------------------

# Marked slow (to keep the file's default run short): the composing methods, which add the OT
# block (independent of chunking) to their base's KD term, and the methods whose chunked term
# has its own value-and-gradient test above (kd, kd_topk, multilevel_ot).
METHODS = ["sft", pytest.param("kd", marks=pytest.mark.slow),
           pytest.param("kd_topk", marks=pytest.mark.slow), "mined", "dskd", "dskd_cma",
           "dskd_eta", pytest.param("multilevel_ot", marks=pytest.mark.slow),
           pytest.param("cot2align:dskd_cma", marks=pytest.mark.slow),
           pytest.param("cot2align_plus:dskd_eta", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def prob():
  return tiny.tiny_problem(8, student_d=16, teacher_d=24, layers=1, bucket=32)


def _setup(prob, name, chunk, **kd_kw):
  method, _, base = name.partition(":")
  kd = KDConfig(method=method, base=base or "dskd_cma", ot=OTConfig(num_iters=2),
                vocab_chunk=chunk, **kd_kw)
  same = get_method(method, base or None).same_vocab
  # same-vocabulary methods: a second student-shaped model stands in for the teacher
  teacher = prob.student(7) if same else None
  return kd, tiny.make_setup(prob, kd, state_lib.OptimConfig(), teacher=teacher)


def _loss_and_grads(prob, name, chunks, batch, vocab_map, **kd_kw):
  """(loss, metrics, grads) for each vocab_chunk in `chunks`, all in one compiled function."""
  fns = []
  su = None
  for chunk in chunks:
    kd, su = _setup(prob, name, chunk, **kd_kw)
    fns.append(make_forward(su.student_graphdef, su.teacher_graphdef, su.proj_graphdef,
                            su.method, kd, vocab_map=vocab_map))

  def both(trainable, tparams, b):
    return [jax.value_and_grad(f, has_aux=True)(trainable, tparams, b) for f in fns]

  out = jax.jit(both, compiler_options=FAST)(su.state.trainable, su.teacher_params, batch)
  return [(loss, metrics, grads) for (loss, metrics), grads in out]


@pytest.mark.parametrize("name", METHODS)
def test_method_objective_chunked_matches(prob, name):
  batch = prob.batches(batch_size=2, n=1, alignment=("eta", "mined"))[0]
  vs, vt = prob.student_cfg.vocab_size, prob.teacher_cfg.vocab_size
  vocab_map = np.random.default_rng(0).integers(-1, vs, size=vt).astype(np.int32)
  (l0, m0, g0), (l1, m1, g1) = _loss_and_grads(prob, name, (0, 48), batch, vocab_map,
                                               divergence="srkl",
                                               divergence_params=(("lam", 0.1),))
  assert vs % 48 and vt % 48                                # padded chunk layouts
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
  assert set(m1) == set(m0)
  for k in m0:
    # atol: the randomly initialised models are near-uniform, so KL sums over ~17 tokens are
    # ~1e-3, differences of log-probabilities of size ~6 whose float32 rounding (~4e-7 each)
    # is the same in both paths' references
    np.testing.assert_allclose(np.asarray(m1[k]), np.asarray(m0[k]), rtol=1e-5, atol=1e-5,
                               err_msg=k)
  if name != "sft":
    assert float(m0["kd"][0]) != 0.0
  _close_grads(g1, g0)


def _shapes(jaxpr):
  """Every output shape of every equation of a closed jaxpr, sub-jaxprs included."""
  out = []
  for eqn in jaxpr.eqns:
    out += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          out += _shapes(inner if hasattr(inner, "eqns") else inner.jaxpr)
  return out


def test_chunked_step_never_holds_full_logits(prob):
  """With kd.vocab_chunk the forward and backward of dskd_cma hold no [B, L, V] array."""
  batch = prob.batches(batch_size=2, n=1)[0]
  vs, vt = prob.student_cfg.vocab_size, prob.teacher_cfg.vocab_size
  for chunk, expect in ((0, True), (48, False)):
    kd, su = _setup(prob, "dskd_cma", chunk)
    f = make_forward(su.student_graphdef, su.teacher_graphdef, su.proj_graphdef, su.method, kd)
    jpr = jax.make_jaxpr(jax.value_and_grad(f, has_aux=True))(su.state.trainable,
                                                              su.teacher_params, batch)
    full = [s for s in _shapes(jpr.jaxpr) if len(s) >= 2 and s[-1] in (vs, vt) and
            int(np.prod(s[:-1])) >= 2 * prob.bucket]
    assert bool(full) == expect, full


def test_chunked_step_on_data_fsdp_tensor_mesh(prob):
  """dskd_cma with vocab_chunk on a (data 2, fsdp 2, tensor 2) mesh, the vocabulary axes of the
  embeddings and heads split over tensor, vs the unchunked loss on one device."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  batch = prob.batches(batch_size=4, n=1)[0]
  ((l0, m0, g0),) = _loss_and_grads(prob, "dskd_cma", (0,), batch, None)
  kd, su = _setup(prob, "dskd_cma", 48)
  mesh = mesh_lib.make_mesh(2, 2, 2)
  trainable = jax.device_put(su.state.trainable,
                             mesh_lib.state_shardings(su.state.trainable, mesh))
  tparams = jax.device_put(su.teacher_params, mesh_lib.state_shardings(su.teacher_params, mesh))
  assert "tensor" in str(tparams["lm_head"].sharding.spec)
  assert "tensor" in str(trainable["student"]["embed"].sharding.spec)
  f = make_forward(su.student_graphdef, su.teacher_graphdef, su.proj_graphdef, su.method, kd)
  (l1, m1), g1 = jax.jit(jax.value_and_grad(f, has_aux=True), compiler_options=FAST)(
      trainable, tparams, mesh_lib.shard_batch(batch, mesh))
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
  for k in m0:
    np.testing.assert_allclose(np.asarray(m1[k]), np.asarray(m0[k]), rtol=1e-5, atol=1e-6,
                               err_msg=k)
  _close_grads(jax.tree.map(np.asarray, g1), g0)


# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------


def _cfg(**kd) -> ml_collections.ConfigDict:
  cfg = C.defaults()
  for k, v in kd.items():
    cfg.kd[k] = v
  return cfg


def test_config_key_and_errors():
  assert C.defaults().kd.vocab_chunk == 0
  assert C.kd_config(_cfg(method="dskd_cma", vocab_chunk=4096)).vocab_chunk == 4096
  with pytest.raises(C.ConfigError, match="vocab_chunk must be >= 0") as e:
    C.kd_config(_cfg(vocab_chunk=-1))
  assert "\n" not in str(e.value)
  for method, base in (("uld", "dskd_cma"), ("cot2align", "uld")):
    with pytest.raises(C.ConfigError, match="not supported by") as e:
      C.kd_config(_cfg(method=method, base=base, vocab_chunk=64))
    assert "\n" not in str(e.value)
  C.kd_config(_cfg(method="uld", vocab_chunk=0))
  assert dataclasses.replace(KDConfig(), vocab_chunk=8).vocab_chunk == 8
