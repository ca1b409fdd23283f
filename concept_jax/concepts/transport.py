"""Batched log-domain Sinkhorn with grouped stopping, and OT set similarities (spec section 6).

Two sets of n unit vectors X, Y are compared through the cost M = 1 - X Y^T (n x m). Entropic
OT with uniform marginals a = 1/n, b = 1/m and eps = 0.01 is solved in the log domain exactly as
the official code does:

    Mhat(u, v) = (-M + u_i + v_j) / eps                u, v start at 0
    u <- eps (log a - LSE_j Mhat(u, v)) + u
    v <- eps (log b - LSE_i Mhat(u, v)) + v            (with the new u)
    err = mean over the group's problems of sum_i |u - u_prev|;  stop the group when err < thresh
    plan = exp(Mhat(u, v))                             at most max_iter iterations

The official code makes one Sinkhorn call per *group* of problems, and the stop test is a mean
over that group. Here all problems iterate together in one `lax.while_loop`; each problem carries
a group id, and a group's u and v freeze after the iteration at which its own err (a segment mean)
falls below thresh. The loop exits when every group has stopped or after max_iter iterations.
This reproduces the official per-call results (a global or a per-problem stop would change the
selected entries). The common PyTorch SinkhornDistance code takes log(a + 1e-8); if the official
code does too, that shifts u by ~1e-9, below float32 resolution, so log(a) is used as the spec says.

The plan only *selects* entries: the cost is passed through stop_gradient, the selected indices
are used to gather from the differentiable cost, so gradients flow through those entries of M
only. Entries are ranked by the log-plan Mhat, which orders them exactly as the plan does but
keeps its order where exp(Mhat) underflows to 0 in float32 (ties that torch breaks arbitrarily).
"""
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

EPS = 0.01
THRESH = 1e-3
MAX_ITER = 200


class SinkhornResult(NamedTuple):
  """log_plan: (P, n, m) Mhat at the final potentials (plan = exp(log_plan)).
  u: (P, n), v: (P, m) final potentials. num_iters: (G,) int32 iterations each group ran."""
  log_plan: jax.Array
  u: jax.Array
  v: jax.Array
  num_iters: jax.Array


def cost_matrix(x: jax.Array, y: jax.Array, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """M = 1 - X Y^T for sets of (already l2-normalised) vectors.

  Args:
    x: (..., n, d); y: (..., m, d) (broadcast over the leading axes).
  Returns:
    (..., n, m). HIGHEST precision keeps float32 products on GPUs (no TF32), like torch.bmm.
  """
  return 1.0 - jnp.einsum('...nd,...md->...nm', x, y, precision=precision)


def sinkhorn_log(cost: jax.Array, group_ids: jax.Array, num_groups: int, *, eps: float = EPS,
                 thresh: float = THRESH, max_iter: int = MAX_ITER) -> SinkhornResult:
  """Grouped-stop log-domain Sinkhorn over a flat batch of problems (no gradient).

  Args:
    cost: (P, n, m) costs M (stop_gradient is applied here).
    group_ids: (P,) int in [0, num_groups): the group whose mean err decides when the problem
      stops. Problems of one group need not be contiguous.
    num_groups: G, static.
    eps, thresh, max_iter: entropic regulariser, stop threshold, iteration cap.
  Returns:
    SinkhornResult (see there). An empty group counts as stopped from the start.
  Memory: the loop carries u, v ((P, n) + (P, m)) and reads the loop-invariant cost; each
  iteration recomputes Mhat twice (P * n * m floats, fused into the reductions) and the result
  holds one (P, n, m) log-plan.
  """
  p, n, m = cost.shape
  cost = jax.lax.stop_gradient(cost).astype(jnp.float32)
  log_a = jnp.log(jnp.float32(1.0 / n))
  log_b = jnp.log(jnp.float32(1.0 / m))
  group_ids = group_ids.astype(jnp.int32)
  counts = jax.ops.segment_sum(jnp.ones((p,), jnp.float32), group_ids, num_groups)

  def mhat(u, v):
    return (-cost + u[:, :, None] + v[:, None, :]) / eps

  def cond(state):
    it, _, _, active, _ = state
    return (it < max_iter) & jnp.any(active)

  def body(state):
    it, u, v, active, iters = state
    u_new = eps * (log_a - jax.nn.logsumexp(mhat(u, v), axis=-1)) + u
    v_new = eps * (log_b - jax.nn.logsumexp(mhat(u_new, v), axis=-2)) + v
    err = jnp.abs(u_new - u).sum(-1)                                           # (P,)
    group_err = jax.ops.segment_sum(err, group_ids, num_groups) / jnp.maximum(counts, 1.0)
    moving = active[group_ids][:, None]
    u = jnp.where(moving, u_new, u)
    v = jnp.where(moving, v_new, v)
    iters = iters + active.astype(jnp.int32)
    # The update that brings err below thresh is kept (the official loop breaks after it).
    active = active & ~(group_err < thresh)
    return it + 1, u, v, active, iters

  state = (jnp.int32(0), jnp.zeros((p, n), jnp.float32), jnp.zeros((p, m), jnp.float32),
           counts > 0, jnp.zeros((num_groups,), jnp.int32))
  _, u, v, _, iters = jax.lax.while_loop(cond, body, state)
  return SinkhornResult(mhat(u, v), u, v, iters)


def sinkhorn(cost: jax.Array, group_ids: Optional[jax.Array] = None, num_groups: int = 1,
             **kwargs) -> Tuple[jax.Array, jax.Array]:
  """Transport plans. cost (P, n, m); group_ids (P,) (None: a single group).

  Returns (plan (P, n, m) = exp(Mhat), num_iters (G,)). kwargs: eps, thresh, max_iter.
  """
  if group_ids is None:
    group_ids = jnp.zeros(cost.shape[:1], jnp.int32)
  res = sinkhorn_log(cost, group_ids, num_groups, **kwargs)
  return jnp.exp(res.log_plan), res.num_iters


def top_entries(log_plan: jax.Array, k: int) -> jax.Array:
  """Flat indices (P, k) of the k largest plan entries of each (n, m) plan, largest first.

  Ties go to the lower flat (row-major) index (lax.top_k). log_plan: (P, n, m).
  """
  p = log_plan.shape[0]
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(log_plan).reshape(p, -1), k)
  return idx


def gather_similarity(cost: jax.Array, flat_idx: jax.Array) -> jax.Array:
  """1 - M at flat (row-major) indices: cost (P, n, m), flat_idx (P, k) -> (P, k).

  Differentiable in `cost`: only the gathered entries receive gradient.
  """
  p = cost.shape[0]
  return 1.0 - jnp.take_along_axis(cost.reshape(p, -1), flat_idx, axis=-1)


def positive_choice(key: jax.Array, num_problems: int, top: int = 3) -> jax.Array:
  """Which of the top-`top` plan entries each positive problem uses.

  Returns (num_problems,) int32, uniform in [0, top). At eps = 0.01 a 9x9 plan is close to a
  permutation / 9, so its largest entries are nearly tied: the top-3 candidates are effectively
  3 of the ~9 matched pairs, and their order depends on rounding (as in the official code).
  """
  return jax.random.randint(key, (num_problems,), 0, top, dtype=jnp.int32)


def select_similarities(cost: jax.Array, log_plan: jax.Array, *, key: Optional[jax.Array] = None,
                        top: int, positive: bool) -> jax.Array:
  """Set similarities from solved plans.

  Args:
    cost: (P, n, m) differentiable cost M.
    log_plan: (P, n, m) from `sinkhorn_log` (not differentiated).
    key: PRNG key, needed when positive.
    top: candidates (positive, 3) or number of returned entries (negative, 10).
    positive: True -> (P,) 1 - M at one entry drawn uniformly among the top-`top`;
      False -> (P, top) 1 - M at the top-`top` entries.
  """
  idx = top_entries(log_plan, top)
  if positive:
    if key is None:
      raise ValueError('positive similarities draw one of the top entries at random: pass key.')
    pick = positive_choice(key, cost.shape[0], top)
    idx = jnp.take_along_axis(idx, pick[:, None], axis=-1)
    return gather_similarity(cost, idx)[:, 0]
  return gather_similarity(cost, idx)


def set_similarity(x: jax.Array, y: jax.Array, key: Optional[jax.Array] = None, *,
                   positive: bool, top: Optional[int] = None, group_ndim: int = 0,
                   eps: float = EPS, thresh: float = THRESH, max_iter: int = MAX_ITER,
                   precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """OT similarity between sets, one Sinkhorn problem per leading index.

  Args:
    x: (*G, *Q, n, d) and y: (*G, *Q, m, d) sets of unit vectors (broadcastable leading axes).
      The first `group_ndim` leading axes (*G) index stopping groups, the rest (*Q) the problems
      within a group: group_ndim=0 is one official Sinkhorn call over all problems.
    key: PRNG key for positives.
    positive: True -> one similarity per problem (top 3 default), False -> top 10 per problem.
  Returns:
    (*G, *Q) if positive else (*G, *Q, top).
  """
  top = top if top is not None else (3 if positive else 10)
  cost = cost_matrix(x, y, precision)
  lead = cost.shape[:-2]
  num_groups = 1
  for size in lead[:group_ndim]:
    num_groups *= size
  per_group = 1
  for size in lead[group_ndim:]:
    per_group *= size
  flat = cost.reshape((-1,) + cost.shape[-2:])
  group_ids = jnp.repeat(jnp.arange(num_groups, dtype=jnp.int32), per_group)
  res = sinkhorn_log(flat, group_ids, num_groups, eps=eps, thresh=thresh, max_iter=max_iter)
  sims = select_similarities(flat, res.log_plan, key=key, top=top, positive=positive)
  return sims.reshape(lead + sims.shape[1:])
