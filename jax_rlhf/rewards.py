"""Reward functions on the host: the specs of `grpo.rewards`, their loading, scoring and mixing.

A reward spec is `name[:weight]` (weight > 0, default 1):
  rm                    the reward model at the last real token. Its score is computed in the compiled rollout
                        (`rollout.rollout`); here it is only read back and mixed.
  task:verify           the task's exact checker `task.verify(prompt, response)`: 1.0 / 0.0, or None where it
                        cannot check (that function then says nothing for that response).
  task:gold             the task's own labeler score `task.gold_score(prompt, response)` in [0, 1]: an *oracle*
                        reward (Gao et al. 2022's "gold reward model"). Not a training signal a real user has;
                        it measures what RL on this policy reaches with a perfect reward model, the bound any
                        learned RM (rounds of fresh rankings included) works under.
  module.path:function  a user's `(prompts: list[str], responses: list[str]) -> list[float]` on the host
                        (TRL's reward_funcs); a raise, NaN or wrong length is one line naming it
                        (`rollout.call_reward_fn`, common.UserError, exit 2).
Mixed per response over the functions that spoke (`mix_rewards`): mean, r = sum_k w_k s_k / sum_k w_k; first,
r = w_k s_k of the first listed function that spoke (a verifier first decides alone where it can check; the RM
speaks elsewhere). Where none spoke, r = 0.

No stage lives here: a stage (train/grpo.py) parses its specs, loads the functions before any model
(`host_functions`, so a bad spec fails fast), and calls `HostRewards` between its compiled rollout and its
compiled advantages.
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable, Mapping, Sequence

import numpy as np

from jax_rlhf import sampling
from jax_rlhf import sharding as shd
from jax_rlhf.train import common
from jax_rlhf.train import rollout as rollout_lib

REWARD_MIXES = ('mean', 'first')
BUILTIN = ('rm', 'task:verify', 'task:gold')


def parse_rewards(specs: Sequence[str]) -> list[tuple[str, float]]:
  """`grpo.rewards` -> [(name, weight)]: each spec is `name[:weight]` (rm, task:verify, task:gold,
  module.path:function); a trailing `:<number>` is the weight (default 1). A bad spec raises ValueError (one line)."""
  if isinstance(specs, str):
    specs = (specs,)
  out = []
  for spec in specs:
    name, _, tail = str(spec).strip().rpartition(':')
    try:
      weight = float(tail)
    except ValueError:
      name, weight = str(spec).strip(), 1.0
    if not name or not weight > 0 or not np.isfinite(weight):
      raise ValueError(f'grpo.rewards: {spec!r} must be name[:weight] with a weight > 0 (rm, task:verify, '
                       f'task:gold or module.path:function)')
    if name not in BUILTIN and (':' not in name or name.startswith(':') or name.endswith(':')):
      raise ValueError(f'grpo.rewards: unknown reward {name!r}; use rm, task:verify, task:gold or '
                       f'module.path:function')
    if name in [n for n, _ in out]:
      raise ValueError(f'grpo.rewards: {name} appears twice')
    out.append((name, weight))
  if not out:
    raise ValueError('grpo.rewards is empty; use rm, task:verify, task:gold or module.path:function')
  return out


def mix_rewards(parts: Mapping[str, np.ndarray], weights: Mapping[str, float], mode: str = 'mean') -> np.ndarray:
  """The mix of reward functions: [R] float64.

  parts: name -> [R] scores, NaN where that function says nothing (task:verify's None), in `grpo.rewards` order;
  weights: name -> w > 0. Per response i, over the functions k that spoke on i:
    mean   r_i = sum_k w_k s_ki / sum_k w_k (weight-normalised);
    first  r_i = w_k s_ki of the first function (in order) that spoke: a verifier listed first decides alone
           where it can check, and the later ones (the RM) speak only where it cannot.
  r_i = 0 where no function spoke.
  """
  if mode not in REWARD_MIXES:
    raise ValueError(f'grpo.reward_mix must be one of {" | ".join(REWARD_MIXES)}, got {mode!r}')
  num = 0.0
  den = 0.0
  for name, s in parts.items():
    s = np.asarray(s, np.float64)
    spoke = ~np.isnan(s)
    if mode == 'first':
      spoke = spoke & (np.asarray(den) == 0)  # nobody before it spoke
    num = num + np.where(spoke, weights[name] * np.nan_to_num(s), 0.0)
    den = den + np.where(spoke, 1.0 if mode == 'first' else weights[name], 0.0)
  den = np.asarray(den)
  return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def load_user_fn(spec: str) -> Callable:
  """`module.path:function` -> the function (a missing module or name is a UserError, one line)."""
  mod, _, fn = spec.rpartition(':')
  try:
    f = getattr(importlib.import_module(mod), fn)
  except (ImportError, AttributeError) as e:
    raise common.UserError(f'grpo.rewards: cannot load reward function {spec}: {type(e).__name__}: '
                           f'{" ".join(str(e).split())}') from None
  if not callable(f):
    raise common.UserError(f'grpo.rewards: {spec} is not callable')
  return f


def verify_fn(task) -> Callable:
  """task:verify as a host reward function: one float per response, NaN where the task cannot check."""
  def verify(prompts, responses):
    out = []
    for p, r in zip(prompts, responses):
      v = task.verify(p, r)
      out.append(np.nan if v is None else float(v))
    return out
  return verify


def gold_fn(task) -> Callable:
  """task:gold as a host reward function: the labeler's noiseless score of each response (the oracle)."""
  def gold(prompts, responses):
    return [float(task.gold_score(p, r)) for p, r in zip(prompts, responses)]
  return gold


def host_functions(config, names: Sequence[str]) -> dict[str, Callable]:
  """The host functions among `names` (parsed specs): task:verify and task:gold from the config's embedded task,
  and each user's module.path:function; rm is scored in the graph and has none. A missing task or an unloadable
  function is a UserError (one line), raised before any model is loaded."""
  fns: dict[str, Callable] = {}
  for name, make in (('task:verify', verify_fn), ('task:gold', gold_fn)):
    if name in names:
      task = common.get_task(config)
      if task is None:
        raise common.UserError(f'grpo.rewards: {name} needs an embedded task (task.name), and task.name is empty')
      fns[name] = make(task)
  for n in names:
    if n not in BUILTIN:
      fns[n] = load_user_fn(n)
  return fns


class HostRewards:
  """exp -> (mixed rewards [R], metrics) on the host: decode the responses, score them with each function of
  `grpo.rewards` (rm: the rollout's in-graph score), mix (`mix_rewards`). `prompt_texts(exp)` gives the R
  prompt texts in row order (group-major). Metrics: `reward/<name>` (the mean where it spoke) and
  `reward/<name>/spoke` (the share of responses it scored)."""

  def __init__(self, rewards: list[tuple[str, float]], fns: Mapping[str, Callable], tokenizer, eos_id: int,
               mode: str = 'mean'):
    self.mode = mode
    self.rewards, self.fns, self.eos_id = rewards, dict(fns), eos_id
    self.decode = functools.partial(sampling.decode_responses, tokenizer)
    self.weights = dict(rewards)

  def __call__(self, exp, prompt_texts: list[str]):
    responses = rollout_lib.host_responses(exp, self.decode, self.eos_id)
    parts, metrics = {}, {}
    for name, _ in self.rewards:
      if name == 'rm':
        s = shd.to_host(exp['rm_score']).astype(np.float64)
      elif name == 'task:verify':
        s = np.asarray(self.fns[name](prompt_texts, responses), np.float64)  # NaN = cannot check
      else:
        s = rollout_lib.call_reward_fn(self.fns[name], prompt_texts, responses).astype(np.float64)
      parts[name] = s
      spoke = ~np.isnan(s)
      metrics[f'reward/{name}/spoke'] = float(np.mean(spoke))
      if spoke.any():
        metrics[f'reward/{name}'] = float(np.mean(s[spoke]))
    return mix_rewards(parts, self.weights, self.mode).astype(np.float32), metrics
