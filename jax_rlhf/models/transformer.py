"""A decoder-only transformer for GPT-2 and Llama/Qwen2 layouts, in Flax NNX.

One `TransformerConfig` covers both layouts:
  gpt2:  learned positions, LayerNorm, GELU (tanh approximation), tied embeddings, biases everywhere.
  llama: RoPE, RMSNorm, SwiGLU, grouped-query attention, untied LM head; `qkv_bias` for Qwen2.

Every parameter carries *logical* axis names (`vocab`, `embed`, `mlp`, `heads`, `kv`, `norm`); the mesh
axes they map to live in one rules table (`jax_rlhf.sharding`). Model math never names a mesh axis.

Positions come from the attention mask (cumulative sum), so a left-padded prompt gets the positions of the
same prompt unpadded. The KV cache is an explicit pytree (`init_cache`), so the sampler can carry it
through `lax.while_loop`; the model writes the new keys/values at `cache_index` and attends to every
cache slot that is both valid (`attention_mask`) and not in the future.

Usage (functional core): `graphdef, state = nnx.split(model)` once; jitted functions take `state` and
call `nnx.merge(graphdef, state)` inside.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jax_rlhf import kernels

Cache = list  # one {'k': [B, Hkv, Dh, S], 'v': [B, Hkv, S, Dh]} per layer (the layouts the attention dots read)

LAYOUTS = ('gpt2', 'llama')


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Shape and numerics of the decoder. Defaults are GPT-2 layout, the yardstick's tiny size."""
  vocab_size: int = 4096
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int | None = None    # None: = num_heads (no grouped-query attention)
  embed_dim: int = 256
  mlp_dim: int | None = None         # None: 4 * embed_dim
  head_dim: int | None = None        # None: embed_dim // num_heads
  max_len: int = 256                 # learned positions (gpt2); RoPE models only use it as the default cache size
  layout: str = 'gpt2'               # 'gpt2' | 'llama' (Llama, Qwen2, Mistral-style)
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  qkv_bias: bool = False             # Qwen2: biases on q/k/v only (gpt2 always has biases)
  tie_embeddings: bool = True        # GPT-2 ties the LM head to the token embedding
  activation: str = 'gelu_new'       # gpt2: gelu_new (tanh approximation); llama: silu
  dropout_rate: float = 0.0          # residual/attention/embedding dropout; only applied when a dropout key is given
  dtype: str = 'float32'             # compute dtype ('bfloat16' on accelerators)
  param_dtype: str = 'float32'       # parameter storage dtype
  initializer_range: float = 0.02    # N(0, 0.02) init, as GPT-2
  pad_token_id: int = 1
  eos_token_id: int = 0
  bos_token_id: int = 0

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ValueError(f'model layout must be one of {LAYOUTS}, got {self.layout!r}')
    if self.num_heads % self.kv_heads:
      raise ValueError(f'num_heads={self.num_heads} is not a multiple of num_kv_heads={self.kv_heads}')

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def hdim(self) -> int:
    return self.head_dim or self.embed_dim // self.num_heads

  @property
  def ffn_dim(self) -> int:
    return self.mlp_dim or 4 * self.embed_dim

  def replace(self, **kw) -> 'TransformerConfig':
    return dataclasses.replace(self, **kw)

  def num_params(self, lm_head: bool = True) -> int:
    d, f, v, h, kv, dh = self.embed_dim, self.ffn_dim, self.vocab_size, self.num_heads, self.kv_heads, self.hdim
    if self.layout == 'gpt2':
      per_layer = 4 * d + d * (h + 2 * kv) * dh + (h + 2 * kv) * dh + h * dh * d + d + 2 * d * f + f + d
      rest = v * d + self.max_len * d + 2 * d
    else:
      per_layer = 2 * d + d * (h + 2 * kv) * dh + (h + 2 * kv) * dh * self.qkv_bias + h * dh * d + 3 * d * f
      rest = v * d + d
    head = v * d if (lm_head and not self.tie_embeddings) else 0
    return self.num_layers * per_layer + rest + head


# Presets. `tiny` is for tests, `demo` for the embedded task, the rest are the real GPT-2 sizes.
PRESETS: dict[str, dict[str, Any]] = {
    'tiny': dict(vocab_size=512, num_layers=2, num_heads=4, embed_dim=64, max_len=128),
    # Llama layout (RoPE, RMSNorm, SwiGLU of the GPT-2 MLP's size): on instruct_world it learns the list tasks
    # far better than the GPT-2 layout of the same size (SFT held-out loss 0.47 vs 0.60, twice the exact answers).
    'demo': dict(vocab_size=512, num_layers=4, num_heads=4, embed_dim=128, max_len=128, layout='llama',
                 mlp_dim=344, activation='silu'),
    'yardstick': dict(vocab_size=4096, num_layers=4, num_heads=4, embed_dim=256, max_len=256),
    'gpt2': dict(vocab_size=50257, num_layers=12, num_heads=12, embed_dim=768, max_len=1024, eos_token_id=50256,
                 bos_token_id=50256, pad_token_id=50256),
    'gpt2-medium': dict(vocab_size=50257, num_layers=24, num_heads=16, embed_dim=1024, max_len=1024,
                        eos_token_id=50256, bos_token_id=50256, pad_token_id=50256),
}


def preset(name: str, **overrides) -> TransformerConfig:
  if name not in PRESETS:
    raise ValueError(f'unknown model preset {name!r}; known: {sorted(PRESETS)}')
  return TransformerConfig(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------------------------------
# Parameters and small layers
# ----------------------------------------------------------------------------------------------------

def _param(rngs: nnx.Rngs, shape, axes, cfg: TransformerConfig, *, init='normal', std=None) -> nnx.Param:
  dtype = jnp.dtype(cfg.param_dtype)
  if init == 'zeros':
    value = jnp.zeros(shape, dtype)
  elif init == 'ones':
    value = jnp.ones(shape, dtype)
  else:
    std = cfg.initializer_range if std is None else std
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def _dropout(x, rate: float, key):
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Norm(nnx.Module):
  """LayerNorm (gpt2) or RMSNorm (llama), computed in float32."""

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    self.rms = cfg.layout == 'llama'
    self.eps = cfg.norm_eps
    self.scale = _param(rngs, (cfg.embed_dim,), ('norm',), cfg, init='ones')
    if not self.rms:
      self.bias = _param(rngs, (cfg.embed_dim,), ('norm',), cfg, init='zeros')

  def __call__(self, x):
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if self.rms:
      y = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps) * self.scale[...].astype(jnp.float32)
    else:
      mu = jnp.mean(x, -1, keepdims=True)
      var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
      y = (x - mu) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
    return y.astype(dtype)


def rope(x, positions, theta: float):
  """Rotary position embedding, HF's non-interleaved (rotate_half) convention. x: [B, T, H, Dh]."""
  dh = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))  # [Dh/2]
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  emb = jnp.concatenate([freqs, freqs], -1)[:, :, None, :]  # [B, T, 1, Dh]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], -1)
  return (x32 * jnp.cos(emb) + rotated * jnp.sin(emb)).astype(x.dtype)


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


class Attention(nnx.Module):

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, kv, dh = cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.hdim
    out_std = cfg.initializer_range / math.sqrt(2 * cfg.num_layers) if cfg.layout == 'gpt2' else None
    self.q = _param(rngs, (d, h, dh), ('embed', 'heads', 'kv'), cfg)
    self.k = _param(rngs, (d, kv, dh), ('embed', 'heads', 'kv'), cfg)
    self.v = _param(rngs, (d, kv, dh), ('embed', 'heads', 'kv'), cfg)
    self.o = _param(rngs, (h, dh, d), ('heads', 'kv', 'embed'), cfg, std=out_std)
    self.has_qkv_bias = cfg.layout == 'gpt2' or cfg.qkv_bias
    if self.has_qkv_bias:
      self.q_bias = _param(rngs, (h, dh), ('heads', 'kv'), cfg, init='zeros')
      self.k_bias = _param(rngs, (kv, dh), ('heads', 'kv'), cfg, init='zeros')
      self.v_bias = _param(rngs, (kv, dh), ('heads', 'kv'), cfg, init='zeros')
    if cfg.layout == 'gpt2':
      self.o_bias = _param(rngs, (d,), ('embed',), cfg, init='zeros')

  def __call__(self, x, positions, mask, layer_cache, cache_index, dropout_key):
    """x: [B, T, D]; positions: [B, T]; mask: [B, 1, T, S] bool. Returns (y [B, T, D], new layer cache)."""
    cfg, dt = self.cfg, x.dtype
    b, t, d = x.shape
    h, kv, dh = cfg.num_heads, cfg.kv_heads, cfg.hdim
    q = dense(x, self.q[...].astype(dt).reshape(d, h * dh)).reshape(b, t, h, dh)
    k = dense(x, self.k[...].astype(dt).reshape(d, kv * dh)).reshape(b, t, kv, dh)
    v = dense(x, self.v[...].astype(dt).reshape(d, kv * dh)).reshape(b, t, kv, dh)
    if self.has_qkv_bias:
      q, k, v = (add_bias(q, self.q_bias[...].astype(dt)), add_bias(k, self.k_bias[...].astype(dt)),
                 add_bias(v, self.v_bias[...].astype(dt)))
    if cfg.layout == 'llama':
      q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
    if layer_cache is None:
      y = jax.nn.dot_product_attention(q, k, v, mask=mask)  # [B, T, H, Dh]; GQA when Hkv < H
    else:
      k = jax.lax.dynamic_update_slice(layer_cache['k'], k.transpose(0, 2, 3, 1).astype(layer_cache['k'].dtype),
                                       (0, 0, 0, cache_index))  # [B, Hkv, Dh, S]
      v = jax.lax.dynamic_update_slice(layer_cache['v'], v.transpose(0, 2, 1, 3).astype(layer_cache['v'].dtype),
                                       (0, 0, cache_index, 0))  # [B, Hkv, S, Dh]
      layer_cache = {'k': k, 'v': v}
      y = attend(q, k.astype(dt), v.astype(dt), mask)  # [B, T, H, Dh]
    y = dense(y.reshape(b, t, h * dh), self.o[...].astype(dt).reshape(h * dh, d))
    if cfg.layout == 'gpt2':
      y = add_bias(y, self.o_bias[...].astype(dt))
    return _dropout(y, cfg.dropout_rate, dropout_key), layer_cache


def attend(q, k, v, mask):
  """Scaled dot-product attention with grouped-query heads, softmax in float32.

  q: [B, T, H, Dh]; k: [B, Hkv, Dh, S] (keys transposed); v: [B, Hkv, S, Dh]; mask: [B, 1, T, S] bool.
  Returns [B, T, H, Dh]. The KV cache keeps keys and values head-major (keys transposed) so that both dots
  read it in place: on XLA:CPU the [B, S, H, Dh] layout cost a transposed copy of the whole cache at every
  decode step. Same math as `jax.nn.dot_product_attention`, which the cache-free forward uses.
  """
  b, t, h, dh = q.shape
  hkv = k.shape[1]
  g = h // hkv
  q = q.reshape(b, t, hkv, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * t, dh)  # [B, Hkv, G*T, Dh]
  scores = jnp.einsum('bhqd,bhds->bhqs', q, k, preferred_element_type=jnp.float32)  # [B, Hkv, G*T, S]
  scores = scores.reshape(b, hkv, g, t, -1) * (1.0 / math.sqrt(dh))
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, hkv, g * t, -1)
  y = jnp.einsum('bhqs,bhsd->bhqd', probs, v)  # [B, Hkv, G*T, Dh]
  return y.reshape(b, hkv, g, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


class MLP(nnx.Module):

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, f = cfg.embed_dim, cfg.ffn_dim
    out_std = cfg.initializer_range / math.sqrt(2 * cfg.num_layers) if cfg.layout == 'gpt2' else None
    if cfg.layout == 'gpt2':
      self.fc = _param(rngs, (d, f), ('embed', 'mlp'), cfg)
      self.fc_bias = _param(rngs, (f,), ('mlp',), cfg, init='zeros')
      self.proj = _param(rngs, (f, d), ('mlp', 'embed'), cfg, std=out_std)
      self.proj_bias = _param(rngs, (d,), ('embed',), cfg, init='zeros')
    else:
      self.gate = _param(rngs, (d, f), ('embed', 'mlp'), cfg)
      self.up = _param(rngs, (d, f), ('embed', 'mlp'), cfg)
      self.down = _param(rngs, (f, d), ('mlp', 'embed'), cfg)

  def _act(self, x):
    if self.cfg.activation == 'gelu_new':
      return jax.nn.gelu(x, approximate=True)
    if self.cfg.activation == 'gelu':
      return jax.nn.gelu(x, approximate=False)
    if self.cfg.activation == 'silu':
      return jax.nn.silu(x)
    raise ValueError(f'unknown activation {self.cfg.activation!r}')

  def __call__(self, x, dropout_key):
    dt = x.dtype
    if self.cfg.layout == 'gpt2':
      h = self._act(add_bias(dense(x, self.fc[...].astype(dt)), self.fc_bias[...].astype(dt)))
      y = add_bias(dense(h, self.proj[...].astype(dt)), self.proj_bias[...].astype(dt))
    else:
      h = self._act(dense(x, self.gate[...].astype(dt))) * dense(x, self.up[...].astype(dt))
      y = dense(h, self.down[...].astype(dt))
    return _dropout(y, self.cfg.dropout_rate, dropout_key)


class Block(nnx.Module):

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    self.ln1 = Norm(cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.ln2 = Norm(cfg, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, mask, layer_cache, cache_index, dropout_key):
    k1 = k2 = None
    if dropout_key is not None:
      k1, k2 = jax.random.split(dropout_key)
    y, layer_cache = self.attn(self.ln1(x), positions, mask, layer_cache, cache_index, k1)
    x = x + y
    x = x + self.mlp(self.ln2(x), k2)
    return x, layer_cache


# ----------------------------------------------------------------------------------------------------
# The decoder
# ----------------------------------------------------------------------------------------------------

def positions_from_mask(attention_mask):
  """Position of each token = number of real tokens before it (left padding does not shift positions)."""
  m = attention_mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


def init_cache(cfg: TransformerConfig, batch: int, length: int, dtype=None) -> Cache:
  """A zero KV cache of `length` slots for every layer: [{'k': [B, Hkv, Dh, S], 'v': [B, Hkv, S, Dh]}]."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  k_shape = (batch, cfg.kv_heads, cfg.hdim, length)
  v_shape = (batch, cfg.kv_heads, length, cfg.hdim)
  return [{'k': jnp.zeros(k_shape, dtype), 'v': jnp.zeros(v_shape, dtype)} for _ in range(cfg.num_layers)]


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


class Transformer(nnx.Module):
  """Decoder-only LM. `__call__(input_ids, attention_mask)` returns float32 logits [B, T, V]."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs, lm_head: bool = True):
    self.config = cfg
    self.wte = _param(rngs, (cfg.vocab_size, cfg.embed_dim), ('vocab', 'embed'), cfg)
    if cfg.layout == 'gpt2':
      self.wpe = _param(rngs, (cfg.max_len, cfg.embed_dim), (None, 'embed'), cfg, std=0.01)
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.ln_f = Norm(cfg, rngs)
    self.has_lm_head = lm_head and not cfg.tie_embeddings
    if self.has_lm_head:
      self.lm_head = _param(rngs, (cfg.embed_dim, cfg.vocab_size), ('embed', 'vocab'), cfg)

  def hidden_states(self, input_ids, attention_mask=None, positions=None, cache: Cache | None = None,
                    cache_index=0, dropout_key=None):
    """Final-norm hidden states [B, T, D] and the updated cache.

    input_ids: [B, T]. Without a cache, attention_mask is [B, T] (1 = real token) and positions default to
    its cumulative sum. With a cache of S slots, the T new tokens are written at slots
    [cache_index, cache_index + T), attention_mask is [B, S] (which slots hold real tokens, including the
    new ones) and positions [B, T] must be given.
    """
    cfg = self.config
    b, t = input_ids.shape
    dt = jnp.dtype(cfg.dtype)
    if cache is None:
      if attention_mask is None:
        attention_mask = jnp.ones((b, t), jnp.int32)
      if positions is None:
        positions = positions_from_mask(attention_mask)
      q_slots = jnp.arange(t)
      s = t
    else:
      if attention_mask is None or positions is None:
        raise ValueError('decoding with a cache needs the [B, S] slot mask and the [B, T] positions')
      s = cache[0]['v'].shape[2]
      q_slots = cache_index + jnp.arange(t)
    key_ok = attention_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, S]
    causal = jnp.arange(s)[None, :] <= q_slots[:, None]  # [T, S]
    own = jnp.arange(s)[None, :] == q_slots[:, None]  # a pad query attends to itself: no empty rows
    mask = (key_ok & causal[None, None]) | own[None, None]  # [B, 1, T, S]

    x = self.wte[...].astype(dt)[input_ids]
    if cfg.layout == 'gpt2':
      x = x + self.wpe[...].astype(dt)[positions]
    keys = [None] * (cfg.num_layers + 1)
    if dropout_key is not None and cfg.dropout_rate > 0:
      keys = list(jax.random.split(dropout_key, cfg.num_layers + 1))
    x = _dropout(x, cfg.dropout_rate, keys[-1])
    new_cache = [] if cache is not None else None
    for i, block in enumerate(self.blocks):
      x, layer_cache = block(x, positions, mask, None if cache is None else cache[i], cache_index, keys[i])
      if cache is not None:
        new_cache.append(layer_cache)
    return self.ln_f(x), new_cache

  def logits(self, h):
    """LM head on hidden states, float32 logits [..., V]."""
    if self.has_lm_head:
      return jnp.einsum('...d,dv->...v', h, self.lm_head[...].astype(h.dtype), preferred_element_type=jnp.float32)
    return tied_logits(h, self.wte[...].astype(h.dtype))

  def __call__(self, input_ids, attention_mask=None, positions=None, dropout_key=None):
    h, _ = self.hidden_states(input_ids, attention_mask, positions, dropout_key=dropout_key)
    return self.logits(h)
