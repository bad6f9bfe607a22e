"""Public benchmarks on the user's files: TruthfulQA multiple choice and RealToxicityPrompts, for any of our LMs.

  truthfulqa.py      TruthfulQA MC1/MC2 as lm-evaluation-harness scores them: the files, the QA primer, the metrics
  toxicity.py        RealToxicityPrompts: the prompts, samples, a toxicity scorer, expected maximum toxicity
  loglikelihoods.py  summed log-likelihoods of continuations with lm-eval's tokenisation (also jax_rlhf.lm_eval's)

Here is what the eval stage calls: `Benchmarks(config)` reads the files and loads the scorer once, then runs per
compared model (lm-eval tasks through `jax_rlhf.lm_eval`); `run_benchmarks` for one model; `add_alignment_tax`;
the benchmark table of results.json (`table_rows`, `format_table`, `REPORT_NOTE`). A malformed file is a
`UserError('file:line: what')` (exit 2 through main).
"""
from __future__ import annotations

from jax_rlhf.benchmarks import toxicity, truthfulqa
from jax_rlhf.benchmarks.loglikelihoods import Loglikelihoods
from jax_rlhf.train.common import UserError


def enabled(ec) -> bool:
  """Whether the eval config asks for any benchmark."""
  return bool(ec.get('truthfulqa') or ec.get('toxicity_prompts') or ec.get('lm_eval_tasks'))


class Benchmarks:
  """The benchmark inputs of one eval stage (files read and the scorer loaded once), run per model:
  `Benchmarks(config)(model, tok) -> {'truthfulqa': {mc1, mc2, n}, 'toxicity': {expected_max, probability,
  n_prompts, ...}, 'lm_eval': {task: {metric: value}}}` (only the configured keys)."""

  def __init__(self, config):
    ec = config.eval
    self.config = config
    self.tqa = truthfulqa.read_truthfulqa(ec.truthfulqa) if ec.truthfulqa else None
    self.rtp = None
    if ec.toxicity_prompts:
      if ec.toxicity_n < 1:
        raise UserError(f'eval.toxicity_n must be >= 1, got {ec.toxicity_n}')
      self.rtp = toxicity.read_toxicity_prompts(ec.toxicity_prompts, ec.toxicity_challenging)[:ec.toxicity_n]
      self.scorer = toxicity.load_scorer(ec.toxicity_scorer, batch_size=ec.batch_size)

  def __call__(self, model, tok) -> dict:
    c, ec = self.config, self.config.eval
    out = {}
    if self.tqa is not None:
      scorer = Loglikelihoods(model, batch_size=ec.batch_size, pad_id=tok.pad_token_id or 0)
      out['truthfulqa'] = truthfulqa.truthfulqa(scorer, tok, self.tqa)
    if self.rtp is not None:
      metrics, _, _ = toxicity.toxicity(model, tok, self.rtp, self.scorer, n_samples=ec.toxicity_samples,
                                        max_new_tokens=ec.toxicity_max_new_tokens, top_p=ec.toxicity_top_p,
                                        respectful=ec.toxicity_respectful, seed=c.seed + 17, batch_size=ec.batch_size,
                                        max_prompt_len=c.data.max_prompt_len, chat_template=c.data.chat_template)
      out['toxicity'] = metrics
    if ec.lm_eval_tasks:
      from jax_rlhf import lm_eval
      res = lm_eval.evaluate(model, tok, list(ec.lm_eval_tasks), include_path=ec.lm_eval_include or None,
                             limit=ec.lm_eval_limit or None, batch_size=ec.batch_size)
      out['lm_eval'] = lm_eval.task_metrics(res)
    return out


def run_benchmarks(config, model, tokenizer) -> dict:
  """One model's benchmarks from `config.eval` (see `Benchmarks`); reads the files each call."""
  return Benchmarks(config)(model, tokenizer)


def add_alignment_tax(results: dict, base: str = 'sft') -> None:
  """lm-eval's alignment tax per task and metric: results[m]['lm_eval_tax'][task][metric] = model - base."""
  if base not in results or 'lm_eval' not in results[base]:
    return
  for name, r in results.items():
    if 'lm_eval' in r:
      r['lm_eval_tax'] = {t: {k: v - results[base]['lm_eval'][t][k] for k, v in ms.items()
                              if k in results[base]['lm_eval'].get(t, {})} for t, ms in r['lm_eval'].items()}


REPORT_NOTE = ('TruthfulQA: MC1 = share of questions whose highest-likelihood answer is the true one, MC2 = '
               'probability mass on the true answers (0-shot after the QA primer, as lm-eval). RealToxicityPrompts: '
               'expected maximum toxicity over the samples of a prompt and the share of prompts with a sample of '
               'toxicity > 0.5 (lower is better). lm-eval tasks: the value, and in brackets the model minus SFT '
               '(the alignment tax when it falls).')


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
  """(header, rows) of the benchmark columns (TruthfulQA MC1/MC2, toxicity, lm-eval per task: value and the
  difference to SFT) of results.json's `models`; ([], []) when no model has any."""
  names = [n for n, r in results.items() if any(k in r for k in ('truthfulqa', 'toxicity', 'lm_eval'))]
  if not names:
    return [], []
  tasks = sorted({(t, m) for n in names for t, ms in results[n].get('lm_eval', {}).items() for m in ms})
  header = ['model']
  has = lambda k: any(k in results[n] for n in names)
  if has('truthfulqa'):
    header += ['TruthfulQA MC1', 'MC2']
  if has('toxicity'):
    header += ['exp. max toxicity', 'toxicity prob.']
  header += [f'{t} {m}' for t, m in tasks]
  rows = []
  for n in names:
    r = results[n]
    row = [n]
    if has('truthfulqa'):
      q = r.get('truthfulqa')
      row += [f'{q["mc1"]:.3f}', f'{q["mc2"]:.3f}'] if q else ['-', '-']
    if has('toxicity'):
      x = r.get('toxicity')
      row += [f'{x["expected_max"]:.3f}', f'{x["probability"]:.3f}'] if x else ['-', '-']
    for t, m in tasks:
      v = r.get('lm_eval', {}).get(t, {}).get(m)
      d = r.get('lm_eval_tax', {}).get(t, {}).get(m)
      row.append('-' if v is None else f'{v:.4f}' + ('' if d is None or n == 'sft' else f' ({d:+.4f})'))
    rows.append(row)
  return header, rows


def format_table(results: dict) -> str:
  """The benchmark table for the terminal; '' when no model has a benchmark."""
  header, rows = table_rows(results)
  if not rows:
    return ''
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
  line = lambda cells: '| ' + ' | '.join(c.ljust(w) for c, w in zip(cells, widths)) + ' |'
  sep = '|' + '|'.join('-' * (w + 2) for w in widths) + '|'
  return '\n'.join([line(header), sep, *[line(r) for r in rows]])
