"""The front-door adjustment branch: dual attention (DANet's PAM + CAM) and an information bottleneck.

On the layer4 map f (B, h, w, D):  DA(f) = PAM(f) + CAM(f)  (a sum, so 2f at initialisation, where
both gammas are 0), then GAP -> Dense(2 * ib_dim) -> (mu, s), std = softplus(s - 5),
z = mu + eps * std, IB logits = Dense(C)(z). eps comes from the rng collection 'sample' in train
AND eval, as the official code samples in both (method.md section 1).

Attention energies and softmaxes are computed in float32 at full matmul precision whatever the
compute dtype: CAM energies are sums over h*w products of post-ReLU activations (hundreds to
thousands) and the softmax of `rowmax - energy` turns a bf16/TF32 rounding error of ~1 into an
e-fold change in a weight. PAM's 1x1 query / key / value convolutions themselves run in the compute
dtype (their outputs are then multiplied in float32); CAM reads f itself, in float32.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST

# PyTorch's default Conv2d/Linear init: weights and biases uniform(+-1/sqrt(fan_in)).
# kaiming_uniform_(a=sqrt(5)) gives bound sqrt(6 / ((1 + 5) * fan_in)) = 1/sqrt(fan_in).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_bias_init(fan_in: int):
  """uniform(+-1/sqrt(fan_in)) for a bias, as torch's Conv2d/Linear.reset_parameters."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _conv1x1(features: int, fan_in: int, name: str, dtype) -> nn.Conv:
  return nn.Conv(features, (1, 1), use_bias=True, kernel_init=torch_kernel_init,
                 bias_init=torch_bias_init(fan_in), dtype=dtype, param_dtype=jnp.float32, name=name)


def torch_dense(features: int, fan_in: int, name: str, dtype=jnp.float32) -> nn.Dense:
  return nn.Dense(features, kernel_init=torch_kernel_init, bias_init=torch_bias_init(fan_in),
                  dtype=dtype, param_dtype=jnp.float32, name=name)


class PositionAttention(nn.Module):
  """PAM: (B, h, w, D) -> (B, h, w, D) float32; out_i = sum_j softmax_j(<Q_i, K_j>) V_j, gamma*out + f.

  Q, K: 1x1 conv D -> max(D // 8, 1); V: 1x1 conv D -> D; all with bias. gamma: (1,) init 0.
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, f):
    b, h, w, d = f.shape
    x = jnp.asarray(f, self.dtype)
    q = _conv1x1(max(d // 8, 1), d, 'query_conv', self.dtype)(x).reshape(b, h * w, -1)
    k = _conv1x1(max(d // 8, 1), d, 'key_conv', self.dtype)(x).reshape(b, h * w, -1)
    v = _conv1x1(d, d, 'value_conv', self.dtype)(x).reshape(b, h * w, d)
    energy = jnp.einsum('bic,bjc->bij', q.astype(jnp.float32), k.astype(jnp.float32), precision=_HIGHEST)
    attention = jax.nn.softmax(energy, axis=-1)  # over key positions j
    out = jnp.einsum('bij,bjc->bic', attention, v.astype(jnp.float32), precision=_HIGHEST)
    gamma = self.param('gamma', nn.initializers.zeros, (1,), jnp.float32)
    return gamma * out.reshape(b, h, w, d) + f.astype(jnp.float32)


class ChannelAttention(nn.Module):
  """CAM: (B, h, w, D) -> (B, h, w, D) float32. X = f as (B, D, h*w); energy = X X^T (D x D);
  A = softmax_last(rowmax(energy) - energy); out = A X; gamma*out + f. gamma: (1,) init 0."""

  @nn.compact
  def __call__(self, f):
    b, h, w, d = f.shape
    x = f.astype(jnp.float32).reshape(b, h * w, d)
    energy = jnp.einsum('bnc,bne->bce', x, x, precision=_HIGHEST)  # (B, D, D)
    energy = jnp.max(energy, axis=-1, keepdims=True) - energy
    attention = jax.nn.softmax(energy, axis=-1)
    out = jnp.einsum('bce,bne->bnc', attention, x, precision=_HIGHEST)
    gamma = self.param('gamma', nn.initializers.zeros, (1,), jnp.float32)
    return gamma * out.reshape(b, h, w, d) + f.astype(jnp.float32)


class InformationBottleneck(nn.Module):
  """(B, h, w, D) -> {'ib_logits' (B, C), 'mu' (B, ib_dim), 'std' (B, ib_dim)}, float32.

  GAP -> 'encoder' Dense(2*ib_dim) -> mu = first half, std = softplus(second half - 5);
  z = mu + eps * std with eps ~ N(0, I) from rng 'sample'; 'decoder' Dense(C)(z).
  """
  num_classes: int
  ib_dim: int = 512

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    stats = torch_dense(2 * self.ib_dim, d, 'encoder')(pooled)
    mu, s = stats[:, :self.ib_dim], stats[:, self.ib_dim:]
    std = jax.nn.softplus(s - 5.0)
    if not (self.has_rng('sample') or self.is_initializing()):
      raise ValueError("The front-door IB head samples noise in train and eval: pass "
                       "rngs={'sample': key} to Classifier.apply.")
    eps = jax.random.normal(self.make_rng('sample'), std.shape, std.dtype)
    z = mu + eps * std
    logits = torch_dense(self.num_classes, self.ib_dim, 'decoder')(z)
    return {'ib_logits': logits, 'mu': mu, 'std': std}


class FrontDoor(nn.Module):
  """Layer4 map (B, h, w, D) -> IB outputs (see InformationBottleneck); submodules 'pam', 'cam', 'ib'."""
  num_classes: int
  ib_dim: int = 512
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, f):
    da = PositionAttention(self.dtype, name='pam')(f) + ChannelAttention(name='cam')(f)
    return InformationBottleneck(self.num_classes, self.ib_dim, name='ib')(da)
