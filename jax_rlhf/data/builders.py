"""TFDS builders for the datasets RLHF users train on, reading the files the user downloaded (TFDS
`manual_dir`) and writing array_record, with no TensorFlow (read back with `tfds.data_source` / grain).

  hh_rlhf           Anthropic HH-RLHF (github.com/anthropics/hh-rlhf): `<subset>/{train,test}.jsonl[.gz]`,
                    lines {"chosen": transcript, "rejected": transcript}. Both transcripts are split at their
                    last "\n\nAssistant:" turn: the shared text up to and including it is the prompt, the rest
                    the response. -> ranking records (chosen, rejected). Splits train, test.
  tldr_sft          OpenAI summarize-from-feedback's TL;DR SFT set (`tldr_3_filtered`): `{train,valid,test}.jsonl`,
                    lines {"subreddit", "title", "post", "summary"}. -> demonstrations in the N+ format (Huang
                    et al. 2024): "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:" and
                    " {summary}". Splits train, validation, test.
  tldr_comparisons  summarize-from-feedback's human comparisons: `comparisons/batch*.json` (JSON lines)
                    {"info": {"subreddit", "title", "post"}, "summaries": [{"text"}, {"text"}], "choice": 0|1,
                    "split": "train"|"valid1"|"valid2"}. -> ranking records, same prompt format; CNN/DM
                    comparisons (an "article", no "post") are left out and counted. Splits train, validation.
  rankings          InstructGPT-style K-way rankings: `{train,validation,test}.jsonl[.gz]` of our ranking
                    schema, or with "ranks" (the rank of each response, 1 = best) instead of "ranking".

A bad raw record never stops the build: it is left out and its `file:line: what is wrong` kept in the
dataset's metadata (per split), so that reading a split applies `data.on_error` (raise on its first bad
record, or skip and count them).
A build is cached under `data_dir`, keyed by a fingerprint of the raw files (path, size, mtime).
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
from collections.abc import Iterator

import numpy as np

from jax_rlhf.data import records

ASSISTANT = '\n\nAssistant:'
MAX_KEPT_ERRORS = 50  # error messages kept in a build's metadata (all of them are counted)


def tldr_prompt(subreddit: str, title: str, post: str) -> str:
  """The N+ query format (Huang et al. 2024, after Stiennon et al. 2020)."""
  return f'SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:'


def split_transcript(transcript: str) -> tuple[str, str]:
  """An HH-RLHF transcript -> (prompt up to and including the last "\n\nAssistant:", the response after it,
  with its leading space and without trailing whitespace)."""
  cut = transcript.rfind(ASSISTANT)
  if cut < 0:
    raise records.RecordError('transcript has no "\\n\\nAssistant:" turn')
  response = transcript[cut + len(ASSISTANT):].rstrip()  # keeps its leading space, as BPE tokenises it
  if not response.strip():
    raise records.RecordError('empty response after the last "\\n\\nAssistant:"')
  return transcript[:cut + len(ASSISTANT)], response


# ---------------------------------------------------------------------------------------------------- raw files

def _lines(path: str, root: str) -> Iterator[tuple[str, object]]:
  """(origin 'file:line', parsed JSON or a RecordError) for each non-blank line of a (gzipped) JSONL file."""
  rel = os.path.relpath(path, root)
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    for lineno, raw in enumerate(f, start=1):
      origin = f'{os.path.join(root, rel)}:{lineno}'
      try:
        line = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        yield origin, records.RecordError(f'invalid UTF-8 at byte {e.start}')
        continue
      if not line.strip():
        continue
      try:
        yield origin, json.loads(line)
      except json.JSONDecodeError as e:
        yield origin, records.RecordError(f'invalid JSON: {e.msg} (column {e.colno})')


def _field(obj, name: str, where: str = '') -> str:
  if not isinstance(obj, dict):
    raise records.RecordError(f'expected a JSON object{where}, got {type(obj).__name__}')
  return records._string(obj, name)  # pylint: disable=protected-access


def hh_record(obj) -> dict:
  chosen, rejected = _field(obj, 'chosen'), _field(obj, 'rejected')
  prompt, good = split_transcript(chosen)
  prompt_r, bad = split_transcript(rejected)
  if prompt != prompt_r:
    raise records.RecordError('"chosen" and "rejected" differ before their last assistant turn')
  return records.validate({'prompt': prompt, 'chosen': good, 'rejected': bad}, 'ranking')


def tldr_sft_record(obj) -> dict:
  post = _field(obj, 'post').strip()
  summary = _field(obj, 'summary').strip()
  if not post or not summary:
    raise records.RecordError(f'empty {"post" if not post else "summary"!r}')
  return {'prompt': tldr_prompt(_field(obj, 'subreddit'), _field(obj, 'title'), post), 'response': ' ' + summary}


def tldr_comparison_record(obj) -> dict | None:
  """A comparison -> a ranking record; None for a CNN/DM comparison (no Reddit post)."""
  if not isinstance(obj, dict):
    raise records.RecordError(f'expected a JSON object, got {type(obj).__name__}')
  info = obj.get('info')
  if not isinstance(info, dict):
    raise records.RecordError("missing field 'info'")
  if 'post' not in info and 'article' in info:
    return None
  summaries, choice = obj.get('summaries'), obj.get('choice')
  if not isinstance(summaries, list) or len(summaries) != 2:
    raise records.RecordError("field 'summaries' must be a list of two summaries")
  if choice not in (0, 1) or isinstance(choice, bool):
    raise records.RecordError(f"field 'choice' must be 0 or 1, got {choice!r}")
  texts = [_field(s, 'text', ' in summaries').strip() for s in summaries]
  if not all(texts):
    raise records.RecordError('empty summary text')
  post = _field(info, 'post').strip()
  prompt = tldr_prompt(_field(info, 'subreddit'), _field(info, 'title'), post)
  return records.validate({'prompt': prompt, 'chosen': ' ' + texts[choice], 'rejected': ' ' + texts[1 - choice]},
                          'ranking')


def ranking_record(obj) -> dict:
  if isinstance(obj, dict) and 'ranks' in obj and 'ranking' not in obj:
    ranks = obj['ranks']
    if not isinstance(ranks, list) or sorted(ranks) != list(range(1, len(ranks) + 1)):
      raise records.RecordError(f"'ranks' {ranks!r} is not a permutation of 1..K")
    obj = {k: v for k, v in obj.items() if k != 'ranks'}
    obj['ranking'] = [int(i) for i in np.argsort(ranks, kind='stable')]
  return records.validate(obj, 'ranking')


# name -> (native kind, {split: glob patterns under manual_dir}, record function, held-out split)
FORMATS = {
    'hh_rlhf': ('ranking', {'train': ['**/train.jsonl.gz', '**/train.jsonl'],
                            'test': ['**/test.jsonl.gz', '**/test.jsonl']}, hh_record, 'test'),
    'tldr_sft': ('demonstration', {'train': ['**/train.jsonl'], 'validation': ['**/valid.jsonl'],
                                   'test': ['**/test.jsonl']}, tldr_sft_record, 'validation'),
    'tldr_comparisons': ('ranking', {'train': ['**/batch*.json'], 'validation': ['**/batch*.json']},
                         tldr_comparison_record, 'validation'),
    'rankings': ('ranking', {'train': ['**/train.jsonl.gz', '**/train.jsonl'],
                             'validation': ['**/validation.jsonl.gz', '**/validation.jsonl'],
                             'test': ['**/test.jsonl.gz', '**/test.jsonl']}, ranking_record, 'test'),
}
_COMPARISON_SPLITS = {'train': ('train',), 'validation': ('valid1', 'valid2')}


def files_of(name: str, manual_dir: str) -> dict[str, list[str]]:
  """{split: sorted raw files} of a format under manual_dir (HH's red-team-attempts has another format)."""
  out = {}
  for split, patterns in FORMATS[name][1].items():
    found = sorted({p for pat in patterns for p in glob.glob(os.path.join(manual_dir, pat), recursive=True)
                    if 'red-team-attempts' not in p})
    if found:
      out[split] = found
  return out


def parse(name: str, manual_dir: str, split: str) -> Iterator[tuple[str, dict | None, str | None]]:
  """(origin, record or None, error or None) for every raw record of a split, in file order."""
  kind, _, fn, _ = FORMATS[name]
  for path in files_of(name, manual_dir).get(split, []):
    for origin, obj in _lines(path, manual_dir):
      if isinstance(obj, records.RecordError):
        yield origin, None, f'{origin}: {obj}'
        continue
      if name == 'tldr_comparisons' and isinstance(obj, dict) and obj.get('split') not in _COMPARISON_SPLITS[split]:
        if obj.get('split') not in sum(_COMPARISON_SPLITS.values(), ()):
          yield origin, None, f"{origin}: field 'split' must be train, valid1 or valid2, got {obj.get('split')!r}"
        continue
      try:
        rec = fn(obj)
      except records.RecordError as e:
        yield origin, None, f'{origin}: {e}'
        continue
      yield origin, rec, None


def fingerprint(manual_dir: str) -> str:
  """A short hash of the raw files (path, size, mtime): a changed download gets a fresh build."""
  h = hashlib.sha1(os.path.abspath(manual_dir).encode())
  for path in sorted(glob.glob(os.path.join(manual_dir, '**', '*'), recursive=True)):
    if os.path.isfile(path):
      st = os.stat(path)
      h.update(f'{os.path.relpath(path, manual_dir)}|{st.st_size}|{st.st_mtime_ns}'.encode())
  return 'v' + h.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------- TFDS

def _features(kind: str):
  import tensorflow_datasets as tfds
  text = tfds.features.Text()
  if kind == 'ranking':
    return tfds.features.FeaturesDict({'prompt': text, 'responses': tfds.features.Sequence(tfds.features.Text()),
                                       'ranking': tfds.features.Sequence(np.int32), 'origin': text})
  return tfds.features.FeaturesDict({'prompt': text, 'response': text, 'origin': text})


def builder_class(name: str):
  """The GeneratorBasedBuilder of a format (one class per format, registered with TFDS once)."""
  if name in _CLASSES:
    return _CLASSES[name]
  import tensorflow_datasets as tfds
  kind, fmt = FORMATS[name][0], name

  class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = fmt
    VERSION = tfds.core.Version('1.0.0')
    code_path = None  # no checksums/metadata files next to the code (and no importlib_resources needed)
    MANUAL_DOWNLOAD_INSTRUCTIONS = f'Put the downloaded files of {name} in the folder named after "{name}:".'

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=_features(kind), metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
      manual = os.fspath(dl_manager.manual_dir)
      splits = files_of(name, manual)
      self.info.metadata.update({'kind': kind, **{k: {split: v() for split in splits}
                                                  for k, v in (('errors', list), ('skipped', int), ('filtered', int))}})
      return {split: self._generate_examples(manual, split) for split in splits}

    def _generate_examples(self, manual, split):
      meta = self.info.metadata
      count = 0
      for origin, rec, error in parse(name, manual, split):
        if error is not None:
          meta['skipped'][split] += 1
          if len(meta['errors'][split]) < MAX_KEPT_ERRORS:
            meta['errors'][split].append(error)
          continue
        if rec is None:
          meta['filtered'][split] += 1
          continue
        count += 1
        if kind == 'ranking':
          yield origin, {'prompt': rec['prompt'], 'responses': rec['responses'], 'ranking': rec['ranking'],
                         'origin': origin}
        else:
          yield origin, {'prompt': rec['prompt'], 'response': rec['response'], 'origin': origin}
      if not count:
        meta.setdefault('empty_splits', []).append(split)

  Builder.__name__ = Builder.__qualname__ = ''.join(p.title() for p in name.split('_'))
  _CLASSES[name] = Builder
  return Builder


_CLASSES: dict[str, type] = {}


def build(name: str, manual_dir: str, data_dir: str):
  """Build (or reuse) the array_record dataset of `name` from `manual_dir`; returns the prepared builder."""
  import tensorflow_datasets as tfds
  if name not in FORMATS:
    raise ValueError(f'unknown dataset format {name!r}; known: {", ".join(FORMATS)}')
  if not os.path.isdir(manual_dir):
    raise records.RecordError(f'{manual_dir}:0: folder does not exist')
  if 'train' not in files_of(name, manual_dir):
    pats = ', '.join(FORMATS[name][1]['train'])
    raise records.RecordError(f'{manual_dir}:0: no {name} training files ({pats}) in this folder')
  tfds.disable_progress_bar()
  cls = builder_class(name)
  config = tfds.core.BuilderConfig(name=fingerprint(manual_dir))
  from absl import logging
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # TFDS warns that the config (the fingerprint) is not a listed one
  try:
    builder = cls(data_dir=data_dir, config=config, file_format='array_record')
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  finally:
    logging.set_verbosity(verbosity)
  return builder
