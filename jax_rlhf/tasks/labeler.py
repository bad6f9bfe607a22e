"""The programmatic labeler of instruct_world: scoring rules, noisy rankings and their agreement.

These are the pure parts of the labeler (no world state); `instruct_world.World` parses a prompt and calls
them. The *gold* score of a response is a number in [0, 1]; a ranking orders K responses by their gold
score plus noise.

Noise model (Plackett-Luce): a labeler ranks K responses by `gold / rank_noise + Gumbel(0, 1)`, descending.
Under this model a labeler puts response i above response j with probability
`sigmoid((gold_i - gold_j) / rank_noise)`, i.e. the Bradley-Terry model that the reward model's loss
assumes, whatever the other K - 2 responses are.

Agreement (what "73%" means): two independent labelers rank the same K responses; over every pair of
responses with *different* gold scores, the agreement is the fraction of pairs that both put in the same
order. InstructGPT reports 72.6% +- 1.5% agreement between its training labelers. The agreement depends on
the gap between gold scores, hence on the mix of responses; `expected_agreement` computes it exactly and
`measured_agreement` by sampling, for any mix (for instance the pipeline's own SFT samples).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

REFUSAL = 'i cannot help with that.'
IDK = "i don't know"


def list_score(target: Sequence[str], response: str, pool: frozenset[str]) -> float:
  """Exactness with partial credit, for an answer that is a space-separated list of items.

  A scalar answer (count, first, last) is a list of one item. `pool` holds the items a well-formed answer
  may contain (e.g. lowercase letters). With `frac` = per-position matches / max(len(response), len(target)):
    exact answer                                      1.0
    well formed (every piece in pool), right length   0.2 + 0.6 * frac   (at most 0.7 when one item is wrong)
    well formed, wrong length                         0.1 + 0.4 * frac   (the answer said twice: 0.3)
    anything else (extra words, punctuation, double   0.25 * frac        (so extra text after a right answer,
      spaces, newlines, empty)                                             or garbage, scores low)
  Scores are rounded to 6 decimals.
  """
  if response == " ".join(target):
    return 1.0
  got = response.split(" ")
  matches = sum(a == b for a, b in zip(got, target))
  frac = matches / max(len(got), len(target))
  if not all(piece in pool for piece in got):
    score = 0.25 * frac
  elif len(got) != len(target):
    score = 0.1 + 0.4 * frac
  else:
    score = 0.2 + 0.6 * frac
  return round(score, 6)  # equal cases compare equal, free of float noise


def noisy_ranking(scores: Sequence[float], noise: float, rng: np.random.Generator) -> list[int]:
  """Indices of `scores`, best first, as one noisy labeler orders them (Plackett-Luce, see module doc).

  noise = 0 gives the gold order. Equal keys (only possible when noise = 0) are ordered at random.
  """
  scores = np.asarray(scores, dtype=np.float64)
  keys = scores / noise + rng.gumbel(size=scores.shape) if noise > 0 else scores
  tiebreak = rng.random(scores.shape)
  return [int(i) for i in np.lexsort((tiebreak, -keys))]


def _different_pairs(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  i, j = np.triu_indices(len(scores), k=1)
  keep = scores[i] != scores[j]
  return i[keep], j[keep]


def expected_agreement(score_groups: Sequence[Sequence[float]], noise: float) -> float:
  """Exact expected agreement of two independent labelers, over pairs with different gold scores.

  For a pair with gap d, each labeler orders it like the gold score with p = sigmoid(|d| / noise); the two
  agree with probability p^2 + (1 - p)^2. The result is the mean over all such pairs of all groups.
  """
  total, n = 0.0, 0
  for scores in score_groups:
    scores = np.asarray(scores, dtype=np.float64)
    i, j = _different_pairs(scores)
    gap = np.abs(scores[i] - scores[j])
    p = 1.0 / (1.0 + np.exp(-gap / noise)) if noise > 0 else np.ones_like(gap)
    total += float(np.sum(p**2 + (1 - p) ** 2))
    n += len(gap)
  return total / max(n, 1)


def measured_agreement(score_groups: Sequence[Sequence[float]], noise: float, rng: np.random.Generator) -> float:
  """Sampled agreement: two `noisy_ranking`s per group, fraction of different-score pairs ordered alike."""
  agree, n = 0, 0
  for scores in score_groups:
    scores = np.asarray(scores, dtype=np.float64)
    i, j = _different_pairs(scores)
    pos_a = np.argsort(noisy_ranking(scores, noise, rng))  # position of each response in labeler A's order
    pos_b = np.argsort(noisy_ranking(scores, noise, rng))
    agree += int(np.sum((pos_a[i] < pos_a[j]) == (pos_b[i] < pos_b[j])))
    n += len(i)
  return agree / max(n, 1)
