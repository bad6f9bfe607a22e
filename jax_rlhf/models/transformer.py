"""A decoder-only transformer for GPT-2 and Llama/Qwen2/Qwen3/Mistral layouts, in Flax NNX.

One `TransformerConfig` (jax_rlhf/models/transformer_config.py, with the presets) covers both layouts:
  gpt2:  learned positions, LayerNorm, GELU (tanh approximation), tied embeddings, biases everywhere.
  llama: RoPE, RMSNorm, SwiGLU, grouped-query attention, untied LM head; `qkv_bias` for Qwen2, `qk_norm` for
         Qwen3 (RMSNorm of each head's q and k before RoPE), `sliding_window` for Mistral, and RoPE frequency
         scaling `rope_type` in linear | dynamic | llama3 (Llama 3.x), as transformers defines them.

Every parameter carries *logical* axis names (`vocab`, `embed`, `mlp`, `heads`, `kv`, `norm`); the mesh
axes they map to live in one rules table (`jax_rlhf.sharding`). Model math never names a mesh axis. The
layers are in jax_rlhf/models/layers.py, their matrix products (custom VJPs) in jax_rlhf/models/matmuls.py.

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

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_rlhf import sharding as shd
from jax_rlhf.models.layers import Block, Norm, dropout, param
from jax_rlhf.models.matmuls import tied_logits
from jax_rlhf.models.transformer_config import REMAT_POLICIES, TransformerConfig

# The residual stream's logical axes, pinned at every block boundary (`sharding.constrain`: rows over the batch
# axes under a stage's mesh, a no-op outside one).
RESIDUAL_AXES = ('batch', None, None)

# One {'k': [B, Hkv, Dh, S], 'v': [B, Hkv, S, Dh]} per layer (the layouts the attention dots read); with
# scan_layers one such dict whose arrays carry a leading [L] axis.
Cache = list | dict


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


class Transformer(nnx.Module):
  """Decoder-only LM. `__call__(input_ids, attention_mask)` returns float32 logits [B, T, V]."""

  lora_dropout = 0.0  # the LoRA adapters' dropout (`lora.add` sets it): dropout keys are drawn when it is > 0

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs, lm_head: bool = True):
    self.config = cfg
    self.wte = param(rngs, (cfg.vocab_size, cfg.embed_dim), ('vocab', 'embed'), cfg)
    if cfg.layout == 'gpt2':
      self.wpe = param(rngs, (cfg.max_len, cfg.embed_dim), (None, 'embed'), cfg, std=0.01)
    blocks = [Block(cfg, rngs) for _ in range(cfg.num_layers)]  # the same draws in both layouts
    self.blocks = _stacked_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
    self.ln_f = Norm(cfg, rngs)
    self.has_lm_head = lm_head and not cfg.tie_embeddings
    if self.has_lm_head:
      self.lm_head = param(rngs, (cfg.embed_dim, cfg.vocab_size), ('embed', 'vocab'), cfg)

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
    x = shd.constrain(dropout(x, cfg.dropout_rate, None if keys is None else keys[-1]), RESIDUAL_AXES)
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
