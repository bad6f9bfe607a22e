"""Tokenise, truncate, pad and batch records; a deterministic epoch loader whose position is checkpointed.

Layouts (what the stages feed the model):
- demonstrations: `tokens [N, P+R]` right-padded = prompt (cut from the LEFT to `max_prompt_len`) +
  response + EOS (cut from the RIGHT to `max_response_len`); `loss_mask` is 1 on response tokens and EOS.
- texts: documents joined with EOS and cut into `seq_len` chunks (packed), every token a target.
- prompts: `prompt [N, P]` LEFT-padded (so generation continues every row at the same slot).
- rankings: `tokens [N, K, P+R]` right-padded, `ranking [N, K]` best first, `valid [N, K]`.
Truncations are counted and reported in the metrics.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np


@dataclasses.dataclass
class Truncation:
  prompts_cut: int = 0
  responses_cut: int = 0
  total: int = 0

  def as_metrics(self, prefix: str) -> dict[str, float]:
    return {f'{prefix}/prompts_truncated': self.prompts_cut, f'{prefix}/responses_truncated': self.responses_cut}


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
  """Token ids without special tokens."""
  if not texts:
    return []
  return [list(x) for x in tokenizer(list(texts), add_special_tokens=False)['input_ids']]


def _cut_prompt(ids: list[int], max_len: int, stats: Truncation) -> list[int]:
  if len(ids) > max_len:
    stats.prompts_cut += 1
    return ids[len(ids) - max_len:]
  return ids


def _cut_response(ids: list[int], max_len: int, eos: int, stats: Truncation) -> list[int]:
  """Response + EOS, at most max_len tokens; a cut response loses its EOS (so PPO-style rules see it)."""
  ids = list(ids) + [eos]
  if len(ids) > max_len:
    stats.responses_cut += 1
    return ids[:max_len]
  return ids


def pad_right(rows: Sequence[Sequence[int]], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
  out = np.full((len(rows), length), pad, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
    mask[i, :len(r)] = 1
  return out, mask


def pad_left(rows: Sequence[Sequence[int]], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
  out = np.full((len(rows), length), pad, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    if r:
      out[i, length - len(r):] = r
      mask[i, length - len(r):] = 1
  return out, mask


def demonstrations(tokenizer, records: Sequence[dict], max_prompt_len: int, max_response_len: int
                   ) -> tuple[dict[str, np.ndarray], Truncation]:
  stats = Truncation(total=len(records))
  prompts = encode(tokenizer, [r['prompt'] for r in records])
  responses = encode(tokenizer, [r['response'] for r in records])
  rows, n_prompt = [], []
  for p, r in zip(prompts, responses):
    p = _cut_prompt(p, max_prompt_len, stats)
    rows.append(p + _cut_response(r, max_response_len, tokenizer.eos_token_id, stats))
    n_prompt.append(len(p))
  tokens, att = pad_right(rows, max_prompt_len + max_response_len, tokenizer.pad_token_id)
  loss_mask = att.copy()
  for i, n in enumerate(n_prompt):
    loss_mask[i, :n] = 0
  return {'tokens': tokens, 'attention_mask': att, 'loss_mask': loss_mask}, stats


def texts(tokenizer, lines: Iterable[str], seq_len: int) -> dict[str, np.ndarray]:
  """Pack documents (each followed by EOS) into [N, seq_len] chunks; the remainder is dropped."""
  stream: list[int] = []
  for ids in encode(tokenizer, list(lines)):
    stream.extend(ids)
    stream.append(tokenizer.eos_token_id)
  n = len(stream) // seq_len
  if n == 0:
    raise ValueError(f'the text source has {len(stream)} tokens, fewer than one sequence of {seq_len}')
  tokens = np.asarray(stream[:n * seq_len], np.int32).reshape(n, seq_len)
  ones = np.ones_like(tokens)
  return {'tokens': tokens, 'attention_mask': ones, 'loss_mask': ones}


def prompts(tokenizer, records: Sequence[dict], max_prompt_len: int) -> tuple[dict[str, np.ndarray], Truncation]:
  stats = Truncation(total=len(records))
  rows = [_cut_prompt(p, max_prompt_len, stats) for p in encode(tokenizer, [r['prompt'] for r in records])]
  tokens, mask = pad_left(rows, max_prompt_len, tokenizer.pad_token_id)
  return {'prompt': tokens, 'prompt_mask': mask, 'index': np.arange(len(records), dtype=np.int32)}, stats


def rankings(tokenizer, records: Sequence[dict], max_prompt_len: int, max_response_len: int, k_max: int
             ) -> tuple[dict[str, np.ndarray], Truncation]:
  """All K responses of a prompt as K right-padded sequences; ranking/valid padded to k_max."""
  stats = Truncation(total=len(records))
  length = max_prompt_len + max_response_len
  n = len(records)
  tokens = np.full((n, k_max, length), tokenizer.pad_token_id, np.int32)
  att = np.zeros((n, k_max, length), np.int32)
  ranking = np.zeros((n, k_max), np.int32)
  valid = np.zeros((n, k_max), bool)
  prompt_ids = encode(tokenizer, [r['prompt'] for r in records])
  for i, (rec, p) in enumerate(zip(records, prompt_ids)):
    k = len(rec['responses'])
    if k > k_max:
      raise ValueError(f'ranking record {i} has {k} responses, more than rm.k_max={k_max}')
    p = _cut_prompt(p, max_prompt_len, stats)
    rows = [p + _cut_response(r, max_response_len, tokenizer.eos_token_id, stats)
            for r in encode(tokenizer, rec['responses'])]
    tokens[i, :k], att[i, :k] = pad_right(rows, length, tokenizer.pad_token_id)
    ranking[i, :k] = rec['ranking']
    valid[i, :k] = True
  return {'tokens': tokens, 'attention_mask': att, 'ranking': ranking, 'valid': valid}, stats


def padded_batches(arrays: dict[str, np.ndarray], batch_size: int, multiple: int = 1):
  """Every row of `arrays` exactly once, in order, in batches of `batch_size` rounded up to `multiple`
  (the data x fsdp devices); the last batch is padded with zero rows (attention, loss mask and `valid`
  are 0/False there, so they count for nothing). Yields (batch, number of real rows)."""
  n = len(next(iter(arrays.values())))
  size = -(-min(batch_size, n) // multiple) * multiple
  for start in range(0, n, size):
    batch = {k: v[start:start + size] for k, v in arrays.items()}
    real = len(next(iter(batch.values())))
    if real < size:
      batch = {k: np.concatenate([v, np.zeros((size - real, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
    yield batch, real


def pack(arrays: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
  """SFT packing: the real tokens of every demonstration row (prompt + response + EOS), end to end, cut into
  rows of `length` with no padding; each token keeps its loss mask (prompts still carry no loss). Attention
  and positions run across the joins, as in packed pretraining. The incomplete last row is dropped."""
  real = arrays['attention_mask'].astype(bool)
  tokens = arrays['tokens'][real]
  loss = arrays['loss_mask'][real]
  n = len(tokens) // length
  if n == 0:
    raise ValueError(f'the demonstrations have {len(tokens)} tokens, fewer than one packed row of {length}')
  tokens = tokens[:n * length].reshape(n, length).astype(np.int32)
  return {'tokens': tokens, 'attention_mask': np.ones_like(tokens),
          'loss_mask': loss[:n * length].reshape(n, length).astype(np.int32)}


def compact(batch: dict[str, np.ndarray], rows: int, offset: int = 0) -> dict[str, np.ndarray] | None:
  """A ranking batch [B, K, L] (K padded to k_max) as its real responses only: `rows` sequences [rows, L] and
  the flat position (in [B*K], plus `offset`: this process's first global row times K) each one's score goes
  to; padding rows are empty and point past the end. None when the batch has more real responses than `rows`.
  With K uniform in 4..9 padded to 9, 28% of the rows are empty: this saves that much of the RM's (and DPO's)
  compute."""
  b, k, length = batch['tokens'].shape
  idx = np.flatnonzero(batch['valid'].reshape(-1))
  if len(idx) > rows:
    return None
  tokens = np.zeros((rows, length), batch['tokens'].dtype)
  mask = np.zeros((rows, length), batch['attention_mask'].dtype)
  tokens[:len(idx)] = batch['tokens'].reshape(b * k, length)[idx]
  mask[:len(idx)] = batch['attention_mask'].reshape(b * k, length)[idx]
  index = np.full((rows,), np.iinfo(np.int32).max, np.int32)
  index[:len(idx)] = idx + offset
  return {'row_tokens': tokens, 'row_mask': mask, 'row_index': index, 'ranking': batch['ranking'],
          'valid': batch['valid']}


def compact_rows(valid: np.ndarray, batch_size: int, multiple: int) -> int:
  """Rows for compacted batches of `batch_size` prompts: mean + 4 std of a batch's real responses (from the
  per-prompt counts in `valid` [N, K]), rounded up to `multiple`; a batch above it runs uncompacted."""
  counts = valid.sum(1).astype(np.float64)
  need = batch_size * counts.mean() + 4 * np.sqrt(batch_size) * counts.std()
  rows = int(min(np.ceil(need), batch_size * valid.shape[1]))
  return -(-rows // multiple) * multiple
