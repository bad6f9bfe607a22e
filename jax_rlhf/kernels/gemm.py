"""bf16 x bf16 -> fp32 matrix products on the CPU's matrix unit (AMX), through MKL, where that helps.

XLA:CPU (jax 0.10.2) computes a bf16 dot slower than an fp32 one and never reaches AMX; MKL's
`cblas_gemm_bf16bf16f32` does (~1,800 GFLOP/s at 2048^3 on 2 Xeon cores, against XLA's ~290 fp32). This module
wraps it as an XLA FFI custom call (`bf16_gemm.cc`, compiled on first use by `build.py`) and decides, at trace
time, which path a product takes:

  MKL   when the backend is the CPU, both operands are bfloat16, the CPU has AMX-BF16, and the handler builds
        and loads (the `mkl` / `mkl-include` wheels and a C++ compiler are there);
  XLA   otherwise (TPU, GPU, fp32, a CPU without AMX, no MKL), with the caller's own `jnp.dot`: no change in
        results. A CPU with AVX512-BF16 but no AMX (AMD EPYC here) takes XLA too: there XLA's own bf16 dot is
        fast and MKL's GEMM measured 0.45-0.7x of it at every shape of the model (2048^3: 130 vs 188 GFLOP/s;
        [2048, 256] x [256, 4096]: 71 vs 146; decode [16, 256] x [256, 4096]: 65 vs 146; 2 cores, 2026-12-05).

One log line (logger `jax_rlhf.kernels`, and stderr) says which path runs and why, the first time it is decided.
`JAX_RLHF_BF16_GEMM=xla` (or `set_mode('xla')`) forces XLA, e.g. to simulate a CPU without AMX;
`JAX_RLHF_BF16_GEMM=mkl` uses MKL whatever the CPU flags say (MKL emulates bf16 on older AVX-512 CPUs).
The decision is made when a function is traced; `set_mode` clears JAX's caches so that the new mode applies
(after changing the environment variable in a running process, call `set_mode(None)`).

Under a device mesh the custom call is partitioned by `custom_partitioning`: the free dimensions keep their
sharding, a contracted dimension that both operands shard alike (the token dimension of a weight gradient)
is reduced per device and summed with `psum`, any other contracted sharding is gathered first.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_rlhf.kernels import build

log = logging.getLogger('jax_rlhf.kernels')

MODES = ('auto', 'xla', 'mkl')
_STATE: dict = {'mode': None, 'decided': None, 'logged': None}


def _env_mode() -> str:
  mode = os.environ.get('JAX_RLHF_BF16_GEMM', 'auto').strip().lower() or 'auto'
  if mode not in MODES:
    raise ValueError(f'JAX_RLHF_BF16_GEMM must be one of {MODES}, got {mode!r}')
  return mode


def get_mode() -> str:
  return _STATE['mode'] or _env_mode()


def set_mode(mode: str | None) -> str:
  """Set the path chooser ('auto' | 'xla' | 'mkl'; None: back to $JAX_RLHF_BF16_GEMM). Returns the old mode.

  Clears JAX's compilation caches (the choice is made at trace time).
  """
  if mode is not None and mode not in MODES:
    raise ValueError(f'bf16 GEMM mode must be one of {MODES}, got {mode!r}')
  old = get_mode()
  _STATE['mode'] = mode
  _STATE['decided'] = None
  jax.clear_caches()  # the path is chosen at trace time: drop the traces made under the old mode
  return old


@contextlib.contextmanager
def mode(m: str):
  """`with kernels.mode('xla'): ...` traces the enclosed functions with that path chooser."""
  old = _STATE['mode']
  set_mode(m)
  try:
    yield
  finally:
    set_mode(old)


def cpu_flags() -> set[str]:
  """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('flags'):
          return set(line.split(':', 1)[1].split())
  except OSError:
    pass
  return set()


def _decide() -> tuple[bool, str]:
  """(use MKL?, why) for bf16 operands, under the current mode; builds and loads the handler if it may run."""
  m = get_mode()
  if m == 'xla':
    return False, 'XLA dot (forced: JAX_RLHF_BF16_GEMM=xla / kernels.set_mode)'
  if jax.default_backend() != 'cpu':
    return False, f'XLA dot (backend {jax.default_backend()})'
  if m == 'auto':
    flags = cpu_flags()
    if 'amx_bf16' not in flags:
      if 'avx512_bf16' in flags:
        return False, 'XLA dot (this CPU has AVX512-BF16 but no AMX: XLA\'s bf16 dot is the faster one there)'
      return False, 'XLA dot (this CPU has no AMX-BF16)'
    unit = 'AMX-BF16'
  else:
    unit = 'forced: JAX_RLHF_BF16_GEMM=mkl'
  try:
    build.load()
  except build.KernelUnavailable as e:
    return False, f'XLA dot ({e})'
  return True, f'MKL cblas_gemm_bf16bf16f32 ({unit})'


def use_mkl(*dtypes) -> bool:
  """Whether a product of operands of these dtypes takes the MKL path (all must be bfloat16). Logs once."""
  if not dtypes or any(jnp.dtype(d) != jnp.bfloat16 for d in dtypes):
    return False
  if _STATE['decided'] is None:
    _STATE['decided'] = _decide()
  ok, why = _STATE['decided']
  if _STATE['logged'] != why:
    _STATE['logged'] = why
    line = f'jax_rlhf.kernels: bf16 matmuls run on {why}'
    log.info(line)
    print(line, file=sys.stderr, flush=True)
  return ok


# ----------------------------------------------------------------------------------------------------
# The custom call, and its partitioning over a device mesh
# ----------------------------------------------------------------------------------------------------

def _out_shape(a, b, trans_a: bool, trans_b: bool) -> tuple[int, int]:
  m = a.shape[1] if trans_a else a.shape[0]
  n = b.shape[0] if trans_b else b.shape[1]
  return m, n


def _ffi_gemm(a, b, trans_a: bool, trans_b: bool):
  out = jax.ShapeDtypeStruct(_out_shape(a, b, trans_a, trans_b), jnp.float32)
  return jax.ffi.ffi_call('jax_rlhf_bf16_gemm', out, vmap_method='sequential')(
      a, b, trans_a=bool(trans_a), trans_b=bool(trans_b))


def _dims(trans_a: bool, trans_b: bool) -> tuple[tuple[int, int], tuple[int, int]]:
  """For each operand: (index of its free dim, index of its contracted dim)."""
  return ((1, 0) if trans_a else (0, 1)), ((0, 1) if trans_b else (1, 0))


def _axes(spec: P, i: int) -> tuple:
  """The mesh axes (a tuple, maybe empty) that dim i of a 2-D value is sharded over."""
  entry = spec[i] if i < len(spec) else None
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _spec_entry(axes: tuple):
  return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def _plan(arg_shardings, trans_a: bool, trans_b: bool):
  """(sharding of a, of b, of the result, mesh axes to psum over) for these operand shardings."""
  (fa, ca), (fb, cb) = _dims(trans_a, trans_b)
  sa, sb = arg_shardings[0].spec, arg_shardings[1].spec
  m_axes = _axes(sa, fa)
  n_axes = tuple(x for x in _axes(sb, fb) if x not in m_axes)
  k_axes = _axes(sa, ca)
  if k_axes != _axes(sb, cb) or set(k_axes) & (set(m_axes) | set(n_axes)):
    k_axes = ()  # shard the contraction only where both operands already agree on it
  spec_a, spec_b = [None, None], [None, None]
  spec_a[fa], spec_a[ca] = _spec_entry(m_axes), _spec_entry(k_axes)
  spec_b[fb], spec_b[cb] = _spec_entry(n_axes), _spec_entry(k_axes)
  mesh = arg_shardings[0].mesh
  return (NamedSharding(mesh, P(*spec_a)), NamedSharding(mesh, P(*spec_b)),
          NamedSharding(mesh, P(_spec_entry(m_axes), _spec_entry(n_axes))), k_axes)


@functools.partial(custom_partitioning, static_argnums=(2, 3))
def _gemm_partitioned(a, b, trans_a, trans_b):
  return _ffi_gemm(a, b, trans_a, trans_b)


def _infer(trans_a, trans_b, mesh, arg_shapes, result_shape):
  del mesh, result_shape
  return _plan([x.sharding for x in arg_shapes], trans_a, trans_b)[2]


def _partition(trans_a, trans_b, mesh, arg_shapes, result_shape):
  del result_shape
  sa, sb, so, k_axes = _plan([x.sharding for x in arg_shapes], trans_a, trans_b)

  def lower(a, b):
    c = _ffi_gemm(a, b, trans_a, trans_b)
    return jax.lax.psum(c, k_axes) if k_axes else c

  return mesh, lower, so, (sa, sb)


def _rule(trans_a, trans_b, mesh, arg_shapes, result_shape):
  del mesh, arg_shapes, result_shape
  a = 'k m' if trans_a else 'm k'
  b = 'n k' if trans_b else 'k n'
  return f'{a}, {b} -> m n'


_gemm_partitioned.def_partition(partition=_partition, infer_sharding_from_operands=_infer, sharding_rule=_rule)


def gemm_bf16(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
  """The MKL custom call: op(a) @ op(b) in fp32, a and b 2-D bfloat16 (op = transpose where asked).

  a: [M, K] (or [K, M] with trans_a); b: [K, N] (or [N, K] with trans_b). Returns float32 [M, N].
  Always MKL (building the handler if needed; raises `build.KernelUnavailable` if it cannot): callers that
  want the automatic choice use `bf16_dot` / `matmul`.
  """
  if a.ndim != 2 or b.ndim != 2 or a.dtype != jnp.bfloat16 or b.dtype != jnp.bfloat16:
    raise ValueError(f'gemm_bf16 takes 2-D bfloat16 operands, got {a.dtype}{a.shape} and {b.dtype}{b.shape}')
  k_a = a.shape[0] if trans_a else a.shape[1]
  k_b = b.shape[1] if trans_b else b.shape[0]
  if k_a != k_b:
    raise ValueError(f'gemm_bf16: contracted sizes differ ({a.shape}, trans_a={trans_a}; {b.shape}, '
                     f'trans_b={trans_b})')
  build.load()
  return _gemm_partitioned(a, b, bool(trans_a), bool(trans_b))


def xla_dot(a, b, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
  """XLA's op(a) @ op(b) with fp32 output: the reference and fallback of `gemm_bf16`."""
  dims = (((0,) if trans_a else (1,)), ((1,) if trans_b else (0,)))
  return jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)


def bf16_dot(a, b, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
  """op(a) @ op(b) -> float32 [M, N] for 2-D a, b: MKL where `use_mkl` says so, else `xla_dot`."""
  if use_mkl(a.dtype, b.dtype):
    return gemm_bf16(a, b, trans_a=trans_a, trans_b=trans_b)
  return xla_dot(a, b, trans_a=trans_a, trans_b=trans_b)


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., K] @ w [K, M] -> float32 [..., M], bf16 operands on MKL (else XLA), with MKL's backward too.

  VJP: dx = g @ w^T ([N, M] x [M, K], w transposed in place) and dw = x^T @ g ([K, N] x [N, M], x transposed
  in place) over the flattened tokens; the fp32 cotangent g is rounded to the operands' dtype first (as a
  bf16 autocast backward does). Cotangents come back in the operands' dtypes.
  """
  return bf16_dot(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


def _matmul_fwd(x, w):
  return matmul(x, w), (x, w)


def _matmul_bwd(res, g):
  x, w = res
  x2 = x.reshape(-1, x.shape[-1])
  g2 = g.reshape(-1, g.shape[-1]).astype(x.dtype)
  dx = bf16_dot(g2, w.astype(x.dtype), trans_b=True).reshape(x.shape)
  dw = bf16_dot(x2, g2.astype(w.dtype), trans_a=True)
  return dx.astype(x.dtype), dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)
