"""Grouped log-domain Sinkhorn and OT set similarities against a literal numpy solver."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_jax.concepts import transport


def np_logsumexp(x, axis):
  mx = np.max(x, axis=axis, keepdims=True)
  return np.squeeze(mx, axis) + np.log(np.sum(np.exp(x - mx), axis=axis))


def np_sinkhorn(cost, eps=0.01, thresh=1e-3, max_iter=200):
  """One official Sinkhorn call over a group of problems: cost (P, n, m) -> (plan, iterations)."""
  cost = np.asarray(cost, np.float64)
  p, n, m = cost.shape
  u, v = np.zeros((p, n)), np.zeros((p, m))
  mhat = lambda u, v: (-cost + u[:, :, None] + v[:, None, :]) / eps
  it = 0
  for it in range(1, max_iter + 1):
    u_prev = u
    u = eps * (np.log(1.0 / n) - np_logsumexp(mhat(u, v), -1)) + u
    v = eps * (np.log(1.0 / m) - np_logsumexp(mhat(u, v), -2)) + v
    err = np.abs(u - u_prev).sum(-1).mean()
    if err < thresh:
      break
  return np.exp(mhat(u, v)), it


def unit(rng, shape):
  x = rng.standard_normal(shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_marginals():
  rng = np.random.default_rng(0)
  cost = transport.cost_matrix(unit(rng, (6, 9, 8)), unit(rng, (6, 7, 8)))
  plan, iters = transport.sinkhorn(cost, thresh=1e-7, max_iter=5000)
  plan = np.asarray(plan, np.float64)
  assert iters[0] < 5000
  np.testing.assert_allclose(plan.sum(-2), 1 / 7, rtol=1e-4)   # v is updated last: exact
  np.testing.assert_allclose(plan.sum(-1), 1 / 9, rtol=1e-3)


def test_grouped_stop_matches_per_group_official_calls():
  rng = np.random.default_rng(1)
  # Three groups of different sizes and scales (so different stop iterations), interleaved ids.
  sizes, scales = [5, 3, 8], [1.0, 0.2, 3.0]
  costs, ids = [], []
  for g, (size, scale) in enumerate(zip(sizes, scales)):
    x, y = unit(rng, (size, 9, 6)), unit(rng, (size, 9, 6))
    costs.append(np.asarray(1 - scale * np.einsum('pnd,pmd->pnm', x, y), np.float32))
    ids.append(np.full(size, g))
  cost, ids = np.concatenate(costs), np.concatenate(ids)
  perm = rng.permutation(len(ids))
  res = jax.jit(lambda c, i: transport.sinkhorn_log(c, i, 4))(cost[perm], ids[perm])
  plan = np.exp(np.asarray(res.log_plan, np.float64))[np.argsort(perm)]
  ref_iters = []
  for g in range(3):
    ref_plan, it = np_sinkhorn(costs[g])
    ref_iters.append(it)
    np.testing.assert_allclose(plan[ids == g], ref_plan, rtol=2e-3, atol=1e-7)
  assert list(res.num_iters) == ref_iters + [0]        # empty group 3 never runs
  assert len(set(ref_iters)) == 3                      # the groups really stop apart


def test_frozen_group_equals_solving_it_alone():
  rng = np.random.default_rng(2)
  fast = np.asarray(transport.cost_matrix(unit(rng, (4, 9, 6)), unit(rng, (4, 9, 6))))
  slow = np.asarray(1 - 4 * transport.cost_matrix(unit(rng, (4, 9, 6)), unit(rng, (4, 9, 6))))
  both = transport.sinkhorn_log(np.concatenate([fast, slow]), np.repeat([0, 1], 4), 2)
  alone = transport.sinkhorn_log(fast, np.zeros(4, np.int32), 1)
  assert both.num_iters[0] == alone.num_iters[0] < both.num_iters[1]
  np.testing.assert_array_equal(both.u[:4], alone.u)
  np.testing.assert_array_equal(both.v[:4], alone.v)
  # One global stop would have run the fast group longer and changed its potentials.
  single = transport.sinkhorn_log(np.concatenate([fast, slow]), np.zeros(8, np.int32), 1)
  assert single.num_iters[0] != alone.num_iters[0]


def test_iteration_cap():
  rng = np.random.default_rng(3)
  cost = transport.cost_matrix(unit(rng, (3, 9, 6)), unit(rng, (3, 9, 6)))
  res = transport.sinkhorn_log(cost, np.array([0, 1, 1]), 2, thresh=0.0, max_iter=17)
  np.testing.assert_array_equal(res.num_iters, [17, 17])


def test_no_gradient_through_plan():
  rng = np.random.default_rng(4)
  cost = transport.cost_matrix(unit(rng, (2, 9, 6)), unit(rng, (2, 9, 6)))
  g = jax.grad(lambda c: jnp.sum(transport.sinkhorn(c)[0] ** 2))(cost)
  np.testing.assert_array_equal(g, 0.0)


def test_negative_gradient_flows_through_selected_entries_only():
  rng = np.random.default_rng(5)
  x, y = unit(rng, (3, 9, 6)), unit(rng, (3, 9, 6))
  # With eps = 0.01 the plan is close to a permutation / 9: its 9 largest entries are nearly tied,
  # so only the *set* of the top 10 is compared (the loss does not depend on their order).
  weights = rng.standard_normal((3, 1)).astype(np.float32)
  f = lambda x: jnp.sum(weights * transport.set_similarity(x, y, positive=False))
  sims = transport.set_similarity(x, y, positive=False)
  plan, _ = np_sinkhorn(np.asarray(transport.cost_matrix(x, y)))
  expected_grad = np.zeros_like(x)
  for p in range(3):
    top = np.argsort(-plan[p].ravel(), kind='stable')[:10]
    rows, cols = np.divmod(top, 9)
    np.testing.assert_allclose(np.sort(sims[p]), np.sort(np.sum(x[p, rows] * y[p, cols], -1)),
                               rtol=1e-5)
    for r, c in zip(rows, cols):
      expected_grad[p, r] += weights[p, 0] * y[p, c]
  np.testing.assert_allclose(jax.grad(f)(x), expected_grad, rtol=1e-5, atol=1e-6)


def test_positive_draws_among_top3():
  rng = np.random.default_rng(6)
  x, y = unit(rng, (50, 9, 6)), unit(rng, (50, 9, 6))
  cost = transport.cost_matrix(x, y)
  res = transport.sinkhorn_log(cost, np.zeros(50, np.int32), 1)
  top3 = np.asarray(transport.top_entries(res.log_plan, 3))
  ref_plan, _ = np_sinkhorn(np.asarray(cost))
  ref_plan = ref_plan.reshape(50, -1)
  third = np.sort(ref_plan, -1)[:, -3]
  dots = np.einsum('pnd,pmd->pnm', x, y).reshape(50, -1)      # 1 - M = X.Y
  picks = []
  for seed in range(3):
    key = jax.random.PRNGKey(seed)
    sims = np.asarray(transport.set_similarity(x, y, key, positive=True))
    pick = np.asarray(transport.positive_choice(key, 50, 3))
    chosen = top3[np.arange(50), pick]
    np.testing.assert_allclose(sims, dots[np.arange(50), chosen], rtol=1e-5, atol=1e-6)
    # The chosen entry is a top-3 entry of the float64 reference plan (up to near-ties).
    assert np.all(ref_plan[np.arange(50), chosen] >= third * (1 - 1e-3))
    picks.append(pick)
  assert set(np.concatenate(picks)) == {0, 1, 2}
  with pytest.raises(ValueError, match='key'):
    transport.set_similarity(x, y, positive=True)


def test_set_similarity_group_axes():
  # Two stopping groups of 5 problems: y scaled by 0.3 makes group 0's plans flat (it stops after
  # 34 iterations), by 2 makes group 1's peaked (127). One call over all 10 (group_ndim=0) runs
  # group 0 to 106 iterations and selects other top-10 entries in one of its problems (and in one
  # of group 1's); every selection here rests on a log-plan gap > 0.01 at its stopping iteration.
  rng = np.random.default_rng(6)
  x, y = unit(rng, (2, 5, 9, 6)), unit(rng, (2, 5, 9, 6))
  y[0] *= 0.3
  y[1] *= 2.0
  dots = np.einsum('gpnd,gpmd->gpnm', x, y).reshape(10, 81)       # 1 - M
  grouped = transport.set_similarity(x, y, positive=False, group_ndim=1)
  single = transport.set_similarity(x, y, positive=False)
  assert grouped.shape == single.shape == (2, 5, 10)

  def top10(problems):
    """Sorted similarities at the top-10 entries of one official Sinkhorn call over `problems`."""
    plans, _ = np_sinkhorn(1 - dots[problems].reshape(-1, 9, 9))
    top = np.argsort(-plans.reshape(len(problems), -1), axis=1, kind='stable')[:, :10]
    return np.sort(np.take_along_axis(dots[problems], top, axis=1), axis=1)

  # Entries tie at float precision within the top 9, so selections are compared as sets.
  per_group = np.concatenate([top10(np.arange(5)), top10(np.arange(5, 10))])
  np.testing.assert_allclose(np.sort(grouped, -1).reshape(10, 10), per_group, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.sort(single, -1).reshape(10, 10), top10(np.arange(10)), rtol=1e-5,
                             atol=1e-6)
  assert np.abs(np.sort(grouped, -1) - np.sort(single, -1)).max() > 1e-3   # grouping changes the result
