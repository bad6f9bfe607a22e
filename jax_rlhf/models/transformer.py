"""A decoder-only transformer for GPT-2 and Llama/Qwen2/Qwen3/Mistral layouts, in Flax NNX.

One `TransformerConfig` covers both layouts:
  gpt2:  learned positions, LayerNorm, GELU (tanh approximation), tied embeddings, biases everywhere.
  llama: RoPE, RMSNorm, SwiGLU, grouped-query attention, untied LM head; `qkv_bias` for Qwen2, `qk_norm` for
         Qwen3 (RMSNorm of each head's q and k before RoPE), `sliding_window` for Mistral, and RoPE frequency
         scaling `rope_type` in linear | dynamic | llama3 (Llama 3.x), as transformers defines them.

Every parameter carries *logical* axis names (`vocab`, `embed`, `mlp`, `heads`, `kv`, `norm`); the mesh
axes they map to live in one rules table (`jax_rlhf.sharding`). Model math never names a mesh axis.

Positions come from the attention mask (cumulative sum), so a left-padded prompt gets the positions of the
same prompt unpadded. The KV cache is an explicit pytree (`init_cache`), so the sampler can carry it
through `lax.while_loop`; the model writes the new keys/values at `cache_index` and attends to every
cache slot that is both valid (`attention_mask`) and not in the future.

Memory and compile time at depth (`remat`, `scan_layers`): `remat` wraps each block's training forward in
`jax.checkpoint` (full: only the block's input is kept for the backward pass, the rest is recomputed;
dots_saveable: the matmul outputs are kept, the elementwise work is recomputed). `scan_layers` keeps the blocks
as one `Block` whose parameters have a leading [L] axis (logical name 'layers', never sharded) and runs them
with one `jax.lax.scan`, so a deep model is traced and compiled once per block instead of L times. Both give
the plain model's values; the scanned layout changes parameter paths (`blocks/attn/q` [L, D, H, Dh] instead of
`blocks/<i>/attn/q`): `stack_blocks` / `unstack_blocks` convert flat states, and `models.hf` reads and writes
either layout. The KV-cached decode runs in either layout (scanned: a stacked cache, see `init_cache`).
Measured on XLA:CPU (bench/remat.py): remat lowers the compiled step's temporary memory only together with
scan_layers; without scan the recomputation is in the program (optimization barriers and all) but the CPU
scheduler runs it early, so the step's temp bytes are those of remat=none. Use remat with scan_layers.

Usage (functional core): `graphdef, state = nnx.split(model)` once; jitted functions take `state` and
call `nnx.merge(graphdef, state)` inside.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_rlhf import kernels
from jax_rlhf import sharding as shd

# The residual stream's logical axes, pinned at every block boundary (`sharding.constrain`: rows over the batch
# axes under a stage's mesh, a no-op outside one).
RESIDUAL_AXES = ('batch', None, None)

# One {'k': [B, Hkv, Dh, S], 'v': [B, Hkv, S, Dh]} per layer (the layouts the attention dots read); with
# scan_layers one such dict whose arrays carry a leading [L] axis.
Cache = list | dict

LAYOUTS = ('gpt2', 'llama')
ROPE_TYPES = ('default', 'linear', 'dynamic', 'llama3')
# remat -> jax.checkpoint policy (None: save nothing, recompute the whole block in the backward pass).
REMAT_POLICIES = {'none': None, 'full': None, 'dots_saveable': jax.checkpoint_policies.dots_saveable}


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
  rope_type: str = 'default'         # RoPE frequency scaling: default | linear | dynamic (NTK) | llama3
  rope_factor: float = 1.0           # linear/dynamic/llama3: the context extension factor
  rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original_max_len / this are divided by factor
  rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original_max_len / this are kept
  rope_original_max_len: int = 8192  # llama3: original_max_position_embeddings (the pre-extension context)
  qkv_bias: bool = False             # Qwen2: biases on q/k/v only (gpt2 always has biases)
  qk_norm: bool = False              # Qwen3: RMSNorm over head_dim of every q and k head, before RoPE
  sliding_window: int | None = None  # Mistral: a query attends to at most this many slots (itself included)
  hf_model_type: str | None = None   # HF family saved as (set by hf.load_pretrained); None: from the layout
  remat: str = 'none'                # activation checkpointing per block in training: none | full | dots_saveable
  scan_layers: bool = False          # blocks stacked on a leading 'layers' axis and run by one lax.scan
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
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f'rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}')
    if self.layout == 'gpt2' and (self.qk_norm or self.rope_type != 'default'):
      raise ValueError('qk_norm and rope_type apply to the llama layout only')
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}')
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f'sliding_window must be >= 1 or None, got {self.sliding_window}')

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
      per_layer = (2 * d + d * (h + 2 * kv) * dh + (h + 2 * kv) * dh * self.qkv_bias + h * dh * d + 3 * d * f
                   + 2 * dh * self.qk_norm)
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
    # The families aligned now, from their config.json on the Hugging Face hub (meta-llama/Llama-3.2-1B,
    # Qwen/Qwen3-0.6B-Base, Qwen/Qwen3-1.7B-Base); fp32 like every preset (the training config sets dtypes).
    'llama-3.2-1b': dict(vocab_size=128256, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, embed_dim=2048,
                         mlp_dim=8192, max_len=131072, layout='llama', activation='silu', norm_eps=1e-5,
                         rope_theta=500000.0, rope_type='llama3', rope_factor=32.0, rope_low_freq_factor=1.0,
                         rope_high_freq_factor=4.0, rope_original_max_len=8192, tie_embeddings=True,
                         bos_token_id=128000, eos_token_id=128001, pad_token_id=128001, hf_model_type='llama'),
    # Meta-Llama-3-8B's config.json (meta-llama/Meta-Llama-3-8B on the hub; Llama 3 paper, table 3): untied head,
    # plain RoPE at theta 5e5, 8,192 positions. A shape for the memory plan (jax_rlhf/plan.py).
    'llama-3-8b': dict(vocab_size=128256, num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096, mlp_dim=14336,
                       max_len=8192, layout='llama', activation='silu', norm_eps=1e-5, rope_theta=500000.0,
                       tie_embeddings=False, bos_token_id=128000, eos_token_id=128001, pad_token_id=128001,
                       hf_model_type='llama'),
    'qwen3-0.6b': dict(vocab_size=151936, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, embed_dim=1024,
                       mlp_dim=3072, max_len=32768, layout='llama', activation='silu', norm_eps=1e-6,
                       rope_theta=1000000.0, qk_norm=True, tie_embeddings=True, bos_token_id=151643,
                       eos_token_id=151643, pad_token_id=151643, hf_model_type='qwen3'),
    'qwen3-1.7b': dict(vocab_size=151936, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, embed_dim=2048,
                       mlp_dim=6144, max_len=32768, layout='llama', activation='silu', norm_eps=1e-6,
                       rope_theta=1000000.0, qk_norm=True, tie_embeddings=True, bos_token_id=151643,
                       eos_token_id=151643, pad_token_id=151643, hf_model_type='qwen3'),
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

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs, dim: int | None = None):
    self.rms = cfg.layout == 'llama'
    self.eps = cfg.norm_eps
    dim = dim or cfg.embed_dim
    self.scale = _param(rngs, (dim,), ('norm',), cfg, init='ones')
    if not self.rms:
      self.bias = _param(rngs, (dim,), ('norm',), cfg, init='zeros')

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
      h = self._act(add_bias(project(self, 'up', x, self.fc[...].astype(dt), dropout_key),
                             self.fc_bias[...].astype(dt)))
      y = add_bias(project(self, 'down', h, self.proj[...].astype(dt), dropout_key), self.proj_bias[...].astype(dt))
    else:
      h = (self._act(project(self, 'gate', x, self.gate[...].astype(dt), dropout_key))
           * project(self, 'up', x, self.up[...].astype(dt), dropout_key))
      y = project(self, 'down', h, self.down[...].astype(dt), dropout_key)
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
  """A zero KV cache of `length` slots for every layer: [{'k': [B, Hkv, Dh, S], 'v': [B, Hkv, S, Dh]}], or
  with `cfg.scan_layers` one {'k': [L, B, Hkv, Dh, S], 'v': [L, B, Hkv, S, Dh]}."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  k_shape = (batch, cfg.kv_heads, cfg.hdim, length)
  v_shape = (batch, cfg.kv_heads, length, cfg.hdim)
  if cfg.scan_layers:
    n = cfg.num_layers
    return {'k': jnp.zeros((n,) + k_shape, dtype), 'v': jnp.zeros((n,) + v_shape, dtype)}
  return [{'k': jnp.zeros(k_shape, dtype), 'v': jnp.zeros(v_shape, dtype)} for _ in range(cfg.num_layers)]


def _cache_slots(cache: Cache) -> int:
  return cache['v'].shape[-2] if isinstance(cache, dict) else cache[0]['v'].shape[2]


def _stacked_blocks(blocks: list['Block']) -> 'Block':
  """One Block whose every parameter is the layers' parameters stacked on a new leading axis ('layers')."""
  graphdef, first = nnx.split(blocks[0])
  flats = [dict(nnx.to_flat_state(nnx.state(b))) for b in blocks]
  stacked = []
  for path, var in nnx.to_flat_state(first):
    meta = var.get_metadata()
    axes = ('layers',) + tuple(meta.get('out_sharding') or (None,) * var.get_value().ndim)
    stacked.append((path, var.replace(jnp.stack([f[path].get_value() for f in flats]), out_sharding=axes)))
  return nnx.merge(graphdef, nnx.from_flat_state(stacked))


def stack_blocks(flat: dict[tuple, Any], num_layers: int) -> dict[tuple, Any]:
  """A flat {path: array} state of the per-layer layout (`blocks/<i>/...`) -> the scanned layout
  (`blocks/...`, arrays stacked on a leading [L] axis). Paths outside the blocks pass through; a path may
  have a prefix (e.g. a ScalarModel's `transformer/`)."""
  out, groups = {}, {}
  for path, x in flat.items():
    i = path.index('blocks') if 'blocks' in path else -1
    if i >= 0 and i + 1 < len(path) and isinstance(path[i + 1], int):
      groups.setdefault(path[:i + 1] + path[i + 2:], {})[path[i + 1]] = x
    else:
      out[path] = x
  for path, layers in groups.items():
    if sorted(layers) != list(range(num_layers)):
      raise ValueError(f'{"/".join(map(str, path))}: layers {sorted(layers)}, expected 0..{num_layers - 1}')
    xs = [layers[i] for i in range(num_layers)]
    out[path] = np.stack(xs) if isinstance(xs[0], np.ndarray) else jnp.stack(xs)
  return out


def unstack_blocks(flat: dict[tuple, Any]) -> dict[tuple, Any]:
  """The inverse of `stack_blocks`: `blocks/...` [L, ...] -> `blocks/<i>/...`."""
  out = {}
  for path, x in flat.items():
    if 'blocks' in path and not (path.index('blocks') + 1 < len(path) and isinstance(path[path.index('blocks') + 1], int)):
      i = path.index('blocks')
      for layer in range(x.shape[0]):
        out[path[:i + 1] + (layer,) + path[i + 1:]] = x[layer]
    else:
      out[path] = x
  return out


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

  lora_dropout = 0.0  # the LoRA adapters' dropout (`lora.add` sets it): dropout keys are drawn when it is > 0

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs, lm_head: bool = True):
    self.config = cfg
    self.wte = _param(rngs, (cfg.vocab_size, cfg.embed_dim), ('vocab', 'embed'), cfg)
    if cfg.layout == 'gpt2':
      self.wpe = _param(rngs, (cfg.max_len, cfg.embed_dim), (None, 'embed'), cfg, std=0.01)
    blocks = [Block(cfg, rngs) for _ in range(cfg.num_layers)]  # the same draws in both layouts
    self.blocks = _stacked_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
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
    new ones) and positions [B, T] must be given. Mistral's sliding window counts slots, which is the
    distance in tokens wherever the real tokens are contiguous (left-padded prompts, right padding, the
    sampler's cache), as in transformers.

    `cfg.remat` applies to the cache-free forward (training); `cfg.scan_layers` to both.
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
      s = _cache_slots(cache)
      q_slots = cache_index + jnp.arange(t)
    key_ok = attention_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, S]
    causal = jnp.arange(s)[None, :] <= q_slots[:, None]  # [T, S]
    if cfg.sliding_window is not None:  # transformers' sliding_window_overlay: kv_idx > q_idx - window
      causal &= jnp.arange(s)[None, :] > q_slots[:, None] - cfg.sliding_window
    own = jnp.arange(s)[None, :] == q_slots[:, None]  # a pad query attends to itself: no empty rows
    mask = (key_ok & causal[None, None]) | own[None, None]  # [B, 1, T, S]

    x = self.wte[...].astype(dt)[input_ids]
    if cfg.layout == 'gpt2':
      x = x + self.wpe[...].astype(dt)[positions]
    keys = None
    if dropout_key is not None and (cfg.dropout_rate > 0 or self.lora_dropout > 0):
      keys = jax.random.split(dropout_key, cfg.num_layers + 1)
    x = shd.constrain(_dropout(x, cfg.dropout_rate, None if keys is None else keys[-1]), RESIDUAL_AXES)
    x, new_cache = self._blocks(x, positions, mask, cache, cache_index, keys)
    return self.ln_f(x), new_cache

  def _blocks(self, x, positions, mask, cache, cache_index, keys):
    """Run the L blocks (a Python loop, or one lax.scan over the stacked blocks), each under the remat
    policy when training (no cache). keys: [L + 1] dropout keys or None. Returns (x, new cache)."""
    cfg = self.config
    remat = cfg.remat != 'none' and cache is None

    def apply(graphdef, state, x, layer_cache, key):
      x, layer_cache = nnx.merge(graphdef, state)(x, positions, mask, layer_cache, cache_index, key)
      return shd.constrain(x, RESIDUAL_AXES), layer_cache

    if remat:  # static graphdef; the block's parameters, input and key are the checkpointed arguments
      apply = jax.checkpoint(apply, policy=REMAT_POLICIES[cfg.remat], static_argnums=(0,), prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      graphdef, state = nnx.split(self.blocks)

      def step(x, xs):
        layer_state, layer_cache, key = xs
        return apply(graphdef, layer_state, x, layer_cache, key)

      return jax.lax.scan(step, x, (state, cache, None if keys is None else keys[:-1]))
    new_cache = [] if cache is not None else None
    for i, block in enumerate(self.blocks):
      key = None if keys is None else keys[i]
      layer_cache = None if cache is None else cache[i]
      if remat:
        graphdef, state = nnx.split(block)
        x, layer_cache = apply(graphdef, state, x, layer_cache, key)
      else:
        x, layer_cache = block(x, positions, mask, layer_cache, cache_index, key)
        x = shd.constrain(x, RESIDUAL_AXES)
      if cache is not None:
        new_cache.append(layer_cache)
    return x, new_cache

  def logits(self, h):
    """LM head on hidden states, float32 logits [..., V]."""
    if self.has_lm_head:
      return jnp.einsum('...d,dv->...v', h, self.lm_head[...].astype(h.dtype), preferred_element_type=jnp.float32)
    return tied_logits(h, self.wte[...].astype(h.dtype))

  def __call__(self, input_ids, attention_mask=None, positions=None, dropout_key=None):
    h, _ = self.hidden_states(input_ids, attention_mask, positions, dropout_key=dropout_key)
    return self.logits(h)
