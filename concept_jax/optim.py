"""The optimizer: torch-style SGD (Nesterov, coupled weight decay), lr multipliers by path, schedules.

Everything is an optax chain so that optimizer state is a pytree checkpointed with the rest.
torch's SGD applies, per parameter group with learning rate lr_g:
    g <- g + wd * p;  buf <- momentum * buf + g;  g <- g + momentum * buf (Nesterov);  p <- p - lr_g * g
which is add_decayed_weights -> trace(nesterov) -> scale by -lr(step) * multiplier(path).
"""
import math
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax


def param_path(path) -> str:
  """'backbone/layer1_0/conv1/kernel' from a jax tree path."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def tree_by_pattern(params, patterns: Sequence[tuple[str, float]], default: float):
  """Per-leaf value: the value of the first regex (re.search on the path) that matches, else default."""
  compiled = [(re.compile(p), v) for p, v in patterns]

  def value(path, _):
    name = param_path(path)
    return next((v for regex, v in compiled if regex.search(name)), default)

  return jax.tree_util.tree_map_with_path(value, params)


def schedule(config, iters_per_epoch: int) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """Learning rate as a function of the step, changed once per epoch as torch's epoch schedulers do.

  'multistep': lr * gamma ** (number of milestones <= epoch)   (torch MultiStepLR)
  'cosine':    lr * (1 + cos(pi * epoch / epochs)) / 2          (torch CosineAnnealingLR, T_max=epochs)
  'constant':  lr
  """
  base = config.optim.lr
  kind = config.optim.schedule
  epochs = config.epochs
  milestones = jnp.asarray(tuple(config.optim.milestones) or (math.inf,), jnp.float32)

  def lr(step):
    epoch = (jnp.asarray(step) // iters_per_epoch).astype(jnp.float32)
    if kind == 'multistep':
      return base * config.optim.gamma ** jnp.sum(epoch >= milestones)
    if kind == 'cosine':
      return base * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))
    if kind == 'constant':
      return jnp.full_like(epoch, base)
    raise ValueError(f"optim.schedule={kind!r} is unknown; use 'multistep', 'cosine' or 'constant'")

  return lr


def _scale_by_tree(multipliers) -> optax.GradientTransformation:
  return optax.stateless(lambda updates, params: jax.tree.map(lambda u, m: u * m, updates, multipliers))


def make_optimizer(config, params, iters_per_epoch: int,
                   rules: dict | None = None) -> tuple[optax.GradientTransformation, Callable]:
  """SGD as torch applies it, with per-path lr multipliers (config.optim.lr_mults: ((regex, mult), ...)).

  A multiplier of 0 freezes a parameter (its weight decay is scaled away too, as torch would skip it).
  rules: a method's own {'lr_mults', 'no_weight_decay'}, matched before config.optim's.
  Returns (transformation, lr schedule).
  """
  o = config.optim
  rules = rules or {}
  lr = schedule(config, iters_per_epoch)
  multipliers = tree_by_pattern(params, tuple(rules.get('lr_mults', ())) + tuple(o.lr_mults), 1.0)
  exempt = tuple(rules.get('no_weight_decay', ())) + tuple(o.no_weight_decay)
  decay_mask = tree_by_pattern(params, tuple((p, False) for p in exempt), True)
  tx = optax.chain(
      optax.masked(optax.add_decayed_weights(o.weight_decay), decay_mask),
      optax.trace(decay=o.momentum, nesterov=o.nesterov),
      optax.scale_by_schedule(lambda step: -lr(step)),
      _scale_by_tree(multipliers),
  )
  return tx, lr
