"""The decoder's config (`TransformerConfig`: shape, layout and numerics) and its named presets (`preset`).

One config covers both layouts of jax_rlhf/models/transformer.py:
  gpt2:  learned positions, LayerNorm, GELU (tanh approximation), tied embeddings, biases everywhere.
  llama: RoPE, RMSNorm, SwiGLU, grouped-query attention, untied LM head; `qkv_bias` for Qwen2, `qk_norm` for
         Qwen3 (RMSNorm of each head's q and k before RoPE), `sliding_window` for Mistral, and RoPE frequency
         scaling `rope_type` in linear | dynamic | llama3 (Llama 3.x), as transformers defines them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

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
