"""The bf16 GEMM custom call (MKL, AMX): against XLA's dot of the same bf16 inputs, its VJP, the fallback,
the build from an empty cache, and its partitioning over the 8 test devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_rlhf import kernels
from jax_rlhf import sharding as shd
from jax_rlhf.kernels import build, gemm

SHAPES = [(1, 1, 1), (3, 5, 7), (17, 33, 65), (128, 96, 40), (2, 300, 513)]  # (M, K, N), odd on purpose


def _operands(m, k, n, trans_a, trans_b, seed=0):
  ka, kb = jax.random.split(jax.random.key(seed))
  a = jax.random.normal(ka, (k, m) if trans_a else (m, k)).astype(jnp.bfloat16)
  b = jax.random.normal(kb, (n, k) if trans_b else (k, n)).astype(jnp.bfloat16)
  return a, b


def _reference(a, b, trans_a, trans_b):
  """float64 numpy product of the same bf16 values."""
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return (a64.T if trans_a else a64) @ (b64.T if trans_b else b64)


def _rel(x, ref):
  return float(np.max(np.abs(np.asarray(x, np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-30))


@pytest.mark.parametrize('trans_a', [False, True])
@pytest.mark.parametrize('trans_b', [False, True])
def test_gemm_matches_dot_of_same_bf16_inputs(trans_a, trans_b):
  f = jax.jit(lambda a, b: kernels.gemm_bf16(a, b, trans_a=trans_a, trans_b=trans_b))
  for m, k, n in SHAPES:
    a, b = _operands(m, k, n, trans_a, trans_b)
    y = f(a, b)
    assert y.dtype == jnp.float32 and y.shape == (m, n)
    ref = _reference(a, b, trans_a, trans_b)
    xla = kernels.xla_dot(a.astype(jnp.float32), b.astype(jnp.float32), trans_a=trans_a, trans_b=trans_b)
    assert _rel(y, ref) < 1e-3, (m, k, n)
    assert _rel(y, np.asarray(xla, np.float64)) < 1e-3, (m, k, n)
    assert np.all(np.isfinite(np.asarray(y)))


def test_gemm_empty_contraction_is_zero():
  a, b = jnp.zeros((4, 0), jnp.bfloat16), jnp.zeros((0, 3), jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(jax.jit(kernels.gemm_bf16)(a, b)), np.zeros((4, 3)))


def test_matmul_vjp_equals_autodiff_of_xla_path():
  kx, kw, kg = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (3, 11, 37)).astype(jnp.bfloat16)
  w = (0.2 * jax.random.normal(kw, (37, 29))).astype(jnp.bfloat16)
  g = jax.random.normal(kg, (3, 11, 29), jnp.float32)
  with kernels.mode('mkl'):  # the MKL path is under test, whatever this CPU's auto choice is
    assert kernels.use_mkl(jnp.bfloat16, jnp.bfloat16)
    y, vjp = jax.vjp(kernels.matmul, x, w)
    assert 'jax_rlhf_bf16_gemm' in str(jax.make_jaxpr(jax.grad(lambda x, w: kernels.matmul(x, w).sum()))(x, w))
    grads = jax.jit(vjp)(g)
  y_ref, vjp_ref = jax.vjp(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32), x, w)
  assert _rel(y, np.asarray(y_ref, np.float64)) < 1e-3
  for got, want in zip(grads, vjp_ref(g)):
    assert got.dtype == want.dtype == jnp.bfloat16 and got.shape == want.shape
    # the cotangent is rounded to bf16 before the product (autocast's backward); the XLA autodiff keeps it fp32
    assert _rel(got.astype(jnp.float32), np.asarray(want.astype(jnp.float32), np.float64)) < 1e-2


def _has_custom_call(f, *args) -> bool:
  return 'jax_rlhf_bf16_gemm' in str(jax.make_jaxpr(f)(*args))


def test_path_choice_and_forced_fallback(monkeypatch, capsys):
  x, w = _operands(8, 16, 4, False, False)
  f = lambda x, w: kernels.bf16_dot(x, w)  # noqa: E731
  with kernels.mode('auto'):
    assert _has_custom_call(f, x, w) == ('amx_bf16' in gemm.cpu_flags())
    assert not _has_custom_call(f, x.astype(jnp.float32), w.astype(jnp.float32))  # fp32: always XLA
  with kernels.mode('xla'):
    assert not _has_custom_call(f, x, w)
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(x, w)), np.asarray(kernels.xla_dot(x, w)))
  assert 'bf16 matmuls run on XLA dot (forced' in capsys.readouterr().err
  monkeypatch.setattr(gemm, 'cpu_flags', lambda: {'avx2', 'avx512f'})  # a CPU without AMX / AVX512-BF16
  with kernels.mode('auto'):
    assert not _has_custom_call(f, x, w)
  assert 'this CPU has no AMX-BF16' in capsys.readouterr().err
  monkeypatch.setattr(gemm, 'cpu_flags', lambda: {'avx2', 'avx512f', 'avx512_bf16'})  # AMD EPYC: no AMX
  with kernels.mode('auto'):
    assert not _has_custom_call(f, x, w)
  assert 'AVX512-BF16 but no AMX' in capsys.readouterr().err
  monkeypatch.setattr(gemm, 'cpu_flags', lambda: {'avx512_bf16', 'amx_bf16', 'amx_tile'})  # a Xeon with AMX
  with kernels.mode('auto'):
    assert _has_custom_call(f, x, w)
  assert 'MKL cblas_gemm_bf16bf16f32 (AMX-BF16)' in capsys.readouterr().err
  monkeypatch.setenv('JAX_RLHF_BF16_GEMM', 'xla')
  kernels.set_mode(None)
  assert kernels.get_mode() == 'xla' and not _has_custom_call(f, x, w)
  monkeypatch.delenv('JAX_RLHF_BF16_GEMM')
  kernels.set_mode(None)


def test_fallback_without_mkl(monkeypatch):
  def missing():
    raise build.KernelUnavailable('MKL not found')
  monkeypatch.setattr(build, 'find_mkl', missing)
  monkeypatch.setattr(build, '_LOADED', {})
  x, w = _operands(4, 8, 2, False, False)
  with kernels.mode('auto'):
    assert not _has_custom_call(lambda x, w: kernels.bf16_dot(x, w), x, w)


def test_builds_from_an_empty_cache(tmp_path, monkeypatch):
  monkeypatch.setenv('JAX_RLHF_KERNEL_CACHE', str(tmp_path))
  path = build.build()
  assert path.startswith(str(tmp_path)) and path.endswith('.so')
  assert build.build() == path  # cached: same key, no rebuild


@pytest.mark.parametrize('trans_a,trans_b,spec_a,spec_b', [
    (False, False, P(('data', 'fsdp'), None), P(None, 'model')),   # forward: tokens x weight
    (False, True, P(('data', 'fsdp'), 'model'), P(None, 'model')),  # dx = g w^T: contraction sharded alike
    (True, False, P(('data', 'fsdp'), None), P(('data', 'fsdp'), 'model')),  # dw = x^T g: tokens contracted
    (False, False, P('data', 'fsdp'), P('fsdp', None)),            # FSDP-sharded contraction
])
def test_gemm_under_the_8_device_mesh(trans_a, trans_b, spec_a, spec_b):
  mesh = shd.make_mesh((2, 2, 2))
  a, b = _operands(16, 24, 8, trans_a, trans_b, seed=3)
  a = jax.device_put(a, NamedSharding(mesh, spec_a))
  b = jax.device_put(b, NamedSharding(mesh, spec_b))
  y = jax.jit(lambda a, b: kernels.gemm_bf16(a, b, trans_a=trans_a, trans_b=trans_b))(a, b)
  assert _rel(y, _reference(a, b, trans_a, trans_b)) < 1e-3


# ----------------------------------------------------------------------------------------------------
# Wired into the model: dense (q, k, v, o, MLP) and the tied head, bf16 compute over fp32 master weights
# ----------------------------------------------------------------------------------------------------

def _lm_steps(cfg, mesh_shape, gemm_mode, steps=2):
  """(losses, gradient norms, params after `steps` AdamW steps, the compiled step's HLO text)."""
  import ml_collections
  from flax import nnx

  from jax_rlhf.models.transformer import Transformer
  from jax_rlhf.train import lm
  from jax_rlhf.train import state as st
  opt = ml_collections.ConfigDict(dict(lr=3e-3, b1=0.9, b2=0.95, eps=1e-3, weight_decay=0.01, schedule='constant',
                                       end_lr_frac=1.0, warmup_steps=0, grad_clip=0.0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, cfg.vocab_size, (8, 17)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[:3, 12:] = 0
  batch = {'tokens': tokens, 'attention_mask': mask, 'loss_mask': mask}
  mesh = shd.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
  with kernels.mode(gemm_mode):
    tx = st.make_optimizer(opt, 10)
    graphdef, state, shardings = st.create_state(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), tx, mesh)
    b = shd.put_batch(batch, mesh)
    step = lm.jit_lm_step(graphdef, tx, shardings, mesh).lower(state, b, jax.random.key(1)).compile()
    losses, norms = [], []
    for _ in range(steps):
      state, metrics = step(state, b, jax.random.key(1))
      losses.append(float(metrics['loss']))
      norms.append(float(metrics['grad_norm']))
  return losses, norms, jax.tree.map(np.asarray, state.params), step.as_text()


@pytest.fixture(scope='module')
def xla_bf16_step():
  """The reference: the XLA bf16 LM step on one device (XLA's own 8-device bf16 step is further from it than
  the MKL one: its bias gradients are summed across devices in bf16, ~1e-2 off)."""
  from jax_rlhf.models.transformer_config import preset
  cfg = preset('tiny', dtype='bfloat16', param_dtype='float32')
  return cfg, _lm_steps(cfg, (1, 1, 1), 'xla')


@pytest.mark.parametrize('mesh_shape', [(1, 1, 1), (2, 2, 2)])
def test_bf16_lm_step_on_amx_equals_xla_bf16_step(mesh_shape, xla_bf16_step):
  cfg, (l_x, n_x, p_x, t_x) = xla_bf16_step
  l_m, n_m, p_m, t_m = _lm_steps(cfg, mesh_shape, 'mkl')  # forced: auto takes it on AMX CPUs only
  assert 'jax_rlhf_bf16_gemm' in t_m and 'jax_rlhf_bf16_gemm' not in t_x  # MKL really ran (per device)
  np.testing.assert_allclose(l_m, l_x, rtol=1e-2)
  np.testing.assert_allclose(n_m, n_x, rtol=2e-2)
  assert l_m[1] < l_m[0]
  for a, b in zip(jax.tree.leaves(p_x), jax.tree.leaves(p_m)):
    assert b.dtype == np.float32  # fp32 master weights
    # two AdamW steps of lr 3e-3 move a weight by up to 6e-3, whatever the size of its gradient, so a gradient
    # near 0 whose sign bf16 rounding flips moves up to 2 x 6e-3 apart. Matrices (the products under test): all
    # within that, and all but 0.2% within 5e-4 (the MKL kernel on AMX and on AVX512-BF16 accumulates in
    # another order than XLA); biases and norm scales, whose gradients are bf16 token sums that XLA reduces
    # across the 8 devices in bf16 in either path, to 2e-3
    np.testing.assert_allclose(b, a, atol=1.2e-2)
    if a.ndim >= 2:
      assert np.mean(np.abs(b - a) > 5e-4) < 2e-3, np.abs(b - a).max()
    else:
      np.testing.assert_allclose(b, a, atol=2e-3)


def test_fp32_model_never_takes_the_gemm():
  from flax import nnx

  from jax_rlhf.models.transformer import Transformer

  from jax_rlhf.models.transformer_config import preset
  model = Transformer(preset('tiny'), rngs=nnx.Rngs(0))
  tokens = jnp.ones((2, 8), jnp.int32)
  with kernels.mode('auto'):
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda m: m(tokens).sum()))(model))
  assert 'jax_rlhf_bf16_gemm' not in jaxpr and 'bf16' not in jaxpr


def test_cpu_bf16_preset_sets_bf16_compute_only_where_the_matrix_unit_runs():
  from jax_rlhf.config import stage_config
  from jax_rlhf.variants import apply_cpu_bf16
  c = apply_cpu_bf16(stage_config('pipeline'))
  assert not c.model.cpu_bf16 and c.model.dtype == 'float32'  # off by default: the fp32 demo is unchanged
  with kernels.mode('mkl'):  # where the matrix unit runs (auto: a CPU with AMX)
    c = apply_cpu_bf16(stage_config('pipeline', 'cpu_bf16'))
  assert (c.model.dtype, c.model.param_dtype) == ('bfloat16', 'float32')
  with kernels.mode('auto'):
    c = apply_cpu_bf16(stage_config('pipeline', 'cpu_bf16'))
  assert (c.model.dtype == 'bfloat16') == ('amx_bf16' in kernels.cpu_flags())
  with kernels.mode('xla'):  # a CPU without it (or TPU/GPU): left as it is
    c = apply_cpu_bf16(stage_config('pipeline', 'cpu_bf16'))
  assert c.model.dtype == 'float32'
