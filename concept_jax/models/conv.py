"""The backbone's convolution op: lax.conv_general_dilated, except on maps smaller than the kernel.

Where a convolution's output is smaller than its kernel (the 2x2 layer4 map of a 16 px concept patch
through the small stem, or of a 64 px patch through ResNet-50), XLA swaps the convolution's operands
and XLA:CPU then runs it on a slow generic path: four such ops were a third of a Concept-Tuning step
on the negative-transfer benchmark (36 ms each). There the convolution is computed as what it is,
a sum over the kernel's taps of shifted slices times the tap's weights, one matmul (im2col), which is
10 times faster for its forward and backward pass on CPU and costs nothing elsewhere (the maps are
tiny). The result is the same up to float rounding (another summation order).
"""
import jax.numpy as jnp
from jax import lax

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """lax.conv_general_dilated's signature (what flax.linen.Conv calls); im2col where the output
  map is smaller than the kernel, for plain NHWC convolutions (no dilation, no groups)."""
  plain = (not kwargs and feature_group_count == 1 and not isinstance(padding, str)
           and all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
           and lhs.ndim == 4
           and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if plain:
    (kh, kw), (sh, sw) = rhs.shape[:2], window_strides
    x = jnp.pad(lhs, ((0, 0), *padding, (0, 0)))
    oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    if oh < kh or ow < kw:
      taps = [x[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw] for i in range(kh)
              for j in range(kw)]
      return jnp.einsum('bhwtc,tco->bhwo', jnp.stack(taps, axis=3),
                        rhs.reshape(kh * kw, *rhs.shape[2:]), precision=precision)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                  dimension_numbers, feature_group_count, precision=precision, **kwargs)
