"""kd_topk against a float64 numpy computation of docs/adding_a_method.md §1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cot2align_jax.losses import divergences as dv
from cot2align_jax.losses.methods import get_method
from cot2align_jax.losses.methods import kd_topk as m

B, T, V, TAU = 2, 5, 11, 2.0


def _logits(seed):
  rng = np.random.default_rng(seed)
  return (2.0 * rng.normal(size=(B, T, V))).astype(np.float32)


def _mask():
  mask = np.ones((B, T), np.int32)
  mask[1, 3:] = 0
  return mask


def np_log_softmax(x):
  x = np.asarray(x, np.float64) / TAU
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


def np_topk_kl(s, t, k):
  p, q = np.exp(np_log_softmax(t)), np.exp(np_log_softmax(s))
  top = np.argsort(-p, kind="stable")[:k]
  rest = np.setdiff1d(np.arange(len(p)), top)
  p_hat = np.append(p[top], p[rest].sum())
  q_hat = np.append(q[top], q[rest].sum())
  keep = p_hat > 0
  return float(np.sum(p_hat[keep] * np.log(p_hat[keep] / q_hat[keep])))


@pytest.mark.parametrize("k", [1, 4, 10])
def test_matches_numpy(k):
  s, t, mask = _logits(0), _logits(1), _mask()
  want = sum(np_topk_kl(s[b, i], t[b, i], k) for b in range(B) for i in range(T) if mask[b, i])
  got, count = m.kd_topk_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), k=k,
                              temperature=TAU)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert float(count) == mask.sum()


def test_is_forward_kl_when_k_covers_the_vocabulary_and_below_it_otherwise():
  s, t, mask = jnp.asarray(_logits(2)), jnp.asarray(_logits(3)), jnp.asarray(_mask())
  fkl, _ = dv.kd_loss("fkl", s, t, mask, temperature=TAU)
  full, _ = m.kd_topk_loss(s, t, mask, k=V, temperature=TAU)
  part, _ = m.kd_topk_loss(s, t, mask, k=3, temperature=TAU)
  np.testing.assert_allclose(float(full), float(fkl), rtol=1e-6)
  assert 0.0 < float(part) < float(fkl)


def test_zero_when_student_equals_teacher():
  t = jnp.asarray(_logits(4))
  got, _ = m.kd_topk_loss(t, t, jnp.asarray(_mask()), k=4, temperature=TAU)
  assert abs(float(got)) < 1e-6


def test_padded_vocabulary_row_changes_nothing():
  s, t, mask = _logits(5), _logits(6), jnp.asarray(_mask())
  want, _ = m.kd_topk_loss(jnp.asarray(s[..., :-1]), jnp.asarray(t[..., :-1]), mask, k=4,
                           temperature=TAU)
  s[..., -1] = t[..., -1] = -np.inf
  got, _ = m.kd_topk_loss(jnp.asarray(s), jnp.asarray(t), mask, k=4, temperature=TAU)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


@pytest.mark.parametrize("k", [4, V])
def test_empty_mask_gives_zero_and_finite_gradients(k):
  s, t = jnp.asarray(_logits(7)), jnp.asarray(_logits(8))
  empty = jnp.zeros((B, T), jnp.int32)
  value, grad = jax.value_and_grad(
      lambda x: m.kd_topk_loss(x, t, empty, k=k, temperature=TAU)[0])(s)
  assert float(value) == 0.0
  assert np.all(np.isfinite(np.asarray(grad))) and float(jnp.abs(grad).max()) == 0.0


def test_registered_with_its_needs():
  method = get_method("kd_topk")
  assert method.kd is m.term and method.same_vocab and method.params is m.Params
  assert not method.projectors and not method.alignment and not method.ot
