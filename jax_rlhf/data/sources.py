"""Data sources named by one config string, the same for every stage, and the grain loader.

  jsonl:PATH            a JSONL file of our schemas (records.py); a bare PATH means the same
  tfds:NAME[:SPLIT]     a TFDS dataset with our schema's fields, read with `tfds.data_source` (data.tfds_dir)
  hh_rlhf:DIR           Anthropic HH-RLHF files downloaded to DIR            (builders.py has the formats)
  tldr_sft:DIR          summarize-from-feedback's TL;DR SFT set (N+ prompt format)
  tldr_comparisons:DIR  summarize-from-feedback's comparisons
  rankings:DIR          InstructGPT-style K-way rankings

A source gives records of any kind its own records can make: a ranking gives its prompt, and its best
response as a demonstration (prompt + response as text); a demonstration gives its prompt and its text.
`load(spec, kind, split)` reads a split ('train' or 'eval'): a builder's or TFDS dataset's held-out split,
or, for a source without one, the first `eval_fraction` of its records (which 'train' then leaves out);
'all' reads a file whole (no hold-out).
Every record keeps its origin (`file:line`) so a later check (a prompt too long) can say where it is.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from jax_rlhf.data import builders, records

KIND_OF = {'demonstrations': 'demonstration', 'rankings': 'ranking', 'prompts': 'prompt', 'pretrain': 'text'}
SCHEMES = ('jsonl', 'tfds', *builders.FORMATS)


@dataclasses.dataclass
class Records:
  """Validated records of one kind, their origins, and what was skipped on the way (with on_error=skip)."""
  items: list[dict]
  origins: list[str]
  skipped: int = 0
  errors: list[str] = dataclasses.field(default_factory=list)  # the first `file:line: what` messages

  def __len__(self) -> int:
    return len(self.items)

  def select(self, keep: list[int]) -> 'Records':
    return Records([self.items[i] for i in keep], [self.origins[i] for i in keep], self.skipped, self.errors)


def parse_spec(spec: str) -> tuple[str, str, str | None]:
  """'scheme:rest[:SPLIT]' -> (scheme, path or name, split or None). A bare path is jsonl."""
  scheme, sep, rest = spec.partition(':')
  if not sep or scheme not in SCHEMES:
    return 'jsonl', os.path.expanduser(spec), None
  if not rest:
    raise ValueError(f'data source {spec!r} names no {"dataset" if scheme == "tfds" else "path"}')
  if scheme == 'tfds':
    name, _, split = rest.partition(':')
    return scheme, name, split or None
  return scheme, os.path.expanduser(rest), None


def convert(record: dict, native: str, kind: str) -> dict:
  """A record of kind `native` as a record of `kind` (see the module docstring); RecordError if impossible."""
  if native == kind:
    return record
  if kind == 'prompt':
    return {'prompt': record['prompt']}
  if native == 'ranking':
    record = {'prompt': record['prompt'], 'response': record['responses'][record['ranking'][0]]}
    native = 'demonstration'
  if native == 'demonstration' and kind == 'demonstration':
    return record
  if native == 'demonstration' and kind == 'text':
    return {'text': record['prompt'] + record['response']}
  raise records.RecordError(f'a {native} source cannot give {kind} records')


def _validated(raw: list[tuple[str, Any]], kind: str, native: str | None, on_error: str) -> Records:
  """(origin, raw object or RecordError) pairs -> Records, raising or skipping as on_error says."""
  out = Records([], [])
  seen_prompts = set()
  for origin, obj in raw:
    try:
      if isinstance(obj, records.RecordError):
        raise obj
      rec = records.validate(obj, native or kind)
      rec = convert(rec, native or kind, kind)
    except records.RecordError as e:
      msg = f'{origin}: {e}'
      if on_error == 'raise':
        raise records.RecordError(msg) from None
      out.skipped += 1
      if len(out.errors) < builders.MAX_KEPT_ERRORS:
        out.errors.append(msg)
      continue
    if kind == 'prompt' and native not in (None, 'prompt'):  # rankings/comparisons repeat prompts
      if rec['prompt'] in seen_prompts:
        continue
      seen_prompts.add(rec['prompt'])
    out.items.append(rec)
    out.origins.append(origin)
  return out


def _jsonl(path: str) -> list[tuple[str, Any]]:
  if not os.path.isfile(path):
    raise records.RecordError(f'{path}:0: file does not exist')
  return list(builders._lines(path, os.path.dirname(path) or '.'))  # pylint: disable=protected-access


def _decode(x):
  if isinstance(x, bytes):
    return x.decode('utf-8')
  if isinstance(x, (list, tuple, np.ndarray)):
    return [_decode(v) for v in x]
  if isinstance(x, np.integer):
    return int(x)
  return x


def _tfds_rows(source, origin_prefix: str) -> list[tuple[str, Any]]:
  """All rows of a TFDS data source, in their stored order (hashed keys), as (origin, dict)."""
  rows = []
  n = len(source)
  for start in range(0, n, 1024):
    for i, row in enumerate(source.__getitems__(list(range(start, min(start + 1024, n))))):
      row = {k: _decode(v) for k, v in row.items()}
      rows.append((row.pop('origin', None) or f'{origin_prefix}:{start + i}', row))
  return rows


def _tfds_split(splits, asked: str | None, split: str, spec: str) -> tuple[str | None, bool]:
  """(the TFDS split to read, whether to hold out a fraction of it) for our 'train'/'eval'/'all'."""
  if split in ('train', 'all'):
    name = asked or 'train'
    if name not in splits:
      raise records.RecordError(f'{spec}:0: no split {name!r}; the dataset has {", ".join(sorted(splits))}')
    held = next((s for s in ('validation', 'test') if s in splits and s != name), None)
    return name, held is None
  held = next((s for s in ('validation', 'test') if s in splits and s != (asked or 'train')), None)
  return held or (asked or 'train'), held is None


def load(spec: str, kind: str, *, split: str = 'train', on_error: str = 'raise', data_dir: str = '',
         eval_fraction: float = 0.05) -> Records:
  """Read one split of a source as validated records of `kind`. Raises RecordError('file:line: what')."""
  if kind not in records.KINDS:
    raise ValueError(f'kind must be one of {records.KINDS}, got {kind!r}')
  if on_error not in ('raise', 'skip'):
    raise ValueError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
  try:
    scheme, target, asked = parse_spec(spec)
  except ValueError as e:
    raise records.RecordError(f'{spec}:0: {e}') from None
  data_dir = os.path.expanduser(data_dir or os.path.join('~', 'tensorflow_datasets'))
  if scheme == 'jsonl':
    out = _validated(_jsonl(target), kind, None, on_error)
    hold_out = True
  elif scheme == 'tfds':
    import tensorflow_datasets as tfds
    builder = tfds.builder(target, data_dir=data_dir)
    name, hold_out = _tfds_split(builder.info.splits.keys(), asked, split, spec)
    rows = _tfds_rows(tfds.data_source(target, split=name, data_dir=data_dir), f'{target}/{name}')
    rows.sort(key=lambda r: _origin_key(r[0]))  # file (or index) order, not TFDS's hashed-key order
    out = _validated(rows, kind, None, on_error)
  else:
    builder = _build(scheme, target, data_dir)
    native = builders.FORMATS[scheme][0]
    name, hold_out = _tfds_split(builder.info.splits.keys(), asked, split, spec)
    meta = {k: dict(builder.info.metadata[k]).get(name, 0 if k == 'skipped' else []) for k in ('errors', 'skipped')}
    if meta['errors'] and on_error == 'raise':
      raise records.RecordError(meta['errors'][0])
    rows = _tfds_rows(builder.as_data_source(split=name), f'{scheme}/{name}')
    rows.sort(key=lambda r: _origin_key(r[0]))  # file order, not TFDS's hashed-key order
    out = _validated(rows, kind, native, on_error)
    out.skipped += int(meta['skipped'])
    out.errors = list(meta['errors']) + out.errors
  if hold_out and split != 'all':
    n_eval = max(int(len(out) * eval_fraction), 1) if len(out) > 1 else 0
    out = out.select(list(range(n_eval)) if split == 'eval' else list(range(n_eval, len(out))))
  return out


def _origin_key(origin: str):
  path, _, line = origin.rpartition(':')
  return (path, int(line)) if line.isdigit() else (origin, 0)


def _build(scheme: str, manual_dir: str, data_dir: str):
  """Process 0 builds (TFDS writes into a temporary folder and renames it), the others wait, then all read."""
  import jax
  if jax.process_count() > 1:  # pragma: no cover - multi-host
    from jax.experimental import multihost_utils
    if jax.process_index() == 0:
      builders.build(scheme, manual_dir, data_dir)
    multihost_utils.sync_global_devices(f'build {scheme}')
  return builders.build(scheme, manual_dir, data_dir)


# ---------------------------------------------------------------------------------------------------- loader

class GrainLoader:
  """Batches of a dict of equal-length arrays through grain: shuffled per epoch from the seed, each host
  reading only its block of every global batch, and a position (`state()`/`restore()`) that a checkpoint
  keeps so that a resumed run reads exactly the batches an uninterrupted one would.

  Every epoch is a fresh permutation of the rows (grain's `MapDataset.shuffle` over `repeat`: the epoch
  seeds the permutation); a global batch is `batch_size` consecutive rows of it, the incomplete last batch of
  an epoch is dropped. Host p of P gets rows [p * B/P, (p+1) * B/P) of each global batch: the hosts together
  read each batch exactly once, and each host's rows are the ones its devices hold in a batch-sharded array
  (`jax.make_array_from_process_local_data`).
  """

  def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int, *, shuffle: bool = True,
               process_index: int | None = None, process_count: int | None = None):
    import grain
    import jax
    self.arrays = arrays
    self.n = len(next(iter(arrays.values())))
    if batch_size > self.n:
      raise ValueError(f'batch size {batch_size} is larger than the {self.n} records of the source')
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if batch_size % self.process_count:
      raise ValueError(f'batch size {batch_size} is not divisible by the {self.process_count} hosts')
    self.batch_size, self.seed = batch_size, seed
    self.local = batch_size // self.process_count
    order = grain.MapDataset.range(self.n)
    if shuffle:
      order = order.shuffle(seed=seed)
    self._order = order.repeat()  # index e * n + i: row i of epoch e's permutation
    bpe = self.batches_per_epoch
    lo = self.process_index * self.local

    def rows(step: int, _) -> np.ndarray:
      epoch, b = divmod(step, bpe)
      start = epoch * self.n + b * batch_size + lo
      return np.asarray([self._order[start + j] for j in range(self.local)])

    batches = grain.MapDataset.range(bpe).repeat().map_with_index(rows)
    # A couple of batches read ahead in one thread (grain's default, 16 threads and 500 elements, would hold
    # hundreds of batches); the iterator's state counts consumed batches, so it stays exact.
    self._dataset = batches.map(self._gather).to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    self._it = iter(self._dataset)
    self._step = 0

  def _gather(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in self.arrays.items()}

  @property
  def batches_per_epoch(self) -> int:
    return self.n // self.batch_size

  @property
  def epoch(self) -> int:
    return self._step // self.batches_per_epoch

  def state(self) -> dict[str, Any]:
    return {'grain': self._it.get_state(), 'step': self._step, 'epoch': self.epoch,
            'process_count': self.process_count}

  def restore(self, state: dict[str, Any]) -> None:
    if int(state.get('process_count', self.process_count)) != self.process_count:
      raise ValueError(f'the checkpoint was written by {state["process_count"]} hosts, this run has '
                       f'{self.process_count}')
    self._it = iter(self._dataset)
    self._it.set_state(state['grain'])
    self._step = int(state['step'])

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    self._step += 1
    return next(self._it)

