"""evaluate.best_of_n against a plain loop over prompts, on fresh random scores with ties."""
import math

import numpy as np

from jax_rlhf import evaluate


def _reference(rm, gold, sft_gold, n):
  picks, oracle, outcome = [], [], []
  for p in range(len(gold)):
    best = 0
    for i in range(1, n):
      if rm[p, i] > rm[p, best]:
        best = i
    picks.append(gold[p, best])
    oracle.append(max(gold[p, :n]))
    outcome.append(1.0 if gold[p, best] > sft_gold[p] else 0.5 if gold[p, best] == sft_gold[p] else 0.0)
  return np.mean(picks), np.mean(oracle), np.mean(outcome)


def test_best_of_n_matches_a_loop():
  rng = np.random.default_rng(7)
  p, n_max = 200, 8
  rm = rng.integers(0, 5, size=(p, n_max)).astype(np.float64)  # integer scores: ties happen
  gold = rng.choice([0.0, 0.2, 0.5, 1.0], size=(p, n_max))
  sft_gold = rng.choice([0.0, 0.2, 0.5, 1.0], size=p)
  cats = rng.choice(['a', 'b'], size=p)
  table = evaluate.best_of_n(rm, gold, sft_gold, [1, 3, 8], list(cats))
  for n in (1, 3, 8):
    pick, oracle, win = _reference(rm, gold, sft_gold, n)
    r = table[str(n)]
    assert math.isclose(r['gold_score'], pick) and math.isclose(r['oracle_gold'], oracle)
    assert math.isclose(r['win_rate_vs_sft'], win)
    assert r['win_rate_vs_sft_ci95'][0] <= win <= r['win_rate_vs_sft_ci95'][1]
    assert math.isclose(r['kl_bound'], math.log(n) - (n - 1) / n)
    assert r['gold_score'] <= r['oracle_gold']
  assert table['1']['gold_score'] == table['1']['oracle_gold'] == gold[:, 0].mean()


def test_a_perfect_reward_model_reaches_the_oracle():
  rng = np.random.default_rng(3)
  gold = rng.random((50, 4))
  table = evaluate.best_of_n(gold * 3.0 - 1.0, gold, gold[:, 0], [4])
  assert math.isclose(table['4']['gold_score'], table['4']['oracle_gold'])
