"""Rollouts: G sampled responses per prompt, their policy and reference log-probs, and their scores.

A rollout is a dict of device arrays, one row per response (B prompts x G responses, group-major: row i
belongs to prompt i // G):
  seq, att      [B*G, P+N]  left-padded prompt, then the right-padded response (att is int32)
  tokens        [B*G, N]    the sampled response tokens (pad after EOS)
  mask          [B*G, N]    float32, 1 on the response's real tokens (EOS included)
  logp, logits  [B*G, N], [B*G, N, V]  the policy's log-probs of the sampled tokens under logits / T
                (teacher-forced forward, `scoring.response_logprobs`), and those logits
  ref_logp      [B*G, N]    the same under the reference model
  sampler_logp  [B*G, N]    the sampler's own log-probs (temperature 1, unfiltered; a consistency check)
  has_eos       [B*G]       bool, the response ended with EOS
  scores        [B*G]       float32, one score per response
Two ways to score:
  * in the graph, a scalar model read at the last real token (`rollout`, pure: the caller jits it with the
    rest of its step, e.g. PPO's experience is ONE jit of rollout + values + GAE);
  * on the host, a Python function `(prompts: list[str], responses: list[str]) -> list[float]` (a task's
    verifier, a user's reward): `HostScoredRollout` runs jit(generate) -> host decode + reward function ->
    the scores put back on the mesh, for the caller's next jit (advantages and update) to read.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_rlhf import sampling
from jax_rlhf import sharding as shd
from jax_rlhf.models import scoring
from jax_rlhf.train import common

RewardFn = Callable[[list, list], Sequence[float]]  # (prompts, responses) -> one float per response


@dataclasses.dataclass(frozen=True)
class Settings:
  """Static sampling settings of a rollout."""
  max_new_tokens: int   # N, response slots
  temperature: float    # sampling temperature; log-probs use logits / T (0: greedy, log-probs at T = 1)
  top_k: int            # 0: off
  top_p: float          # 1.0: off
  eos_id: int
  pad_id: int
  group_size: int = 1   # G responses per prompt (PPO 1; GRPO more)


def merge(graphdef, state) -> nnx.Module:
  """The module of a TrainState (params + rest)."""
  return nnx.merge(graphdef, state.params, state.rest)


def repeat_prompts(batch: Mapping[str, Any], group_size: int) -> dict:
  """Each prompt row G times, group-major: [B, P] -> [B*G, P], row i is prompt i // G."""
  if group_size == 1:
    return dict(batch)
  return {k: jnp.repeat(v, group_size, axis=0) for k, v in batch.items()}


def _sample(graphdef, state, prompt, prompt_mask, rng, settings: Settings) -> sampling.SampleOutput:
  """The one call of the sampler: [B, P] prompts -> [B*G, N] group-major responses, each prompt prefilled once
  and its KV cache shared by its G rows (`sampling.sample(num_samples=G)`)."""
  return sampling.sample(graphdef, nnx.merge_state(state.params, state.rest), prompt, prompt_mask, rng,
                         max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                         top_k=settings.top_k, top_p=settings.top_p, eos_token_id=settings.eos_id,
                         pad_token_id=settings.pad_id, num_samples=settings.group_size)


def reference_state(graphdefs: Mapping[str, Any], states: Mapping[str, Any]):
  """The state the reference runs on: states['reference'] (None: no reference), or with LoRA (no 'reference'
  state, a 'reference' graphdef with the adapters off) the policy's own state."""
  if 'reference' in states:
    return states['reference']
  return states['policy'] if graphdefs.get('reference') is not None else None


def generate(graphdefs: Mapping[str, Any], states: Mapping[str, Any], batch: Mapping[str, Any], rng,
             settings: Settings, *, policy_logp: bool = True) -> dict:
  """Sample G responses per prompt with the policy and score their tokens under policy and reference (pure).

  graphdefs/states: {'policy', 'reference', ...} graphdefs and TrainStates; batch: {'prompt', 'prompt_mask'}
  [B, P] left-padded. Returns the rollout dict without 'scores' (see the module docstring). A critic-free method
  that never moves the policy before the loss reads its log-probs passes policy_logp=False (no 'logp', 'logits':
  the loss's own forward gives them). The reference: states['reference']; with LoRA, states has no 'reference'
  and graphdefs['reference'] is the policy's with its adapters off, run on the policy's state; a None
  states['reference'] gives no 'ref_logp' (no KL term).
  """
  out = _sample(graphdefs['policy'], states['policy'], batch['prompt'], batch['prompt_mask'], rng, settings)
  batch = repeat_prompts(batch, settings.group_size)
  prompt, prompt_mask = batch['prompt'], batch['prompt_mask']  # [B*G, P]
  prompt_len = prompt.shape[1]
  tokens, mask = out.tokens, out.mask.astype(jnp.float32)  # [B*G, N]
  seq = jnp.concatenate([prompt, tokens], 1)  # [B*G, P+N]
  att = jnp.concatenate([prompt_mask, out.mask], 1)
  t = scoring.effective_temperature(settings.temperature)
  has_eos = jnp.any((tokens == settings.eos_id) & (out.mask > 0), axis=1)  # [B*G]
  ro = {'seq': seq, 'att': att, 'tokens': tokens, 'mask': mask, 'sampler_logp': out.logprobs, 'has_eos': has_eos}
  if policy_logp:
    ro['logp'], ro['logits'] = scoring.response_logprobs(merge(graphdefs['policy'], states['policy']), seq, att,
                                                         prompt_len, t)
  ref_state = reference_state(graphdefs, states)
  if ref_state is not None:
    ro['ref_logp'], _ = scoring.response_logprobs(merge(graphdefs['reference'], ref_state), seq, att, prompt_len, t)
  return ro


def rollout(graphdefs: Mapping[str, Any], states: Mapping[str, Any], batch: Mapping[str, Any], rng,
            settings: Settings, *, policy_logp: bool = True) -> dict:
  """`generate`, then each response's score from the reward model in the graph (pure; jit it in your step).

  graphdefs/states hold 'policy', 'reference' and 'reward' (a `ScalarModel`, read at the last real token by
  `scoring.reward_at_last`). Returns the rollout dict (module docstring), scores [B*G] float32. Without a
  'reward' state (None or missing) the scores are 0: the caller scores on the host (`host_responses`).
  """
  ro = generate(graphdefs, states, batch, rng, settings, policy_logp=policy_logp)
  if states.get('reward') is None:
    ro['scores'] = jnp.zeros(ro['has_eos'].shape, jnp.float32)
  else:
    ro['scores'] = scoring.reward_at_last(merge(graphdefs['reward'], states['reward']), ro['seq'], ro['att'])
  return ro


def function_name(fn: Callable) -> str:
  """module.qualname of a (possibly functools.partial-wrapped) function, for messages."""
  inner = getattr(fn, 'func', fn)
  name = getattr(inner, '__qualname__', None) or type(inner).__name__
  module = getattr(inner, '__module__', None)
  return f'{module}.{name}' if module and module != 'builtins' else name


def call_reward_fn(reward_fn: RewardFn, prompts: list, responses: list) -> np.ndarray:
  """reward_fn(prompts, responses) as float32 [len(responses)]; a raise, a wrong length, a non-number or a
  non-finite score is one line (`common.UserError`) naming the function."""
  name = function_name(reward_fn)
  try:
    got = reward_fn(list(prompts), list(responses))
  except Exception as e:  # a user's function: any failure is theirs to fix
    detail = ' '.join(str(e).split())
    raise common.UserError(f'reward function {name} raised {type(e).__name__}: {detail}') from None
  try:
    scores = np.asarray(list(got), np.float64)
  except (TypeError, ValueError):
    raise common.UserError(f'reward function {name} must return one float per response, '
                           f'got {type(got).__name__}') from None
  if scores.shape != (len(responses),):
    raise common.UserError(f'reward function {name} returned {scores.size} scores for {len(responses)} responses')
  bad = np.flatnonzero(~np.isfinite(scores))
  if len(bad):
    raise common.UserError(f'reward function {name} returned {scores[bad[0]]} for response {bad[0]} '
                           f'({len(bad)} non-finite of {len(responses)})')
  return scores.astype(np.float32)


def host_responses(ro: Mapping[str, Any], decode: Callable[[np.ndarray, np.ndarray], list], eos_id: int) -> list:
  """A rollout's B*G response texts on this host, in row order: decode(tokens [R, N], mask [R, N]) with the
  mask of the real tokens less the EOS."""
  tokens, mask = shd.to_host(ro['tokens']), shd.to_host(ro['mask']) > 0
  return decode(tokens, mask & (tokens != eos_id))


def group_rows(prompts: Sequence[Any], group_size: int, rows: int) -> list:
  """Per-prompt items (texts, ids) -> one per rollout row, group-major (row i: prompts[i // G]); `rows` is the
  rollout's row count (a mismatch is a ValueError)."""
  out = [p for p in prompts for _ in range(group_size)]
  if len(out) != rows:
    raise ValueError(f'{len(prompts)} prompt texts for {rows // group_size} prompt rows')
  return out


class HostScoredRollout:
  """Rollouts scored by a host function: jit(generate) -> host decode + reward_fn -> scores on the mesh.

  graphdefs: {'policy', 'reference'}; decode(tokens [R, N] np.int, mask [R, N]) -> list[str] turns sampled ids
  into response texts (the mask given excludes the EOS). Call with the TrainStates, the [B, P] prompt batch
  on the mesh, the B prompt texts of the whole (global) batch in row order, and a key; every process calls
  the reward function on all B*G responses (it must be deterministic) and keeps its rows of the scores.
  """

  def __init__(self, graphdefs: Mapping[str, Any], settings: Settings, reward_fn: RewardFn,
               decode: Callable[[np.ndarray, np.ndarray], list], mesh, state_shardings: Mapping[str, Any]):
    self.settings, self.reward_fn, self.decode, self.mesh = settings, reward_fn, decode, mesh
    rep, batch_sh = shd.replicated(mesh), shd.batch_sharding(mesh)
    self.generate = shd.mesh_jit(mesh, lambda states, batch, rng: generate(graphdefs, states, batch, rng, settings),
                            in_shardings=(dict(state_shardings), batch_sh, rep))

  def __call__(self, states: Mapping[str, Any], batch: Mapping[str, Any], prompts: Sequence[str], rng) -> dict:
    ro = self.generate(dict(states), dict(batch), rng)
    responses = host_responses(ro, self.decode, self.settings.eos_id)
    rows = group_rows(prompts, self.settings.group_size, len(responses))
    scores = call_reward_fn(self.reward_fn, rows, responses)
    ro['scores'] = shd.put_batch(scores, self.mesh)
    return ro
