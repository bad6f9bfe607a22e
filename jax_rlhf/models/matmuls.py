"""The model's matrix products with hand-written VJPs: `dense` (every projection), `add_bias` (the projections'
biases) and `tied_logits` (the tied LM head).

Each keeps autodiff's math and only chooses the form of its gradient that XLA:CPU runs without a transposed copy
of a large tensor; bf16 operands on a CPU with AMX run on MKL's bf16 GEMM (`jax_rlhf.kernels`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_rlhf import kernels


@jax.custom_vjp
def dense(x, w):
  """x [..., K] @ w [K, M] -> [..., M]: every projection of the model (q, k, v, o and the MLP).

  Its own VJP only to fix the form of the weight gradient: w' = x2^T g2 over the flattened tokens
  (x2 [N, K], g2 [N, M]), one dot whose only layout change is the transposed x2. Left to autodiff (the
  einsums over [B, T, H, Dh]), XLA:CPU transposed the incoming gradient instead, and fused the whole
  backward residual chain into each transposed copy (~20% of a training step on this CPU). Same math.

  bf16 x and w on a CPU with AMX: the forward and both backward products run on MKL's bf16 GEMM
  (`jax_rlhf.kernels`, fp32 accumulation, rounded to bf16 as XLA's bf16 dot); everywhere else `jnp.dot`.
  """
  return _dense_fwd(x, w)[0]


def _dense_fwd(x, w):
  if kernels.use_mkl(x.dtype, w.dtype):
    y = kernels.gemm_bf16(x.reshape(-1, x.shape[-1]), w).astype(x.dtype)
    return y.reshape(*x.shape[:-1], w.shape[-1]), (x, w)
  return jnp.dot(x, w), (x, w)


def _dense_bwd(res, g):
  x, w = res
  if kernels.use_mkl(x.dtype, w.dtype, g.dtype):
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dx = kernels.gemm_bf16(g2, w, trans_b=True).reshape(x.shape)  # g w^T, w read transposed in place
    dw = kernels.gemm_bf16(x2, g2, trans_a=True)  # x^T g, x read transposed in place
    return dx.astype(x.dtype), dw.astype(w.dtype)
  dx = jnp.dot(g, w.T)
  dw = jnp.einsum('nk,nm->km', x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]))
  return dx.astype(x.dtype), dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def add_bias(y, b):
  """y [..., *S] + b [*S] (the projections' biases).

  bf16 on a CPU with AMX: its gradient (the sum of g over the tokens) is a [1, N] x [N, M] product of ones on
  MKL's GEMM, in fp32; XLA:CPU reduced it through an fp32 copy of g and a single-threaded reduce-window (~12%
  of a bf16 training step here). Elsewhere exactly `y + b`.
  """
  if kernels.use_mkl(y.dtype, b.dtype):
    return _add_bias_mkl(y, b)
  return y + b


@jax.custom_vjp
def _add_bias_mkl(y, b):
  return y + b


def _add_bias_fwd(y, b):
  return y + b, b


def _add_bias_bwd(b, g):
  g2 = g.reshape(-1, b.size)
  db = kernels.gemm_bf16(jnp.ones((1, g2.shape[0]), g.dtype), g2)  # [1, M] fp32 column sums
  return g, db.reshape(b.shape).astype(b.dtype)


_add_bias_mkl.defvjp(_add_bias_fwd, _add_bias_bwd)


@jax.custom_vjp
def tied_logits(h, wte):
  """h [..., D] @ wte[V, D]^T -> float32 logits [..., V] (the tied LM head).

  Its own VJP only to choose the weight gradient's form: autodiff yields dlogits^T h, for which XLA:CPU
  first materialises the transposed dlogits [V, N] (the largest tensor of a training step); here it is
  (h^T dlogits)^T, which transposes h [N, D] and the [D, V] result instead. Same math, same values.
  bf16 h and wte on a CPU with AMX: MKL's bf16 GEMM (`jax_rlhf.kernels`) for all three products, reading
  the transposed operands in place (dw = dlogits^T h directly).
  """
  if kernels.use_mkl(h.dtype, wte.dtype):
    return kernels.gemm_bf16(h.reshape(-1, h.shape[-1]), wte, trans_b=True).reshape(*h.shape[:-1], wte.shape[0])
  return jnp.einsum('...d,vd->...v', h, wte, preferred_element_type=jnp.float32)


def _tied_logits_fwd(h, wte):
  return tied_logits(h, wte), (h, wte)


def _tied_logits_bwd(res, g):
  h, wte = res
  if kernels.use_mkl(h.dtype, wte.dtype):
    g2 = g.reshape(-1, g.shape[-1]).astype(h.dtype)  # fp32 dlogits rounded to bf16, as the XLA path does
    dh = kernels.gemm_bf16(g2, wte).reshape(h.shape)
    dw = kernels.gemm_bf16(g2, h.reshape(-1, h.shape[-1]), trans_a=True)  # [V, D]
    return dh.astype(h.dtype), dw.astype(wte.dtype)
  dh = jnp.einsum('...v,vd->...d', g.astype(wte.dtype), wte, preferred_element_type=jnp.float32)
  h2 = h.reshape(-1, h.shape[-1])
  g2 = g.reshape(-1, g.shape[-1]).astype(h.dtype)
  dw = jnp.einsum('nd,nv->dv', h2, g2, preferred_element_type=jnp.float32).T
  return dh.astype(h.dtype), dw.astype(wte.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)
