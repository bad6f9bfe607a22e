"""Summed log-likelihoods of continuations under one of our LMs, tokenised as lm-evaluation-harness does.

`encode_pair` makes (context ids, continuation ids) as lm-eval's `hf` backend: context + continuation are
tokenised together and the continuation's tokens are taken from the end. `Loglikelihoods` scores them with one
jitted function over [B, L] rows, bucketed by length (`length_bucket`); it is the engine of TruthfulQA
(jax_rlhf/benchmarks/truthfulqa.py) and of `jax_rlhf.lm_eval`.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def prefix_token_id(tok) -> int:
  """The token lm-eval's hf backend conditions an empty context on: BOS, else EOS."""
  return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def tok_encode(tok, text: str, add_special_tokens: bool | None = None) -> list[int]:
  """lm-eval's hf `tok_encode`: the tokenizer's own special-token default, except that a string that already
  starts with the BOS/prefix token gets none added."""
  kw = {} if add_special_tokens is None else {'add_special_tokens': add_special_tokens}
  if add_special_tokens is None and text.startswith(tok.decode(prefix_token_id(tok))):
    kw = {'add_special_tokens': False}
  return list(tok.encode(text, **kw))


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) as lm-eval's `TemplateLM`: trailing spaces of the context move to the
  continuation, the whole string is tokenised and the continuation is what follows the context's tokens.
  An empty context becomes the prefix token."""
  if not context:
    cont = tok_encode(tok, continuation, add_special_tokens=False)
    p = prefix_token_id(tok)
    return ([p], cont) if not cont or cont[0] != p else (cont[:1], cont[1:])
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    continuation = context[-n_spaces:] + continuation
    context = context[:-n_spaces]
  whole = tok_encode(tok, context + continuation)
  ctx = tok_encode(tok, context)
  return ctx, whole[len(ctx):]


def split_model(model):
  return nnx.split(model) if isinstance(model, nnx.Module) else tuple(model)


@functools.lru_cache(maxsize=8)
def _continuation_logprob_fn(graphdef):
  """Jitted: (state, inputs [B, L], targets [B, L], att [B, L], cont [B, L]) -> (summed log-prob of the targets
  where cont is 1 [B] float32, whether each of them is the argmax [B] bool)."""
  def f(state, inputs, targets, att, cont):
    model = nnx.merge(graphdef, state)
    logp = jax.nn.log_softmax(model(inputs, attention_mask=att).astype(jnp.float32), axis=-1)  # [B, L, V]
    tok_lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, L]
    c = cont.astype(bool)
    greedy = jnp.all((jnp.argmax(logp, axis=-1) == targets) | ~c, axis=-1)
    return jnp.sum(jnp.where(c, tok_lp, 0.0), axis=-1), greedy
  return jax.jit(f)


def length_bucket(n: int, cap: int, smallest: int = 32) -> int:
  """The padded length of a row of n tokens: the next power of two >= n (at least `smallest`), at most `cap`."""
  b = smallest
  while b < n:
    b *= 2
  return max(min(b, cap), n)


class Loglikelihoods:
  """Summed log-likelihoods of continuations under an LM, batched and jitted: `scorer(requests)`.

  requests: [(context ids, continuation ids), ...] (context non-empty). As lm-eval's hf backend, each row is
  (context + continuation)[-(max_length + 1):]; the model reads all but its last token and the continuation's
  tokens are scored. Rows are sorted by length, cut into batches of `batch_size` rows (the last padded with
  empty rows) and right-padded to a power-of-two length bucket, so one compile serves each bucket.
  With `mesh`, each batch is split over its ('data', 'fsdp') axes (batch_size a multiple of their size).
  Returns [(log-likelihood, is_greedy), ...] in request order; an empty continuation gives (0.0, True).
  """

  def __init__(self, model, *, batch_size: int = 32, max_length: int | None = None, mesh=None, pad_id: int = 0):
    self.graphdef, self.state = split_model(model)
    cfg = nnx.merge(self.graphdef, self.state).config
    self.max_length = int(max_length or cfg.max_len)
    self.batch_size = int(batch_size)
    self.mesh = mesh
    self.pad_id = int(pad_id)
    self._fn = _continuation_logprob_fn(self.graphdef)
    self.n_requests = 0  # served so far (all calls)

  def __call__(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
    rows = []
    for ctx, cont in requests:
      whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
      rows.append((whole, min(len(cont), len(whole) - 1)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
    todo = [i for i in order if rows[i][1] > 0]
    for s in range(0, len(todo), self.batch_size):
      chunk = todo[s:s + self.batch_size]
      length = length_bucket(max(len(rows[i][0]) - 1 for i in chunk), self.max_length)
      shape = (self.batch_size, length)
      inputs, targets = np.full(shape, self.pad_id, np.int32), np.full(shape, self.pad_id, np.int32)
      att, cont = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
      for r, i in enumerate(chunk):
        whole, n_cont = rows[i]
        n = len(whole) - 1
        inputs[r, :n], targets[r, :n], att[r, :n] = whole[:-1], whole[1:], 1
        cont[r, n - n_cont:n] = 1
      batch = (inputs, targets, att, cont)
      if self.mesh is not None:
        from jax_rlhf import sharding as shd
        batch = shd.put_batch(batch, self.mesh)
      lls, greedy = self._fn(self.state, *batch)
      lls, greedy = np.asarray(lls, np.float64), np.asarray(greedy)
      for r, i in enumerate(chunk):
        out[i] = (float(lls[r]), bool(greedy[r]))
    self.n_requests += len(rows)
    return out
