"""Contrastive losses and the IB KL against per-sample loops that follow the spec literally."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_jax.concepts import losses, transport
from tests.test_concepts_transport import np_sinkhorn, unit

T = 0.07


def np_kl_row(row, num_pos):
  """KL(target || softmax(row)), target 1/num_pos on the first num_pos entries."""
  row = np.asarray(row, np.float64)
  log_q = row - (row.max() + np.log(np.exp(row - row.max()).sum()))
  target = 1.0 / num_pos
  return float(np.sum(target * (np.log(target) - log_q[:num_pos])))


def np_image_loss(z_q, z_k, queue_z, labels, temperature=T):
  num_classes, k, _ = queue_z.shape
  total = 0.0
  for i, c in enumerate(labels):
    row = [z_q[i] @ z_k[i]] + [z_q[i] @ queue_z[c, j] for j in range(k)]
    row += [z_q[i] @ queue_z[o, j] for o in range(num_classes) if o != c for j in range(k)]
    total += np_kl_row(np.array(row) / temperature, k + 1)
  return total / len(labels)


def concept_selections(zq_p, zk_p, queue_h, labels, confusing, draws, top_pos, top_neg, eps,
                       gaps=None):
  """Per sample: lists of (Y set (n, d), flat index) for its positives and its negatives.

  One numpy Sinkhorn call per official group: the B current pairs; sample i's K positives;
  sample i's confusing*K negatives. draws: which of the top_pos entries each positive uses
  (current pairs first, then (i, k) row-major), the same draws as the JAX code.
  gaps: a list that receives the log-plan gaps each selection rests on (between consecutive
  entries of a positive's top_pos + 1, between a negative set's 10th and 11th entry).
  """
  b, n, _ = zq_p.shape
  k = queue_h.shape[1]

  def order(plan, ranked=True):
    idx = np.argsort(-plan.ravel(), kind='stable')
    if gaps is not None:
      count = top_pos if ranked else top_neg
      logs = np.log(plan.ravel()[idx[:count + 1]])
      gaps.extend(-np.diff(logs) if ranked else [logs[count - 1] - logs[count]])
    return idx

  cost = lambda x, ys: np.stack([1 - x @ y.T for y in ys])
  pair_plans, _ = np_sinkhorn(np.stack([1 - zq_p[i] @ zk_p[i].T for i in range(b)]), eps)
  out = []
  for i, c in enumerate(labels):
    pos = [(zk_p[i], order(pair_plans[i])[:top_pos][draws[i]])]
    plans, _ = np_sinkhorn(cost(zq_p[i], queue_h[c]), eps)
    pos += [(queue_h[c, j], order(plans[j])[:top_pos][draws[b + i * k + j]]) for j in range(k)]
    neg_sets = [queue_h[o, j] for o in confusing[i] for j in range(k)]
    plans, _ = np_sinkhorn(cost(zq_p[i], neg_sets), eps)
    neg = [(y, idx) for y, plan in zip(neg_sets, plans) for idx in order(plan, False)[:top_neg]]
    out.append((pos, neg))
  return out


def loss_from_selections(zq_p, selections, temperature=T, xp=np):
  """The spec's row and KL, as a function of zq_p (numpy, or jnp for gradients)."""
  total = 0.0
  n = zq_p.shape[1]
  for i, (pos, neg) in enumerate(selections):
    idx = np.array([idx for _, idx in pos + neg])
    cols = np.stack([y[j % n] for (y, _), j in zip(pos + neg, idx)])     # (E, d)
    row = xp.sum(zq_p[i, idx // n] * cols, axis=-1) / temperature       # 1 - M at (row, col)
    log_norm = jax.nn.logsumexp(row) if xp is jnp else np.log(np.exp(row).sum())
    p = len(pos)
    total = total + xp.sum((1.0 / p) * (np.log(1.0 / p) - (row[:p] - log_norm)))
  return total / len(selections)


def _concept_inputs(seed, b=4, num_classes=5, k=3, n_conf=2, d=6, n=9):
  rng = np.random.default_rng(seed)
  zq_p, zk_p = unit(rng, (b, n, d)), unit(rng, (b, n, d))
  queue_h = unit(rng, (num_classes, k, n, d))
  labels = rng.integers(0, num_classes, b)
  logits = rng.standard_normal((b, num_classes))
  logits[np.arange(b), labels] = -np.inf
  confusing = np.argsort(-logits, axis=1, kind='stable')[:, :n_conf].astype(np.int32)
  return zq_p, zk_p, queue_h, labels, confusing


def _separated_inputs(seed, b=4, num_classes=5, k=3, n_conf=2, n=9, eps=0.01, min_gap=1e-3):
  """Like _concept_inputs, but no selection of the loss is a near-tie at eps = 0.01.

  At eps = 0.01 the plan of two random sets is close to a permutation / 9: its 9 largest entries
  tie to float32 rounding. Here each query set is a permutation of basis vectors, so the similarity
  of query patch r to key patch j is G[perm(r), j] for a matrix G the key set is built from: 0.3 on
  the diagonal, 0.3 - gap off it, gaps drawn from 0.5 to 5 eps. Mass then leaks unevenly from the
  matched pairs, and the plan's entries differ by far more than rounding: G is redrawn until its
  converged plan's top 4 and its 10th / 11th entries are 5% apart, and the whole draw is repeated
  until every selection of the float64 reference (at its own stopping iteration) rests on a
  log-plan gap > min_gap. One random rotation of every vector keeps the coordinates generic.
  """
  rng = np.random.default_rng(seed)
  d = n + 1

  def key_set():
    while True:   # about 2 draws in 3 pass
      g = 0.3 - rng.uniform(0.005, 0.05, (n, n)) * (1 - np.eye(n))
      plan, _ = np_sinkhorn((1 - g)[None], thresh=1e-9, max_iter=5000)
      logs = np.sort(np.log(plan.ravel()))[::-1]
      if min(-np.diff(logs[:4]).min(), logs[9] - logs[10]) > 0.05:
        return np.concatenate([g, np.sqrt(1 - (g ** 2).sum(0))[None]]).T   # rows y_j, unit norm

  _, _, _, labels, confusing = _concept_inputs(seed, b, num_classes, k, n_conf)
  for _ in range(20):   # about 3 draws in 4 pass
    rotation = np.linalg.qr(rng.standard_normal((d, d)))[0]
    zq_p = np.stack([np.eye(n, d)[rng.permutation(n)] for _ in range(b)]) @ rotation
    zk_p = np.stack([key_set() for _ in range(b)]) @ rotation
    queue_h = np.stack([[key_set() for _ in range(k)] for _ in range(num_classes)]) @ rotation
    inputs = tuple(x.astype(np.float32) for x in (zq_p, zk_p, queue_h)) + (labels, confusing)
    gaps = []
    concept_selections(*inputs, np.zeros(b + b * k, int), 3, 10, eps, gaps)
    if min(gaps) > min_gap:
      return inputs
  raise AssertionError('no well-separated draw in 20 tries')


def test_image_loss_matches_loop():
  rng = np.random.default_rng(0)
  z_q, z_k = unit(rng, (6, 5)), unit(rng, (6, 5))
  queue_z = unit(rng, (5, 3, 5))
  labels = np.array([0, 2, 2, 4, 1, 0])
  got = jax.jit(losses.image_contrastive_loss)(z_q, z_k, queue_z, labels)
  np.testing.assert_allclose(got, np_image_loss(z_q, z_k, queue_z, labels), rtol=1e-5)
  g_k, g_queue = jax.grad(losses.image_contrastive_loss, argnums=(1, 2))(z_q, z_k, queue_z, labels)
  np.testing.assert_array_equal(g_k, 0.0)
  np.testing.assert_array_equal(g_queue, 0.0)


@pytest.mark.parametrize('eps,top_pos,n_conf,seed', [(0.1, 3, 2, 1), (0.05, 3, 4, 2),
                                                      (0.1, 1, 2, 3)])
def test_concept_loss_matches_loop(eps, top_pos, n_conf, seed):
  # eps >= 0.05 keeps the plans' top entries well apart, so float32 (JAX) and float64 (numpy)
  # select the same entries; at eps = 0.01 the 9 largest entries are nearly tied (see transport).
  zq_p, zk_p, queue_h, labels, confusing = _concept_inputs(seed, n_conf=n_conf)
  key = jax.random.PRNGKey(seed)
  b, k = zq_p.shape[0], queue_h.shape[1]
  fn = jax.jit(lambda *a: losses.concept_contrastive_loss(*a, top_pos=top_pos, eps=eps,
                                                          with_aux=True))
  got, aux = fn(zq_p, zk_p, queue_h, labels, confusing, key)
  draws = np.asarray(transport.positive_choice(key, b + b * k, top_pos))
  sel = concept_selections(zq_p, zk_p, queue_h, labels, confusing, draws, top_pos, 10, eps)
  assert len(sel[0][1]) == 10 * n_conf * k
  np.testing.assert_allclose(got, loss_from_selections(zq_p, sel), rtol=1e-4)
  assert 1 <= aux['sinkhorn_iters_max'] <= 200


def test_concept_loss_matches_loop_at_the_recipes_eps():
  # eps = 0.01 (every recipe) on inputs whose selections rest on log-plan gaps of > 1e-3, far above
  # float32 rounding, so the float64 reference and JAX must pick the same entries.
  zq_p, zk_p, queue_h, labels, confusing = _separated_inputs(7)
  key = jax.random.PRNGKey(7)
  b, k = zq_p.shape[0], queue_h.shape[1]
  loss = lambda z: losses.concept_contrastive_loss(z, zk_p, queue_h, labels, confusing, key, eps=0.01)
  got, grad = jax.jit(jax.value_and_grad(loss))(zq_p)
  draws = np.asarray(transport.positive_choice(key, b + b * k, 3))
  sel = concept_selections(zq_p, zk_p, queue_h, labels, confusing, draws, 3, 10, 0.01)
  np.testing.assert_allclose(got, loss_from_selections(zq_p, sel), rtol=1e-5)
  expected = jax.grad(lambda z: loss_from_selections(z, sel, xp=jnp))(jnp.asarray(zq_p))
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_concept_loss_gradient_only_through_selected_entries():
  zq_p, zk_p, queue_h, labels, confusing = _concept_inputs(4)
  key = jax.random.PRNGKey(4)
  b, k = zq_p.shape[0], queue_h.shape[1]
  loss = lambda *a: losses.concept_contrastive_loss(*a, eps=0.1)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(zq_p, zk_p, queue_h, labels, confusing, key)
  draws = np.asarray(transport.positive_choice(key, b + b * k, 3))
  sel = concept_selections(zq_p, zk_p, queue_h, labels, confusing, draws, 3, 10, 0.1)
  expected = jax.grad(lambda z: loss_from_selections(z, sel, xp=jnp))(jnp.asarray(zq_p))
  np.testing.assert_allclose(grads[0], expected, rtol=1e-4, atol=1e-6)
  assert np.abs(np.asarray(grads[0])).max() > 0
  np.testing.assert_array_equal(grads[1], 0.0)      # key side and queue: no gradient
  np.testing.assert_array_equal(grads[2], 0.0)


def test_concept_loss_default_eps_runs_and_is_finite():
  zq_p, zk_p, queue_h, labels, confusing = _concept_inputs(5, n_conf=4)
  loss, aux = losses.concept_contrastive_loss(zq_p, zk_p, queue_h, labels, confusing,
                                              jax.random.PRNGKey(0), with_aux=True)
  assert np.isfinite(loss) and loss > 0
  assert aux['sinkhorn_iters_mean'] <= aux['sinkhorn_iters_max'] <= 200


def test_ib_kl():
  rng = np.random.default_rng(6)
  mu = rng.standard_normal((4, 7)).astype(np.float32)
  std = np.log1p(np.exp(rng.standard_normal((4, 7)) - 1)).astype(np.float32)   # softplus > 0

  def kl_normal(m, s):   # KL(N(m, s^2) || N(0, 1)), per element
    return np.log(1 / s) + (s ** 2 + m ** 2) / 2 - 0.5

  np.testing.assert_allclose(losses.ib_kl(mu, std), kl_normal(mu, np.exp(std)).sum(1).mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(losses.ib_kl(mu, std, scale='std'),
                             kl_normal(mu, std).sum(1).mean(), rtol=1e-5)
  with pytest.raises(ValueError, match='scale'):
    losses.ib_kl(mu, std, scale='log')
