"""Check a data source before anyone spends accelerator hours on it.

  python -m jax_rlhf.data hh_rlhf:~/data/hh-rlhf --kind ranking --tokenizer ~/models/gpt2
  python -m jax_rlhf.data tldr_sft:~/data/tldr --kind demonstration --config configs/presets/gpt2_tldr.py

Prints the record count, token-length percentiles against the configured context (data.max_prompt_len,
data.max_response_len, data.seq_len), how many would be truncated, and the first errors as `file:line: what`.
Exit status 2 when there are errors (or the source cannot be read), 0 otherwise. Lengths and the tokenizer
come from `--config` (a config file, as for jax_rlhf.main) unless given as flags.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import numpy as np

from jax_rlhf.data import records, sources
from jax_rlhf.data import tokenizer as tok_lib

PERCENTILES = (50, 90, 99, 100)


def _config(path_arg: str | None):
  from jax_rlhf.config import base_config
  if not path_arg:
    return base_config()
  path, _, arg = path_arg.partition(':')
  if not os.path.isfile(path):
    raise records.RecordError(f'{path}:0: config file does not exist')
  spec = importlib.util.spec_from_file_location('_checked_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _lengths_line(name: str, lengths: list[int], limit: int | None, what: str) -> str:
  if not lengths:
    return f'{name}: none'
  p = np.percentile(np.asarray(lengths), PERCENTILES).astype(int)
  line = f'{name} tokens: ' + ' '.join(f'p{q}={v}' for q, v in zip(PERCENTILES, p))
  if limit is not None:
    over = sum(n > limit for n in lengths)
    line += f' | limit {limit}: {over} ({100 * over / len(lengths):.1f}%) {what}'
  return line


def check(spec: str, kind: str, tok, *, split: str, max_prompt_len: int, max_response_len: int, seq_len: int,
          chat_template: str, data_dir: str, max_errors: int, out=None) -> int:
  """Print the report; return the exit status (2 when there are errors)."""
  out = out or sys.stdout
  try:
    recs = sources.load(spec, kind, split=split, on_error='skip', data_dir=data_dir)
  except (records.RecordError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  items = tok_lib.format_records(tok, recs.items, chat_template) if kind != 'text' else recs.items
  print(f'{spec} ({split} split, {kind} records): {len(items)} records, {recs.skipped} bad', file=out)

  def count(texts):
    return [len(x) for x in tok(texts, add_special_tokens=False)['input_ids']] if texts else []

  if kind == 'text':
    lengths = count([r['text'] for r in items])
    print(_lengths_line('text', lengths, None, ''), file=out)
    total = sum(lengths) + len(lengths)  # + EOS between documents
    print(f'packed: {total} tokens = {total // seq_len} sequences of data.seq_len={seq_len}', file=out)
  else:
    print(_lengths_line('prompt', count([r['prompt'] for r in items]), max_prompt_len,
                        'would be cut from the left'), file=out)
    if kind != 'prompt':
      responses = [r['response'] for r in items] if kind == 'demonstration' else \
          [x for r in items for x in r['responses']]
      lengths = [n + 1 for n in count(responses)]  # + EOS
      print(_lengths_line('response (+EOS)', lengths, max_response_len, 'would be cut from the right'), file=out)
    if kind == 'ranking' and items:
      ks = [len(r['responses']) for r in items]
      print(f'responses per prompt: min {min(ks)} max {max(ks)} mean {np.mean(ks):.2f}', file=out)
  if recs.errors:
    print(f'errors (first {min(max_errors, len(recs.errors))} of {recs.skipped}):', file=out)
    for e in recs.errors[:max_errors]:
      print(f'  {e}', file=out)
    return 2
  return 0


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog='python -m jax_rlhf.data', description=__doc__.split('\n\n')[0])
  ap.add_argument('source', help='jsonl:PATH | tfds:NAME[:SPLIT] | hh_rlhf:DIR | tldr_sft:DIR | '
                  'tldr_comparisons:DIR | rankings:DIR')
  ap.add_argument('--kind', required=True, choices=records.KINDS)
  ap.add_argument('--split', default='all', choices=('all', 'train', 'eval'),
                  help='all: a whole file, or a dataset\'s train split; train/eval: as a stage splits it')
  ap.add_argument('--config', help='a config file[:variants] for the lengths and the tokenizer')
  ap.add_argument('--tokenizer', help='tokenizer folder (default: data.tokenizer, or the embedded task\'s)')
  ap.add_argument('--max_prompt_len', type=int)
  ap.add_argument('--max_response_len', type=int)
  ap.add_argument('--seq_len', type=int)
  ap.add_argument('--tfds_dir', help='where builds are written (default: data.tfds_dir or ~/tensorflow_datasets)')
  ap.add_argument('--max_errors', type=int, default=10)
  args = ap.parse_args(argv)
  try:
    config = _config(args.config)
  except (records.RecordError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  d = config.data
  tok_path = os.path.expanduser(args.tokenizer or d.tokenizer)
  if not tok_path:
    from jax_rlhf import tasks
    try:
      task = tasks.get_task(config)
    except tasks.TaskError as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    if task is None:
      print('error: no tokenizer: set --tokenizer or data.tokenizer (the config has no task)', file=sys.stderr)
      return 2
    tok_path = task.tokenizer_path()
  if not os.path.isdir(tok_path):
    print(f'error: tokenizer folder {tok_path} does not exist', file=sys.stderr)
    return 2
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(tok_path)
  status = check(args.source, args.kind, tok, split=args.split,
                 max_prompt_len=args.max_prompt_len or d.max_prompt_len,
                 max_response_len=args.max_response_len or d.max_response_len, seq_len=args.seq_len or d.seq_len,
                 chat_template=d.chat_template, data_dir=args.tfds_dir or d.tfds_dir, max_errors=args.max_errors)
  return status


if __name__ == '__main__':
  sys.exit(main())
