"""lm-evaluation-harness wall time and log-likelihood requests per second: our JAX backend vs lm-eval's `hf`.

Workload: the yardstick's model shape (GPT-2 layout, 4 layers, 4 heads, width 256, 256 positions, random
weights, fp32) with a BPE tokenizer trained here (vocab 1,000), saved as an HF export; a local
multiple-choice task of 200 questions x 4 choices (800 loglikelihood requests, contexts of ~40-120 tokens)
as a YAML + JSONL (offline). Both backends run `lm_eval.simple_evaluate` on the same export, batch 32,
interleaved ours / hf / ours / hf in one process; the first run of each includes its start-up (our compiles,
torch's first calls), the second is warm. Timed: the whole simple_evaluate call (wall), and the time inside
each backend's `_loglikelihood_tokens` (requests/s = requests / that time). Accuracies must agree (1e-4).

  /work/venv/bin/python -m bench.lm_eval [--docs 200] [--batch 32]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

from bench import common

WORDS = ('river stone cloud lamp bread ship song door tree bird cat dog house garden window table chair road hill '
         'moon star light water fire wind rain snow summer winter morning evening city village market').split()


def _docs(n: int, seed: int = 0) -> list[dict]:
  rng = random.Random(seed)
  out = []
  for i in range(n):
    q = ' '.join(rng.choice(WORDS) for _ in range(rng.randint(20, 70)))
    choices = [' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(4)]
    out.append({'question': q + f' ({i})?', 'choices': choices, 'label': rng.randrange(4)})
  return out


def _setup(d: str, n_docs: int) -> str:
  import torch
  import transformers
  from tests import fixtures
  docs = _docs(n_docs)
  tok_dir = fixtures.write_tokenizer(os.path.join(d, 'tok'), [x['question'] for x in docs], vocab_size=1000)
  tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=256, n_layer=4, n_head=4,
                                bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
  export = os.path.join(d, 'export')
  transformers.GPT2LMHeadModel(cfg).save_pretrained(export)
  tok.save_pretrained(export)
  tasks = os.path.join(d, 'tasks')
  os.makedirs(tasks)
  with open(os.path.join(tasks, 'mc.jsonl'), 'w') as f:
    f.writelines(json.dumps(x) + '\n' for x in docs)
  with open(os.path.join(tasks, 'bench_mc.yaml'), 'w') as f:
    f.write(f'task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {tasks}/mc.jsonl\n'
            'validation_split: validation\noutput_type: multiple_choice\n'
            'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
            'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
  return d


def _timed(lm, method: str):
  """Wrap lm.<method> to add its wall time to lm._bench_s."""
  fn = getattr(lm, method)
  lm._bench_s = 0.0  # pylint: disable=protected-access

  def wrapped(*a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    lm._bench_s += time.perf_counter() - t  # pylint: disable=protected-access
    return out
  setattr(lm, method, wrapped)
  return lm


def run_once(kind: str, d: str, batch: int) -> dict:
  import lm_eval
  from lm_eval.tasks import TaskManager
  t0 = time.perf_counter()
  export = os.path.join(d, 'export')
  if kind == 'ours':
    from jax_rlhf import lm_eval as ours
    lm = ours.JaxLM(pretrained=export, batch_size=batch)
  else:
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=export, dtype='float32', device='cpu', batch_size=batch)
  _timed(lm, '_loglikelihood_tokens')
  n = {'n': 0}
  inner = lm._loglikelihood_tokens  # pylint: disable=protected-access

  def counting(requests, *a, **kw):
    n['n'] += len(requests)
    return inner(requests, *a, **kw)
  lm._loglikelihood_tokens = counting  # pylint: disable=protected-access
  res = lm_eval.simple_evaluate(model=lm, tasks=['bench_mc'], bootstrap_iters=0, log_samples=False,
                                task_manager=TaskManager(include_path=os.path.join(d, 'tasks'), include_defaults=False))
  wall = time.perf_counter() - t0
  r = res['results']['bench_mc']
  spent = lm._bench_s  # pylint: disable=protected-access
  return {'backend': kind, 'wall_s': round(wall, 2), 'loglik_s': round(spent, 2),
          'requests': n['n'], 'requests_per_s': round(n['n'] / spent, 1),
          'acc': r['acc,none'], 'acc_norm': r['acc_norm,none']}


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--docs', type=int, default=200)
  p.add_argument('--batch', type=int, default=32)
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as d:
    _setup(d, args.docs)
    runs = []
    for kind in ('ours', 'hf', 'ours', 'hf'):
      r = run_once(kind, d, args.batch)
      r['machine_load'] = common.load_avg()
      runs.append(r)
      print(json.dumps(r), flush=True)
  ours_w, hf_w = runs[2], runs[3]
  assert abs(ours_w['acc'] - hf_w['acc']) < 1e-4 and abs(ours_w['acc_norm'] - hf_w['acc_norm']) < 1e-4, runs
  print(json.dumps({'bench': 'lm_eval', 'docs': args.docs, 'batch': args.batch, 'machine': common.machine(),
                    'warm_wall_ratio_hf_over_ours': round(hf_w['wall_s'] / ours_w['wall_s'], 2),
                    'warm_rps_ratio_ours_over_hf': round(ours_w['requests_per_s'] / hf_w['requests_per_s'], 2),
                    'runs': runs}))


if __name__ == '__main__':
  main()
