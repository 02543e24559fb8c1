"""Losses against naive reference implementations written here."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxreplay.models import losses


def _naive_nll(logits, tokens):
  B, T, V = logits.shape
  out = np.zeros((B, T - 1))
  for b in range(B):
    for t in range(T - 1):
      z = logits[b, t].astype(np.float64)
      out[b, t] = np.log(np.exp(z - z.max()).sum()) + z.max() - z[tokens[b, t + 1]]
  return out


def test_next_token_loss_matches_naive():
  logits = np.asarray(jax.random.normal(jax.random.key(0), (3, 7, 11)) * 3)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (3, 7), 0, 11))
  np.testing.assert_allclose(losses.token_nll(logits, tokens), _naive_nll(logits, tokens), rtol=1e-5)
  assert float(losses.next_token_loss(logits, tokens)) == np.float32(_naive_nll(logits, tokens).mean())
  mask = np.ones((3, 7))
  mask[:, :4] = 0  # only targets at positions 4..6 count
  np.testing.assert_allclose(losses.next_token_loss(logits, tokens, mask), _naive_nll(logits, tokens)[:, 3:].mean(),
                             rtol=1e-5)


def test_kl_matches_naive_and_is_zero_at_equal_models():
  t = np.asarray(jax.random.normal(jax.random.key(2), (2, 5, 9)))
  s = np.asarray(jax.random.normal(jax.random.key(3), (2, 5, 9)))
  p = np.exp(t) / np.exp(t).sum(-1, keepdims=True)
  q = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
  naive = (p * (np.log(p) - np.log(q))).sum(-1)[:, :-1]
  np.testing.assert_allclose(losses.kl_per_position(t, s), naive, rtol=1e-5, atol=1e-6)
  assert float(losses.kl_loss(t, t)) == 0.0
  assert float(losses.kl_loss(t, s)) > 0


def test_second_half_and_replace_rows():
  v = jnp.arange(8.0)[None].repeat(2, 0)
  assert float(losses.second_half_mean(v)) == 5.5
  batch = jnp.zeros((8, 4), jnp.int32)
  replay = jnp.ones((8, 4), jnp.int32)
  out = losses.replace_rows(batch, replay, 0.3)
  assert out.shape == batch.shape
  assert int(out.sum()) == 2 * 4  # floor(0.3 · 8) = 2 rows replaced


def test_kl_gradient_is_student_softmax_minus_teacher_probabilities():
  """kl_loss's hand-written gradient against (q − p) / positions worked out in numpy: none to the teacher,
  none from the last position (it predicts nothing), scaled by the caller's coefficient."""
  t = np.asarray(jax.random.normal(jax.random.key(4), (2, 5, 9)) * 2, np.float64)
  s = np.asarray(jax.random.normal(jax.random.key(5), (2, 5, 9)) * 2, np.float64)
  p = np.exp(t) / np.exp(t).sum(-1, keepdims=True)
  q = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
  want = 0.25 * (q - p) / (2 * 4)
  want[:, -1] = 0.0
  g_t, g_s = jax.jit(jax.grad(lambda a, b: 0.25 * losses.kl_loss(a, b), argnums=(0, 1)))(
      t.astype(np.float32), s.astype(np.float32))
  np.testing.assert_allclose(g_s, want, atol=1e-7)
  assert not np.asarray(g_t).any()
  np.testing.assert_allclose(losses.kl_loss(t.astype(np.float32), s.astype(np.float32)),
                             (p * (np.log(p) - np.log(q))).sum(-1)[:, :-1].mean(), rtol=1e-5)
