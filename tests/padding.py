"""Shared test inputs: right-padded masks and junk at the pads (so that a result leaking pads shows)."""
import numpy as np


def right_padded_mask(rng, b, n):
  """[B, N] bool, each row some real tokens then pads; row 0 is full and, when B > 1, the last row empty."""
  lengths = rng.integers(0, n + 1, size=b)
  lengths[0] = n
  if b > 1:
    lengths[-1] = 0
  return np.arange(n)[None, :] < lengths[:, None]


def garbage_at_pads(rng, x, mask):
  """x with large junk where the mask is False."""
  return np.where(mask, x, rng.normal(size=x.shape) * 1e3)
