"""How right is the RM judge's best-vs-worst pair of online DPO, measured against the task's gold score, on a
policy's own samples? The measurement behind `dpo.online_min_gap` (README, "The comparison plan").

  python scripts/online_dpo_judge.py --workdir runs/compare sft dpo_online ppo [--prompts 512]

For each named run (its W/<run>/hf policy) it samples `dpo.online_samples` responses at `dpo.online_temperature`
for the first --prompts training prompts (`dpo_online.sample_round`, the stage's own round, RM `W/rm`, reference
`W/sft`), scores each with the RM and the task's gold score, and prints: the share of prompts without a pair
(all samples the same) and their gold, the gold of the RM's best and worst sample, and, by RM score gap
(best - worst), how often the RM's best is better / as good / worse by gold than its worst.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=wrong-import-position
from jax_rlhf import sampling
from jax_rlhf import sharding as shd
from jax_rlhf.config import stage_config
from jax_rlhf.data import batches
from jax_rlhf.models import hf
from jax_rlhf.train import common, dpo_online
from jax_rlhf.train import state as state_lib

GAP_BINS = ((0.0, 0.25), (0.25, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, float('inf')))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--prompts', type=int, default=512)
  ap.add_argument('--seed', type=int, default=3)
  ap.add_argument('runs', nargs='+', help='run names whose hf/ policy to sample, e.g. sft dpo_online ppo')
  args = ap.parse_args()
  c = stage_config('pipeline', 'compare')
  w = args.workdir
  tok, mesh, task = common.load_tokenizer(c), common.mesh(c), common.get_task(c)
  if task is None:
    raise SystemExit('the gold score needs an embedded task (task.name)')
  recs = common.records_for(c, w, 'prompts', 'train', tok, {})[:args.prompts]
  p_len, r_len = c.data.max_prompt_len, c.data.max_response_len
  arrays, _ = batches.prompts(tok, recs, p_len)
  batch = shd.put_batch({k: arrays[k] for k in ('prompt', 'prompt_mask')}, mesh)
  g, frozen = {}, {}
  rm = hf.load_scalar_model(os.path.join(common.require_stage(w, 'rm', 'judge'), 'hf'), dtype=c.model.dtype,
                            param_dtype=c.model.param_dtype)
  g['reward'], frozen['reward'], _ = state_lib.place_state(rm, None, mesh)
  ref = common.load_lm(os.path.join(common.require_stage(w, 'sft', 'judge'), 'hf'), c, tok)
  g['reference'], frozen['reference'], _ = state_lib.place_state(ref, None, mesh)
  settings = dpo_online.online_settings(c.dpo, tok, r_len)
  for run in args.runs:
    policy = common.load_lm(os.path.join(common.require_stage(w, run, 'judge'), 'hf'), c, tok)
    g['policy'], state, _ = state_lib.place_state(policy, None, mesh)
    fn = jax.jit(lambda s, f, b, k: dpo_online.sample_round(g, settings, 1, {'policy': s, **f}, b, k))
    pool, scores, _ = fn(state, frozen, batch, jax.random.key(args.seed))
    host = {k: shd.to_host(v)[0] for k, v in pool.items()}
    scores = shd.to_host(scores)[0]  # [B, n]
    tokens, att = host['tokens'][..., p_len:], host['attention_mask'][..., p_len:]
    b, n, length = tokens.shape
    texts = sampling.decode_responses(tok, tokens.reshape(-1, length),
                                      ((att > 0) & (tokens != tok.eos_token_id)).reshape(-1, length))
    gold = np.array([task.gold_score(recs[i // n]['prompt'], t) for i, t in enumerate(texts)]).reshape(b, n)
    pair = host['valid'][:, 1]
    rows = np.arange(b)
    g_best, g_worst = gold[rows, scores.argmax(-1)], gold[rows, scores.argmin(-1)]
    gap = scores.max(-1) - scores.min(-1)
    print(f'== {run}: {b} prompts x {n}; no pair {1 - pair.mean():.3f} (their gold {gold[~pair, 0].mean():.3f}); '
          f'gold of the samples {gold.mean():.3f}, of the RM\'s best {g_best.mean():.3f}, of its worst '
          f'{g_worst.mean():.3f}, of the best by gold {gold.max(-1).mean():.3f}')
    for lo, hi in GAP_BINS:
      sel = pair & (gap >= lo) & (gap < hi)
      if sel.any():
        print(f'   RM gap [{lo}, {hi}): {sel.mean():.3f} of prompts; by gold the RM\'s best is better '
              f'{(g_best > g_worst)[sel].mean():.3f}, as good {(g_best == g_worst)[sel].mean():.3f}, worse '
              f'{(g_best < g_worst)[sel].mean():.3f}')


if __name__ == '__main__':
  main()
