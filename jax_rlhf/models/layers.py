"""The decoder's layers: parameters with logical axis names, Norm, RoPE, Attention, MLP and the residual Block.

Every parameter carries *logical* axis names (`vocab`, `embed`, `mlp`, `heads`, `kv`, `norm`); the mesh
axes they map to live in one rules table (`jax_rlhf.sharding`). Model math never names a mesh axis.
`project` is every projection's `dense` plus its LoRA adapter where one is attached (`jax_rlhf.models.lora`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_rlhf.models.matmuls import add_bias, dense
from jax_rlhf.models.transformer_config import TransformerConfig


def param(rngs: nnx.Rngs, shape, axes, cfg: TransformerConfig, *, init='normal', std=None) -> nnx.Param:
  dtype = jnp.dtype(cfg.param_dtype)
  if init == 'zeros':
    value = jnp.zeros(shape, dtype)
  elif init == 'ones':
    value = jnp.ones(shape, dtype)
  else:
    std = cfg.initializer_range if std is None else std
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def dropout(x, rate: float, key):
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Norm(nnx.Module):
  """LayerNorm (gpt2) or RMSNorm (llama), computed in float32."""

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs, dim: int | None = None):
    self.rms = cfg.layout == 'llama'
    self.eps = cfg.norm_eps
    dim = dim or cfg.embed_dim
    self.scale = param(rngs, (dim,), ('norm',), cfg, init='ones')
    if not self.rms:
      self.bias = param(rngs, (dim,), ('norm',), cfg, init='zeros')

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


def rope_inv_freq(cfg: TransformerConfig, positions=None):
  """RoPE inverse frequencies [Dh/2] (float32) with transformers' scalings (`modeling_rope_utils`, v5):

    default: theta^(-2i/Dh).
    linear:  default / factor (positions divided by the factor).
    llama3:  Llama 3.1's band-wise scaling (`_compute_llama3_parameters`): wavelengths 2 pi / f longer than
             original_max_len / low_freq_factor are divided by factor, those shorter than
             original_max_len / high_freq_factor kept, those between interpolated by
             s = (original_max_len / wavelen - low) / (high - low): f' = (1 - s) f / factor + s f.
    dynamic: NTK-aware (`_compute_dynamic_ntk_parameters`): the base becomes
             theta * (factor * L / max_len - (factor - 1))^(Dh / (Dh - 2)) with L = max(seq_len, max_len) and
             seq_len = max(positions) + 1 over the whole batch (traced), which is what transformers' rotary
             module computes for a call on a fresh model. Stateless here: transformers also caches the
             largest seq_len seen and keeps its frequencies for later calls that are shorter but still beyond
             max_len; we do not. In a KV-cached decode the new tokens are rotated with the frequencies of
             their own positions and the cached keys keep theirs, as transformers' generate does.
  """
  dh = cfg.hdim
  exponent = np.arange(0, dh, 2, dtype=np.float32) / np.float32(dh)
  if cfg.rope_type == 'dynamic':
    if positions is None:
      raise ValueError('dynamic RoPE needs the positions (its base depends on the sequence length)')
    seq_len = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1.0, float(cfg.max_len))
    base = cfg.rope_theta * (cfg.rope_factor * seq_len / cfg.max_len - (cfg.rope_factor - 1)) ** (dh / (dh - 2))
    return 1.0 / (base ** jnp.asarray(exponent))
  inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)  # float32, as transformers
  if cfg.rope_type == 'linear':
    inv_freq = inv_freq / np.float32(cfg.rope_factor)
  elif cfg.rope_type == 'llama3':
    factor, low, high, old = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_len
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
  return jnp.asarray(inv_freq)


def rope(x, positions, theta: float | None = None, inv_freq=None):
  """Rotary position embedding, HF's non-interleaved (rotate_half) convention. x: [B, T, H, Dh].

  inv_freq [Dh/2] (from `rope_inv_freq`); without it, plain RoPE of base `theta`.
  """
  dh = x.shape[-1]
  if inv_freq is None:
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))  # [Dh/2]
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  emb = jnp.concatenate([freqs, freqs], -1)[:, :, None, :]  # [B, T, 1, Dh]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], -1)
  return (x32 * jnp.cos(emb) + rotated * jnp.sin(emb)).astype(x.dtype)


def project(module, target: str, x, w, dropout_key=None):
  """dense(x, w) for the projection `target` (q, k, v, o, gate, up, down) of `module`, plus its LoRA adapter
  `module.lora_<target>` where one is attached and on (`jax_rlhf.models.lora`)."""
  y = dense(x, w)
  adapter = getattr(module, 'lora_' + target, None)
  if adapter is not None and adapter.enabled:
    key = None if dropout_key is None else jax.random.fold_in(dropout_key, TARGET_IDS[target])
    y = y + adapter(x, key).astype(y.dtype)
  return y


TARGET_IDS = {t: i for i, t in enumerate(('q', 'k', 'v', 'o', 'gate', 'up', 'down'))}


class Attention(nnx.Module):

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, kv, dh = cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.hdim
    out_std = cfg.initializer_range / math.sqrt(2 * cfg.num_layers) if cfg.layout == 'gpt2' else None
    self.q = param(rngs, (d, h, dh), ('embed', 'heads', 'kv'), cfg)
    self.k = param(rngs, (d, kv, dh), ('embed', 'heads', 'kv'), cfg)
    self.v = param(rngs, (d, kv, dh), ('embed', 'heads', 'kv'), cfg)
    self.o = param(rngs, (h, dh, d), ('heads', 'kv', 'embed'), cfg, std=out_std)
    self.has_qkv_bias = cfg.layout == 'gpt2' or cfg.qkv_bias
    if self.has_qkv_bias:
      self.q_bias = param(rngs, (h, dh), ('heads', 'kv'), cfg, init='zeros')
      self.k_bias = param(rngs, (kv, dh), ('heads', 'kv'), cfg, init='zeros')
      self.v_bias = param(rngs, (kv, dh), ('heads', 'kv'), cfg, init='zeros')
    if cfg.layout == 'gpt2':
      self.o_bias = param(rngs, (d,), ('embed',), cfg, init='zeros')
    if cfg.qk_norm:
      self.q_norm = Norm(cfg, rngs, dh)
      self.k_norm = Norm(cfg, rngs, dh)

  def __call__(self, x, positions, mask, layer_cache, cache_index, dropout_key):
    """x: [B, T, D]; positions: [B, T]; mask: [B, 1, T, S] bool. Returns (y [B, T, D], new layer cache)."""
    cfg, dt = self.cfg, x.dtype
    b, t, d = x.shape
    h, kv, dh = cfg.num_heads, cfg.kv_heads, cfg.hdim
    q = project(self, 'q', x, self.q[...].astype(dt).reshape(d, h * dh), dropout_key).reshape(b, t, h, dh)
    k = project(self, 'k', x, self.k[...].astype(dt).reshape(d, kv * dh), dropout_key).reshape(b, t, kv, dh)
    v = project(self, 'v', x, self.v[...].astype(dt).reshape(d, kv * dh), dropout_key).reshape(b, t, kv, dh)
    if self.has_qkv_bias:
      q, k, v = (add_bias(q, self.q_bias[...].astype(dt)), add_bias(k, self.k_bias[...].astype(dt)),
                 add_bias(v, self.v_bias[...].astype(dt)))
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    if cfg.layout == 'llama':
      # plain RoPE keeps its in-graph frequencies (bitwise the numbers every earlier run trained with); the
      # scalings take transformers' float32 frequencies from `rope_inv_freq`
      inv_freq = None if cfg.rope_type == 'default' else rope_inv_freq(cfg, positions)
      q = rope(q, positions, cfg.rope_theta, inv_freq=inv_freq)
      k = rope(k, positions, cfg.rope_theta, inv_freq=inv_freq)
    if layer_cache is None:
      y = jax.nn.dot_product_attention(q, k, v, mask=mask)  # [B, T, H, Dh]; GQA when Hkv < H
    else:
      k = jax.lax.dynamic_update_slice(layer_cache['k'], k.transpose(0, 2, 3, 1).astype(layer_cache['k'].dtype),
                                       (0, 0, 0, cache_index))  # [B, Hkv, Dh, S]
      v = jax.lax.dynamic_update_slice(layer_cache['v'], v.transpose(0, 2, 1, 3).astype(layer_cache['v'].dtype),
                                       (0, 0, cache_index, 0))  # [B, Hkv, S, Dh]
      layer_cache = {'k': k, 'v': v}
      y = attend(q, k.astype(dt), v.astype(dt), mask)  # [B, T, H, Dh]
    y = project(self, 'o', y.reshape(b, t, h * dh), self.o[...].astype(dt).reshape(h * dh, d), dropout_key)
    if cfg.layout == 'gpt2':
      y = add_bias(y, self.o_bias[...].astype(dt))
    return dropout(y, cfg.dropout_rate, dropout_key), layer_cache


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
      self.fc = param(rngs, (d, f), ('embed', 'mlp'), cfg)
      self.fc_bias = param(rngs, (f,), ('mlp',), cfg, init='zeros')
      self.proj = param(rngs, (f, d), ('mlp', 'embed'), cfg, std=out_std)
      self.proj_bias = param(rngs, (d,), ('embed',), cfg, init='zeros')
    else:
      self.gate = param(rngs, (d, f), ('embed', 'mlp'), cfg)
      self.up = param(rngs, (d, f), ('embed', 'mlp'), cfg)
      self.down = param(rngs, (f, d), ('mlp', 'embed'), cfg)

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
      h = self._act(add_bias(project(self, 'up', x, self.fc[...].astype(dt), dropout_key),
                             self.fc_bias[...].astype(dt)))
      y = add_bias(project(self, 'down', h, self.proj[...].astype(dt), dropout_key), self.proj_bias[...].astype(dt))
    else:
      h = (self._act(project(self, 'gate', x, self.gate[...].astype(dt), dropout_key))
           * project(self, 'up', x, self.up[...].astype(dt), dropout_key))
      y = project(self, 'down', h, self.down[...].astype(dt), dropout_key)
    return dropout(y, self.cfg.dropout_rate, dropout_key)


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
