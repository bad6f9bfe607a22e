"""Jitted autoregressive sampling with a KV cache: prefill + `lax.while_loop` decode.

Two entry points:

* `sample(graphdef, state, input_ids, attention_mask, rng, *, max_new_tokens, ...)` is a pure, traceable
  function (no jit of its own, no host round-trips). Call it from inside another jitted function, e.g. the
  PPO experience step, with `graphdef` static and `state` a traced pytree.
* `generate(model_or_(graphdef, state), input_ids, attention_mask, rng, *, max_new_tokens, ...)` is a thin
  wrapper that splits an nnx `Transformer` if given one and calls `sample` under one `jax.jit`
  (compiled once per graphdef, shapes and static sampling settings; jax's jit cache does the caching).

Prompts are LEFT-padded `[B, P]` with `attention_mask` `[B, P]` (1 = real token); positions come from
the mask, so a padded prompt is decoded exactly as the unpadded one. The prompt is prefilled into a
preallocated cache of `P + N` slots (N = `max_new_tokens`); the decode writes new token `i` at slot
`P + i` with position `len(prompt) + i` and grows the slot mask as it goes. The loop stops once every
row has emitted EOS, or after N tokens.

Sampling at each step: `temperature == 0` is greedy (argmax of the raw logits). Otherwise the float32
logits are divided by the temperature, then top-k filtered (`top_k = 0`: off), then top-p / nucleus
filtered on the renormalised result (`top_p = 1`: off; the most likely token is always kept), in that
order (as Hugging Face's logits processors), and a token is drawn from the softmax of the result by
inverse CDF (`draw`: one uniform per row under `fold_in(rng, i)` for step i; the distribution of
`jax.random.categorical`, without its Gumbel noise over the whole vocabulary). Ties at a top-k / top-p
cut-off value are all kept.

Returned (`SampleOutput`):
  tokens   [B, N] int32  the new tokens; after a row's first EOS every token is `pad_token_id`
  logprobs [B, N] f32    log-prob of each token under the distribution it was drawn from, i.e.
                         `log_softmax(filter(logits / T))`; 0 where `mask` is 0. For greedy decoding it
                         is the log-prob under the unfiltered `log_softmax(logits)` (temperature 1).
  mask     [B, N] int32  1 for response tokens up to and including the first EOS, 0 after it
  num_steps []    int32  how many tokens the loop produced (== N unless every row hit EOS earlier)
  logits   [B, N, V] f32 the raw model logits each token was drawn from (only with `return_logits=True`,
                         else None; for tests and debugging)

Note for PPO: the log-probs here come from the cached decode; recompute the behaviour log-probs with the
training forward (same kernels) and use these only to log the mismatch (RLHF_DETAILS, "Sampling").
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_rlhf.models.transformer import init_cache, positions_from_mask

_NEG_INF = -jnp.inf


class SampleOutput(NamedTuple):
  tokens: jax.Array     # [B, N] int32
  logprobs: jax.Array   # [B, N] float32
  mask: jax.Array       # [B, N] int32
  num_steps: jax.Array  # [] int32
  logits: Any = None    # [B, N, V] float32 when return_logits=True


# ----------------------------------------------------------------------------------------------------
# Logit processing
# ----------------------------------------------------------------------------------------------------

def filter_logits(logits, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """`logits / temperature`, then top-k, then top-p; removed entries are -inf. logits: [..., V] float32.

  Static `top_k`/`top_p`. Ties at the cut-off value are kept. top-p keeps the smallest prefix (by
  descending probability) whose mass reaches `top_p`, i.e. token j is kept iff the mass of the tokens
  strictly more likely than it is < top_p; the top token is always kept.
  """
  logits = logits.astype(jnp.float32)
  if temperature != 1.0:
    logits = logits / temperature
  v = logits.shape[-1]
  k = top_k if 0 < top_k < v else 0
  if k == 0 and top_p >= 1.0:
    return logits
  if k:
    sorted_desc = jax.lax.top_k(logits, k)[0]  # [..., k], descending
    logits = jnp.where(logits < sorted_desc[..., -1:], _NEG_INF, logits)
  else:
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [..., V]
  if top_p < 1.0:
    probs = jax.nn.softmax(sorted_desc, axis=-1)  # the top-k values carry the whole renormalised mass
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    num_keep = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
    cutoff = jnp.take_along_axis(sorted_desc, num_keep - 1, axis=-1)
    logits = jnp.where(logits < cutoff, _NEG_INF, logits)
  return logits


def _eos_hit(tokens, eos_ids: tuple[int, ...]):
  hit = tokens == eos_ids[0]
  for e in eos_ids[1:]:
    hit = hit | (tokens == e)
  return hit


def _choose(logits, key, temperature, top_k, top_p):
  """One sampling step. logits [B, V] float32 -> (token [B] int32, logprob [B] float32)."""
  if temperature == 0.0:
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
  return draw(key, filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p))


def draw(key, logits):
  """One draw per row from `softmax(logits)`. logits [B, V] float32 (-inf = excluded).

  Returns (token [B] int32, its log-prob [B] float32). Inverse CDF with one uniform per row
  (`inverse_cdf`): the same distribution as `jax.random.categorical`, a different random stream.
  `categorical` draws a Gumbel per vocabulary entry (V threefry numbers and two logs per row, then an
  argmax): on CPU that was the costliest part of a decode step.
  """
  u = jax.random.uniform(key, logits.shape[:1], jnp.float32)
  return inverse_cdf(logits, u)


def inverse_cdf(logits, u):
  """The token whose cumulative-mass interval holds u: logits [B, V] float32, u [B] in [0, 1).

  Token j is returned iff  c_{j-1} <= u * c_V < c_j,  c_j = sum_{i <= j} exp(logits_i - max), so it has
  probability softmax(logits)_j for u uniform. Two levels (blocks of ~sqrt(V) tokens, then inside the
  chosen block), so that only elementwise work and sums touch all V entries. A token of zero mass is
  never returned, whatever the rounding. Returns (token [B] int32, log softmax(logits)[token] [B]).
  """
  b, v = logits.shape
  z = logits - jnp.max(logits, axis=-1, keepdims=True)  # the max entry is 0, excluded ones -inf
  e = jnp.exp(z)  # unnormalised probabilities, 1 for the top token
  width = max(1, int(round(v ** 0.5)))
  nb = -(-v // width)
  blocks = jnp.pad(e, ((0, 0), (0, nb * width - v))).reshape(b, nb, width)
  cum_blocks = jnp.cumsum(jnp.sum(blocks, axis=-1), axis=-1)  # [B, nb] mass up to and including each block
  total = cum_blocks[:, -1]  # >= 1
  target = jnp.minimum(u * total, jnp.nextafter(total, 0.0))  # in [0, total)
  blk = jnp.sum(cum_blocks <= target[:, None], axis=-1)  # first block whose cumulative mass > target: [0, nb)
  before = jnp.take_along_axis(cum_blocks, jnp.maximum(blk - 1, 0)[:, None], axis=-1)[:, 0]
  before = jnp.where(blk > 0, before, 0.0)
  row = jnp.take_along_axis(blocks, blk[:, None, None], axis=1)[:, 0]  # [B, width], positive mass
  idx = jnp.sum(jnp.cumsum(row, axis=-1) <= (target - before)[:, None], axis=-1)
  last = jnp.max(jnp.where(row > 0, jnp.arange(width), 0), axis=-1)  # rounding can push idx past it
  tok = (blk * width + jnp.minimum(idx, last)).astype(jnp.int32)
  logp = jnp.take_along_axis(z, tok[:, None], axis=-1)[:, 0] - jnp.log(total)
  return tok, logp


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------

def sample(graphdef, state, input_ids, attention_mask, rng, *, max_new_tokens: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, eos_token_id: int | Sequence[int], pad_token_id: int,
           return_logits: bool = False, num_samples: int = 1) -> SampleOutput:
  """Pure, traceable sampler (see the module docstring). Call under jit with `graphdef` and every keyword
  static; `state` is the model's `nnx.State`, `input_ids`/`attention_mask` `[B, P]` left-padded.

  `num_samples = G > 1` draws G responses per prompt (GRPO's group): each prompt is prefilled ONCE, and its
  KV cache, slot mask and first logits are repeated to its G rows, so the outputs are `[B * G, ...]`,
  group-major (row i answers prompt i // G). The decode is then exactly that of the prompts repeated with
  `jnp.repeat(input_ids, G, axis=0)` under the same key; only the prefill's work is divided by G.
  G = 1 is the plain sampler, op for op."""
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
  if temperature < 0:
    raise ValueError(f'temperature must be >= 0, got {temperature}')
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f'top_p must be in (0, 1], got {top_p}')
  if top_k < 0:
    raise ValueError(f'top_k must be >= 0, got {top_k}')
  if num_samples < 1:
    raise ValueError(f'num_samples must be >= 1, got {num_samples}')
  eos_ids = (int(eos_token_id),) if isinstance(eos_token_id, (int, np.integer)) else tuple(int(e) for e in eos_token_id)
  if not eos_ids:
    raise ValueError('eos_token_id must name at least one token')
  temperature, top_p = float(temperature), float(top_p)

  model = nnx.merge(graphdef, state)
  cfg = model.config
  b, p = input_ids.shape
  n = max_new_tokens
  s = p + n
  if cfg.layout == 'gpt2' and s > cfg.max_len:
    raise ValueError(f'prompt length {p} + max_new_tokens {n} exceeds the model max_len {cfg.max_len}')
  input_ids = input_ids.astype(jnp.int32)
  attention_mask = attention_mask.astype(jnp.int32)
  prompt_len = jnp.sum(attention_mask, axis=-1).astype(jnp.int32)  # [B]

  # Prefill: the whole prompt into slots [0, P); only the last position's logits are needed.
  cache = init_cache(cfg, b, s)
  slot_mask = jnp.concatenate([attention_mask, jnp.zeros((b, n), jnp.int32)], axis=1)  # [B, S]
  h, cache = model.hidden_states(input_ids, slot_mask, positions_from_mask(attention_mask), cache, 0)
  logits0 = model.logits(h[:, -1])  # [B, V]
  if num_samples > 1:  # the group's G rows share their prompt's prefill: repeat it, group-major
    def repeat(x, axis=0):
      return jnp.repeat(x, num_samples, axis=axis)
    # [B * G, ...] per layer; a scanned model's stacked cache [L, B, ...] repeats its batch axis, the second
    cache = jax.tree.map(lambda x: repeat(x, 1 if cfg.scan_layers else 0), cache)
    slot_mask, logits0, prompt_len = repeat(slot_mask), repeat(logits0), repeat(prompt_len)
    b = b * num_samples

  tok0, lp0 = _choose(logits0, jax.random.fold_in(rng, 0), temperature, top_k, top_p)
  done0 = _eos_hit(tok0, eos_ids)
  tokens = jnp.full((b, n), pad_token_id, jnp.int32).at[:, 0].set(tok0)
  logprobs = jnp.zeros((b, n), jnp.float32).at[:, 0].set(lp0)
  mask = jnp.zeros((b, n), jnp.int32).at[:, 0].set(1)
  all_logits = jnp.zeros((b, n, cfg.vocab_size), jnp.float32).at[:, 0].set(logits0) if return_logits else None
  # Slot P + i holds token i once it is fed back; it is a real key only while its row is still running.
  slot_mask = slot_mask.at[:, p].set(1)

  def cond(carry):
    i, done = carry[0], carry[1]
    return (i < n) & ~jnp.all(done)

  def body(carry):
    i, done, tokens, logprobs, mask, slot_mask, cache, all_logits = carry
    prev = jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1)  # [B, 1] token i-1, at slot P + i - 1
    pos = (prompt_len + i - 1)[:, None]
    h, cache = model.hidden_states(prev, slot_mask, pos, cache, p + i - 1)
    logits = model.logits(h[:, 0])  # [B, V]
    tok, lp = _choose(logits, jax.random.fold_in(rng, i), temperature, top_k, top_p)
    live = ~done
    tok = jnp.where(live, tok, pad_token_id)
    lp = jnp.where(live, lp, 0.0)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], i, axis=1)
    logprobs = jax.lax.dynamic_update_slice_in_dim(logprobs, lp[:, None], i, axis=1)
    mask = jax.lax.dynamic_update_slice_in_dim(mask, live.astype(jnp.int32)[:, None], i, axis=1)
    slot_mask = jax.lax.dynamic_update_slice_in_dim(slot_mask, live.astype(jnp.int32)[:, None], p + i, axis=1)
    if all_logits is not None:
      all_logits = jax.lax.dynamic_update_slice_in_dim(all_logits, logits[:, None], i, axis=1)
    done = done | _eos_hit(tok, eos_ids)
    return i + 1, done, tokens, logprobs, mask, slot_mask, cache, all_logits

  carry = (jnp.int32(1), done0, tokens, logprobs, mask, slot_mask, cache, all_logits)
  num_steps, _, tokens, logprobs, mask, _, _, all_logits = jax.lax.while_loop(cond, body, carry)
  return SampleOutput(tokens, logprobs, mask, num_steps, all_logits)


_STATIC = ('max_new_tokens', 'temperature', 'top_k', 'top_p', 'eos_token_id', 'pad_token_id', 'return_logits',
           'num_samples')


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=_STATIC)
def _sample_jit(graphdef, state, input_ids, attention_mask, rng, **kw):
  return sample(graphdef, state, input_ids, attention_mask, rng, **kw)


def generate(model, input_ids, attention_mask, rng, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_token_id: int | Sequence[int], pad_token_id: int,
             return_logits: bool = False, num_samples: int = 1) -> SampleOutput:
  """Jitted `sample`. `model` is an nnx `Transformer` or a `(graphdef, state)` pair. `num_samples = G`: G
  responses per prompt from one shared prefill, outputs `[B * G, ...]` group-major (see `sample`)."""
  if isinstance(model, nnx.Module):
    graphdef, state = nnx.split(model)
  else:
    graphdef, state = model
  if isinstance(eos_token_id, (int, np.integer)):
    eos_token_id = int(eos_token_id)
  else:
    eos_token_id = tuple(int(e) for e in eos_token_id)
  if num_samples != 1:
    return _sample_jit(graphdef, state, jnp.asarray(input_ids), jnp.asarray(attention_mask), rng,
                       max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k),
                       top_p=float(top_p), eos_token_id=eos_token_id, pad_token_id=int(pad_token_id),
                       return_logits=bool(return_logits), num_samples=int(num_samples))
  return _sample_jit(graphdef, state, jnp.asarray(input_ids), jnp.asarray(attention_mask), rng,
                     max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k),
                     top_p=float(top_p), eos_token_id=eos_token_id, pad_token_id=int(pad_token_id),
                     return_logits=bool(return_logits))


# ---------------------------------------------------------------------------------------------------- host helpers

def decode_responses(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
  """Sampled ids [B, N] -> text of each response (up to, not including, EOS; special tokens dropped)."""
  return [tokenizer.decode([int(t) for t, m in zip(row, mrow) if m], skip_special_tokens=True).strip()
          for row, mrow in zip(tokens, mask)]


def sample_responses(graphdef, state, tokenizer, prompt_arrays, rng, *, batch_size, max_new_tokens,
                     temperature, top_k=0, top_p=1.0):
  """One response per prompt row of `prompt_arrays` ({'prompt', 'prompt_mask'} [B, P], numpy), sampled in
  calls of `batch_size` rows (the last one padded, so one shape compiles), call i under fold_in(rng, i's first
  row). The model's state is process-local (every process samples the same, as with one process).
  Returns (texts, tokens [B, N], mask [B, N]) on the host."""
  n = len(prompt_arrays['prompt'])
  texts, toks, masks = [], [], []
  for start in range(0, n, batch_size):
    ids = prompt_arrays['prompt'][start:start + batch_size]
    m = prompt_arrays['prompt_mask'][start:start + batch_size]
    pad = batch_size - len(ids)
    if pad:  # keep one compiled shape
      ids, m = np.concatenate([ids, ids[:pad]]), np.concatenate([m, m[:pad]])
    out = generate((graphdef, state), ids, m, jax.random.fold_in(rng, start),
                   max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    t, mk = np.asarray(out.tokens)[:batch_size - pad], np.asarray(out.mask)[:batch_size - pad]
    toks.append(t)
    masks.append(mk)
    eos = (t == tokenizer.eos_token_id) & (mk > 0)
    texts += decode_responses(tokenizer, t, mk * ~eos)
  return texts, np.concatenate(toks), np.concatenate(masks)
