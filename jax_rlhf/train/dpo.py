"""DPO: train the policy straight on preferences, with the frozen SFT model as the reference (Rafailov et al. 2023).

One batch is B prompts with K ranked responses each ([B, K, P+N], K padded, `valid` marks the real ones). Every
response goes through the policy once (and through the reference once: in the same jitted step, or once over the
whole dataset before training, `dpo.precompute_ref`), its summed log-prob read by `scoring.sequence_logps`; the
loss then uses them by `dpo.mode`:
  pairwise      : every C(k_b,2) pair of the ranking, each prompt counting once (`losses.ranking_dpo_loss`)
  listwise      : the whole ranking under Plackett-Luce (`losses.listwise_dpo_loss`; DPO appendix A.3)
  best_vs_worst : rank 1 against rank k_b (`losses.best_vs_worst_dpo_loss`)
A chosen/rejected pair is the K = 2 case. Dropout is off: no dropout key reaches the model, so the step-0 loss
is exactly log 2 (TRL #744).

Online DPO (`dpo.online`; OAIF, Guo et al. 2024, arXiv 2402.04792; RLHFlow, Xiong et al. 2023, arXiv 2312.11456)
reads no rankings. Every `dpo.online_every` steps a round samples n = `dpo.online_samples` responses from the
CURRENT policy for each of online_every x batch_size training prompts (one prefill per prompt,
`rollout.generate`), and a judge ranks each prompt's n: the reward model in the same jit (`dpo.online_judge=rm`,
the RM's score at the last real token), or the task's noisy labeler on the host (`task`; the rankings it was
asked for are logged as `labels_used`, the cost in "human" labels). The round's steps then train on its prompts,
batch_size each, on best vs worst or on all C(n,2) pairs (`dpo.online_pairs`); online_every = 1 is fully on-policy
(OAIF), larger values let the samples lag the policy by up to online_every - 1 steps (semi-online DPO). The
reference stays the SFT model; its log-probs are taken once per sample in the round. The round's samples are
part of the checkpoint, so a run preempted inside a round resumes bitwise.
"""
from __future__ import annotations

import json
import os
import time
import types
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_rlhf import losses, rl, sampling
from jax_rlhf import metrics as metrics_lib
from jax_rlhf import sharding as shd
from jax_rlhf.data import batches, sources
from jax_rlhf.models import hf, lora, scoring
from jax_rlhf.train import checkpoint, common
from jax_rlhf.train import rollout as rollout_lib
from jax_rlhf.train import state as state_lib

MODES = ('pairwise', 'listwise', 'best_vs_worst')
ONLINE_JUDGES = ('rm', 'task')
ONLINE_PAIRS = {'best_vs_worst': 'best_vs_worst', 'all': 'pairwise'}  # dpo.online_pairs -> the loss's mode


# ---------------------------------------------------------------------------------------------------- data

def preference_arrays(tokenizer, records: Sequence[dict], max_prompt_len: int, max_response_len: int, k_max: int
                      ) -> tuple[dict[str, np.ndarray], batches.Truncation]:
  """Ranking records as the scoring layout: `tokens`/`attention_mask` [N, K, P+R] = the prompt LEFT-padded to
  P = max_prompt_len (cut from the left), then the response + EOS right-padded to R = max_response_len (cut from
  the right, as `batches.rankings` cuts); `ranking` [N, K] best first, `valid` [N, K], `lengths` [N, K] the
  response tokens counted in the log-prob (EOS included)."""
  stats = batches.Truncation(total=len(records))
  n = len(records)
  length = max_prompt_len + max_response_len
  pad = tokenizer.pad_token_id
  tokens = np.full((n, k_max, length), pad, np.int32)
  att = np.zeros((n, k_max, length), np.int32)
  ranking = np.zeros((n, k_max), np.int32)
  valid = np.zeros((n, k_max), bool)
  lengths = np.zeros((n, k_max), np.int32)
  prompt_ids = batches.encode(tokenizer, [r['prompt'] for r in records])
  for i, (rec, p) in enumerate(zip(records, prompt_ids)):
    k = len(rec['responses'])
    if k > k_max:
      raise ValueError(f'ranking record {i} has {k} responses, more than k_max={k_max}')
    p = batches._cut_prompt(p, max_prompt_len, stats)
    rs = [batches._cut_response(r, max_response_len, tokenizer.eos_token_id, stats)
          for r in batches.encode(tokenizer, rec['responses'])]
    prompt, prompt_mask = batches.pad_left([p], max_prompt_len, pad)
    resp, resp_mask = batches.pad_right(rs, max_response_len, pad)
    tokens[i, :k, :max_prompt_len], att[i, :k, :max_prompt_len] = prompt, prompt_mask
    tokens[i, :k, max_prompt_len:], att[i, :k, max_prompt_len:] = resp, resp_mask
    ranking[i, :k] = rec['ranking']
    valid[i, :k] = True
    lengths[i, :k] = [len(r) for r in rs]
  return {'tokens': tokens, 'attention_mask': att, 'ranking': ranking, 'valid': valid, 'lengths': lengths}, stats


def compact(batch: dict[str, np.ndarray], rows: int, offset: int = 0) -> dict[str, np.ndarray] | None:
  """`batches.compact` (the real responses only, as `rows` sequences), keeping the DPO batch's per-response fields."""
  small = batches.compact(batch, rows, offset)
  if small is not None:
    small.update({k: batch[k] for k in ('lengths', 'ref_logps', 'prefs') if k in batch})
  return small


# ---------------------------------------------------------------------------------------------------- steps

def response_logps(model, batch, prompt_len: int):
  """Summed log-prob of every response of a batch: [B, K] (padded responses give 0).

  A compacted batch (`compact`) runs the model on its real responses only and scatters them back."""
  b, k = batch['valid'].shape
  if 'row_tokens' in batch:
    r = scoring.sequence_logps(model, batch['row_tokens'], batch['row_mask'], prompt_len)  # [R]
    flat = jnp.zeros((b * k,), r.dtype).at[batch['row_index']].set(r, mode='drop')  # pad rows point past the end
    return flat.reshape(b, k)
  length = batch['tokens'].shape[-1]
  r = scoring.sequence_logps(model, batch['tokens'].reshape(b * k, length),
                             batch['attention_mask'].reshape(b * k, length), prompt_len)  # [B*K]
  return r.reshape(b, k)


def preference_loss(policy_logps, ref_logps, batch, dpo_cfg):
  """The loss of `dpo_cfg.mode` on log-probs [B, K] of a batch of rankings, plus `dpo_cfg.rpo_alpha` x the NLL of
  each chosen response (iterative RPO, `losses.rpo_nll_loss`) when it is > 0: (loss, metrics)."""
  loss, m = _preference_loss(policy_logps, ref_logps, batch, dpo_cfg)
  alpha = getattr(dpo_cfg, 'rpo_alpha', 0.0)
  if alpha > 0:
    nll, m_nll = losses.rpo_nll_loss(policy_logps, batch['lengths'], batch['ranking'], batch['valid'])
    loss, m = loss + alpha * nll, {**m, **m_nll}
  return loss, m


def _preference_loss(policy_logps, ref_logps, batch, dpo_cfg):
  """The DPO loss of `dpo_cfg.mode` alone."""
  if 'prefs' in batch:  # a judge's soft labels (jax_rlhf/judges.py): per-pair label smoothing
    return losses.soft_ranking_dpo_loss(policy_logps, ref_logps, batch['prefs'], batch['valid'], beta=dpo_cfg.beta)
  args = (policy_logps, ref_logps, batch['ranking'], batch['valid'])
  if dpo_cfg.mode == 'listwise':
    return losses.listwise_dpo_loss(*args, beta=dpo_cfg.beta)
  fn = {'pairwise': losses.ranking_dpo_loss, 'best_vs_worst': losses.best_vs_worst_dpo_loss}.get(dpo_cfg.mode)
  if fn is None:
    raise ValueError(f'dpo.mode must be one of {MODES}, got {dpo_cfg.mode!r}')
  return fn(*args, beta=dpo_cfg.beta, loss_type=dpo_cfg.loss_type, label_smoothing=dpo_cfg.label_smoothing,
            lengths=batch.get('lengths'))


def reference_logps(graphdef, ref, batch, prompt_len: int):
  """The frozen reference's summed log-probs [B, K] (no gradient)."""
  return jax.lax.stop_gradient(response_logps(nnx.merge(graphdef, ref.params, ref.rest), batch, prompt_len))


def dpo_train_step(graphdef, tx, dpo_cfg, prompt_len: int, state, ref, batch, ref_graphdef=None):
  """One AdamW step of DPO. `ref` is the reference's TrainState (run in this step), or None when the batch
  carries precomputed `ref_logps` [B, K] or, with LoRA, when the reference is the policy's own base: then
  `ref_graphdef` (the policy's graphdef with its adapters off) runs on `state`. Returns (state, metrics)."""
  if 'ref_logps' in batch:
    ref_logps = batch['ref_logps']
  elif ref is None:
    ref_logps = reference_logps(ref_graphdef, state, batch, prompt_len)
  else:
    ref_logps = reference_logps(graphdef, ref, batch, prompt_len)

  def loss_fn(params):
    policy_logps = response_logps(nnx.merge(graphdef, params, state.rest), batch, prompt_len)
    return preference_loss(policy_logps, ref_logps, batch, dpo_cfg)

  (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return (state.replace(step=state.step + 1, params=params, opt_state=opt_state),
          {'loss': loss, **m, 'grad_norm': optax.tree.norm(grads),
           'nonfinite_skipped': state_lib.nonfinite_counts(opt_state)[1]})


def jit_train_step(graphdef, tx, dpo_cfg, prompt_len: int, shardings, ref_shardings, mesh, ref_graphdef=None):
  """`dpo_train_step` jitted on the mesh, state donated; `ref_shardings` None for precomputed reference
  log-probs or a LoRA policy's own base as the reference (`ref_graphdef`): then call it as step(state, None,
  batch)."""
  step = lambda s, r, b: dpo_train_step(graphdef, tx, dpo_cfg, prompt_len, s, r, b, ref_graphdef)  # noqa: E731
  return shd.mesh_jit(mesh, step, donate_argnums=0, in_shardings=(shardings, ref_shardings, shd.batch_sharding(mesh)),
                 out_shardings=(shardings, shd.replicated(mesh)))


def precompute_ref(graphdef, ref, arrays: dict[str, np.ndarray], prompt_len: int, batch_size: int, mesh,
                   ref_shardings=None) -> np.ndarray:
  """The reference's summed log-probs of every response of `arrays` (`preference_arrays`), once: [N, K]
  float32 (0 for padded responses). The dataset then carries them as `ref_logps` (TRL's
  precompute_ref_log_probs; the DPO authors run the reference every step instead)."""
  fn = shd.mesh_jit(mesh, lambda r, b: reference_logps(graphdef, r, b, prompt_len), out_shardings=shd.replicated(mesh),
               in_shardings=(ref_shardings, shd.batch_sharding(mesh)) if ref_shardings is not None else None)
  keys = ('tokens', 'attention_mask', 'ranking', 'valid')
  out = [np.asarray(fn(ref, shd.put_batch({k: b[k] for k in keys}, mesh)))[:n]
         for b, n in batches.padded_batches({k: arrays[k] for k in keys}, batch_size, shd.batch_divisor(mesh))]
  return np.concatenate(out).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- online

def online_settings(dc, tok, max_new_tokens: int) -> rollout_lib.Settings:
  """The sampler's settings of an online round: n = online_samples responses per prompt at online_temperature,
  no top-k/top-p filtering."""
  return rollout_lib.Settings(max_new_tokens=max_new_tokens, temperature=dc.online_temperature, top_k=0, top_p=1.0,
                              eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, group_size=dc.online_samples)


def rank_by_scores(scores):
  """A judge's scores [..., n] -> the ranking [..., n] int32: response indices, best (highest score) first; equal
  scores keep sampling order."""
  return jnp.argsort(-scores, axis=-1, stable=True).astype(jnp.int32)


def pair_valid(responses):
  """Which rank positions of each prompt's n samples are real for the loss: responses [..., n, N] (the sampled
  tokens, pad after EOS) -> (valid [..., n], same [...]). A prompt whose n responses are all the same tokens has
  no pair (valid at rank 1 only): its DPO gradient would be 0, and counting it would only dilute the batch mean."""
  same = jnp.all(responses == responses[..., :1, :], axis=(-2, -1))  # [...]
  n = responses.shape[-2]
  return jnp.concatenate([jnp.ones_like(same)[..., None], jnp.repeat(~same[..., None], n - 1, axis=-1)], -1), same


def select_pairs(pool, scores, has_pair, keep: int):
  """Refill (`dpo.online_oversample`): of a round's M sampled prompts ([M, n, ...] arrays) keep `keep`, those with a
  pair first, each group in sampling order. Returns (pool, scores) of `keep` prompts."""
  order = jnp.argsort(~has_pair, stable=True)[:keep]  # [keep]
  return jax.tree.map(lambda x: x[order], pool), scores[order]


def sample_round(graphdefs, settings: rollout_lib.Settings, steps_per_round: int, states, batch, rng, *,
                 min_gap: float = 0.0, oversample: int = 1):
  """One online round (pure; jitted once): n samples per prompt from the current policy, the reference's summed
  log-probs of each (logits at T = 1, as the loss reads the policy's, whatever the sampling temperature), and,
  when `states` holds a 'reward' model, its score and the ranking by it.

  graphdefs/states: {'policy', 'reference'[, 'reward']}; batch: {'prompt', 'prompt_mask'} [O*E*B, P] for
  E = steps_per_round steps of B prompts and O = oversample. Returns (pool, scores, metrics): pool holds
  [E, B, n, ...] arrays in the layout of `preference_arrays` (tokens / attention_mask [E, B, n, P+N], ref_logps,
  lengths, valid and, with a reward model, ranking [E, B, n]); scores [E, B, n] (zeros without a reward model);
  valid from `pair_valid`. With the RM judge, a prompt whose best-worst score gap is under `min_gap` has no pair
  either (a near-tie of the judge: skip it), and with oversample O > 1 the E*B prompts kept of the O*E*B sampled
  are those with a pair first (`select_pairs`: the skipped are refilled).
  Metrics: online/identical_fraction and online/near_tie_fraction over all sampled prompts; online/no_pair_fraction,
  online/pair_score_gap (best - worst score, prompts with a pair) and the online/score* over the kept ones;
  online/sample_nll (mean -log p of the sampled tokens under the distribution they were drawn from, logits / T:
  a Monte Carlo estimate of the sampler's per-token entropy) and online/sample_seq_nll (summed per response).
  """
  ro = rollout_lib.generate(graphdefs, states, batch, rng, settings, policy_logp=False)  # [M*n] rows
  n, prompt_len = settings.group_size, batch['prompt'].shape[1]
  seq, att, resp, mask = ro['seq'], ro['att'], ro['tokens'], ro['mask']
  ref = rollout_lib.merge(graphdefs['reference'], rollout_lib.reference_state(graphdefs, states))
  ref_logps = jax.lax.stop_gradient(scoring.sequence_logps(ref, seq, att, prompt_len))  # [M*n]
  flat = (-1, n)  # [M, n]
  valid, same = pair_valid(resp.reshape(*flat, resp.shape[-1]))  # [M, n], [M]
  pool = {'tokens': seq.reshape(*flat, seq.shape[-1]), 'attention_mask': att.reshape(*flat, att.shape[-1]),
          'ref_logps': ref_logps.reshape(flat), 'lengths': jnp.sum(mask, -1).astype(jnp.int32).reshape(flat)}
  nll = -jnp.where(mask > 0, ro['sampler_logp'], 0.0)  # [M*n, N]
  metrics = {'online/response_length': jnp.mean(jnp.sum(mask, -1)),
             'online/eos_fraction': jnp.mean(ro['has_eos'].astype(jnp.float32)),
             'online/identical_fraction': jnp.mean(same.astype(jnp.float32)),
             'online/sample_nll': jnp.sum(nll) / jnp.maximum(jnp.sum(mask), 1.0),
             'online/sample_seq_nll': jnp.mean(jnp.sum(nll, -1))}
  scores = jnp.zeros(valid.shape, jnp.float32)
  if 'reward' in states:
    scores = scoring.reward_at_last(rollout_lib.merge(graphdefs['reward'], states['reward']), seq, att).reshape(flat)
    pool['ranking'] = rank_by_scores(scores)
    near_tie = (jnp.max(scores, -1) - jnp.min(scores, -1) < min_gap) & ~same  # [M]
    valid = valid & ~near_tie[:, None] | (jnp.arange(n) == 0)  # rank 1 stays real
    metrics['online/near_tie_fraction'] = jnp.mean(near_tie.astype(jnp.float32))
  pool['valid'] = valid
  keep = valid.shape[0] // oversample
  if oversample > 1:
    pool, scores = select_pairs(pool, scores, valid[:, 1], keep)
  has_pair = pool['valid'][:, 1]
  metrics['online/no_pair_fraction'] = 1.0 - jnp.mean(has_pair.astype(jnp.float32))
  if 'reward' in states:
    metrics.update({'online/score': jnp.mean(scores), 'online/score_best': jnp.mean(jnp.max(scores, -1)),
                    'online/score_worst': jnp.mean(jnp.min(scores, -1)),
                    'online/pair_score_gap': rl.masked_mean(jnp.max(scores, -1) - jnp.min(scores, -1),
                                                                     has_pair)})
  shape = (steps_per_round, keep // steps_per_round)
  pool = jax.tree.map(lambda x: x.reshape(*shape, *x.shape[1:]), pool)
  return pool, scores.reshape(*shape, n), metrics


def task_rankings(task, prompts: Sequence[str], responses: Sequence[Sequence[str]], rng: np.random.Generator
                  ) -> np.ndarray:
  """The task's labeler ranks each prompt's responses, in prompt order with one Generator: [len(prompts), n]
  int32, best first. Each row is one label (one ranking) asked of the labeler."""
  return np.asarray([task.rank(p, list(rs), rng) for p, rs in zip(prompts, responses)], np.int32)


def judge_with_task(task, pool, prompts: Sequence[str], tok, prompt_len: int, mesh, rng: np.random.Generator):
  """The task's labeler ranks a round's samples on the host: pool (`sample_round`'s, [E, B, n, ...] on the mesh) and
  the round's E*B prompt texts in row order -> ranking [E, B, n] on the mesh, laid out as the pool."""
  tokens = shd.to_host(pool['tokens'])[..., prompt_len:]  # [E, B, n, N]
  real = (shd.to_host(pool['attention_mask'])[..., prompt_len:] > 0) & (tokens != tok.eos_token_id)
  e, b, n, length = tokens.shape
  texts = sampling.decode_responses(tok, tokens.reshape(-1, length), real.reshape(-1, length))
  ranking = task_rankings(task, prompts, [texts[i * n:(i + 1) * n] for i in range(e * b)], rng)
  return shd.put_batch(ranking.reshape(e, b, n), mesh, batch_dim=1)


def best_and_worst(batch):
  """The two responses best vs worst reads of each prompt: [B, n, ...] -> [B, 2, ...] (rank 1 and rank k_b, in that
  order), so that the policy runs on 2 rows per prompt, not n. A prompt without a pair keeps no second response."""
  k_b = jnp.sum(batch['valid'].astype(jnp.int32), -1)  # [B]
  worst = jnp.take_along_axis(batch['ranking'], jnp.maximum(k_b - 1, 0)[:, None], -1)[:, 0]
  pick = jnp.stack([batch['ranking'][:, 0], worst], -1)  # [B, 2] response indices
  out = {k: jax.vmap(lambda x, i: x[i])(batch[k], pick) for k in ('tokens', 'attention_mask', 'ref_logps', 'lengths')}
  out['ranking'] = jnp.broadcast_to(jnp.arange(2, dtype=jnp.int32), pick.shape)
  out['valid'] = jnp.stack([jnp.ones_like(k_b, jnp.bool_), k_b >= 2], -1)
  return out


def online_train_step(graphdef, tx, loss_cfg, prompt_len: int, state, pool, j):
  """`dpo_train_step` on step j of an online round's pool ([E, B, n, ...]; the reference's log-probs in it)."""
  batch = jax.tree.map(lambda x: x[j], pool)  # [B, n, ...]
  if loss_cfg.mode == 'best_vs_worst':
    batch = best_and_worst(batch)
  return dpo_train_step(graphdef, tx, loss_cfg, prompt_len, state, None, batch)


def labels_used(step: int, steps_per_round: int, prompts_per_round: int) -> int:
  """Rankings the online judge has made by the end of `step`: every prompt of every round started so far."""
  return ((step - 1) // steps_per_round + 1) * prompts_per_round if step > 0 else 0


# ---------------------------------------------------------------------------------------------------- stage

DEFAULT_INPUTS = {'policy': 'sft', 'reference': 'sft', 'rankings': 'label', 'reward': 'rm'}  # reward: online rm judge


def check_config(dc) -> None:
  """A bad `dpo` block is one clear line (UserError), before any model is loaded."""
  if dc.mode not in MODES:
    raise common.UserError(f'dpo.mode must be one of {", ".join(MODES)}, got {dc.mode!r}')
  if dc.loss_type not in losses.DPO_LOSS_TYPES:
    raise common.UserError(f'dpo.loss_type must be one of {", ".join(losses.DPO_LOSS_TYPES)}, got {dc.loss_type!r}')
  if dc.mode == 'listwise' and (dc.loss_type != 'sigmoid' or dc.label_smoothing):
    raise common.UserError('dpo.mode=listwise is Plackett-Luce DPO: it needs loss_type=sigmoid and label_smoothing=0')
  if dc.label_smoothing and dc.loss_type not in ('sigmoid', 'robust'):
    raise common.UserError(f'dpo.label_smoothing applies to loss_type sigmoid or robust, not {dc.loss_type!r}')
  if not 0.0 <= dc.label_smoothing < 0.5:
    raise common.UserError(f'dpo.label_smoothing must be in [0, 0.5), got {dc.label_smoothing}')
  if dc.beta <= 0:
    raise common.UserError(f'dpo.beta must be positive, got {dc.beta}')
  if not dc.rpo_alpha >= 0:
    raise common.UserError(f'dpo.rpo_alpha must be >= 0 (the weight of the chosen response\'s NLL), got {dc.rpo_alpha}')
  if not dc.online:
    return
  if dc.mode != 'pairwise':
    raise common.UserError(f'dpo.mode={dc.mode} picks pairs of offline rankings; online DPO picks its pairs by '
                           f'dpo.online_pairs ({" | ".join(ONLINE_PAIRS)})')
  if dc.online_pairs not in ONLINE_PAIRS:
    raise common.UserError(f'dpo.online_pairs must be one of {" | ".join(ONLINE_PAIRS)}, got {dc.online_pairs!r}')
  if dc.online_judge not in ONLINE_JUDGES:
    raise common.UserError(f'dpo.online_judge must be one of {" | ".join(ONLINE_JUDGES)}, got {dc.online_judge!r}')
  if not isinstance(dc.online_samples, int) or dc.online_samples < 2:
    raise common.UserError(f'dpo.online_samples must be an integer >= 2 (a pair needs two responses), got '
                           f'{dc.online_samples!r}')
  if not isinstance(dc.online_every, int) or dc.online_every < 1:
    raise common.UserError(f'dpo.online_every must be an integer >= 1 (steps per round of samples), got '
                           f'{dc.online_every!r}')
  if not dc.online_min_gap >= 0:
    raise common.UserError(f'dpo.online_min_gap must be >= 0 (the judge score gap under which a pair is skipped), '
                           f'got {dc.online_min_gap}')
  if not isinstance(dc.online_oversample, int) or dc.online_oversample < 1:
    raise common.UserError(f'dpo.online_oversample must be an integer >= 1 (prompts sampled per prompt trained), got '
                           f'{dc.online_oversample!r}')
  if dc.online_judge != 'rm' and (dc.online_min_gap > 0 or dc.online_oversample > 1):
    raise common.UserError('dpo.online_min_gap and dpo.online_oversample read the RM judge\'s scores: they need '
                           f'dpo.online_judge=rm, not {dc.online_judge}')
  if not dc.online_temperature > 0:
    raise common.UserError(f'dpo.online_temperature must be > 0 (greedy samples of a prompt are all the same), got '
                           f'{dc.online_temperature}')


def read_rankings(config, workdir: str, run_name: str, tok, info: dict) -> tuple[list[dict], list[dict] | None]:
  """(train, held-out or None) ranking records: from `data.rankings` (any ranking source: hh_rlhf:,
  tldr_comparisons:, rankings:, jsonl:) when set, else the labels of run `run_name` (W/<run_name>/rankings.jsonl)."""
  if config.data.rankings:
    return (common.records_for(config, workdir, 'rankings', 'train', tok, info),
            common.records_for(config, workdir, 'rankings', 'eval', tok, info))
  path = os.path.join(common.stage_dir(workdir, run_name), 'rankings.jsonl')
  if not os.path.exists(path):
    raise common.UserError(f'dpo needs rankings: {path} does not exist. Run the {run_name} stage first (it labels '
                           f'SFT samples), or set data.rankings to a ranking source')
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()], None


def load_policy_and_reference(config, workdir: str, name: str, inputs: Mapping[str, str], tok):
  """The policy and reference LMs of the input runs' HF exports, checked to fit the sequences and to share an
  architecture (one graphdef serves both). With LoRA (model.lora.rank > 0) the policy carries adapters, and when
  the reference run is the policy's run the reference is None: the policy's base with its adapters off, with no
  second copy. A missing input run or a mismatch: UserError."""
  policy_dir = common.require_stage(workdir, inputs['policy'], name)
  reference_dir = common.require_stage(workdir, inputs['reference'], name)
  length = config.data.max_prompt_len + config.data.max_response_len
  policy = common.add_lora(common.load_lm(os.path.join(policy_dir, 'hf'), config, tok), config)
  if policy.config.layout == 'gpt2' and length > policy.config.max_len:
    raise common.UserError(f'{name}: sequences of {length} tokens (data.max_prompt_len + '
                           f'data.max_response_len) are longer than the model\'s {policy.config.max_len} positions')
  if common.lora_config(config).rank > 0 and inputs['reference'] == inputs['policy']:
    return policy, None
  reference = common.load_lm(os.path.join(reference_dir, 'hf'), config, tok)
  if reference.config != policy.config:
    raise common.UserError(f'{name}: the reference ({reference_dir}) and the policy ({policy_dir}) differ in '
                           f'architecture; DPO needs the policy to start as a copy of its reference')
  return policy, reference


def run(config, workdir: str, name: str = 'dpo', inputs: Mapping[str, str] | None = None) -> dict:
  """The `dpo` stage: W/<name> from the policy run's HF export (default sft), the frozen reference (default sft)
  and rankings (data.rankings, or W/<inputs['rankings']>/rankings.jsonl, default label); with `dpo.online`, from
  fresh samples of the policy ranked by the judge (the `reward` input run, default rm, or the task's labeler).
  Resumable; exports W/<name>/hf."""
  dc = config.dpo
  check_config(dc)
  inputs = {**DEFAULT_INPUTS, **(inputs or {})}
  if dc.online:
    return run_online(config, workdir, name, inputs)
  out = common.stage_dir(workdir, name)
  os.makedirs(out, exist_ok=True)
  policy_dir = common.require_stage(workdir, inputs['policy'], name)
  common.require_stage(workdir, inputs['reference'], name)
  tok = common.load_tokenizer(config)
  mesh = common.mesh(config)
  p_len, r_len = config.data.max_prompt_len, config.data.max_response_len

  # ---------------------------------------------------------------- rankings
  info: dict = {}
  recs, eval_recs = read_rankings(config, workdir, inputs['rankings'], tok, info)
  if eval_recs is None:
    n_eval = max(int(len(recs) * dc.eval_fraction), 1) if len(recs) > 1 else 0
    recs, eval_recs = recs[n_eval:], recs[:n_eval]
  recs = [r for r in recs if len(r['responses']) >= 2]  # a single response has no pair
  eval_recs = [r for r in eval_recs if len(r['responses']) >= 2]
  if not recs:
    raise common.UserError(f'{name}: no training ranking with two or more responses')
  k_max = max(len(r['responses']) for r in recs + eval_recs)
  train_arrays, cut = preference_arrays(tok, recs, p_len, r_len, k_max)
  if dc.soft_labels and dc.mode == 'pairwise' and dc.loss_type == 'sigmoid' and any('prefs' in r for r in recs):
    from jax_rlhf import judges
    train_arrays['prefs'] = judges.soft_labels(recs, k_max)
  eval_arrays, _ = preference_arrays(tok, eval_recs, p_len, r_len, k_max) if eval_recs else (None, None)
  bs = min(dc.batch_size, len(recs))
  bs -= bs % shd.batch_divisor(mesh)
  if bs <= 0:
    raise common.UserError(f'{name}: {len(recs)} training rankings are fewer than the data x fsdp devices '
                           f'({shd.batch_divisor(mesh)})')
  steps = dc.steps or max(dc.epochs * (len(recs) // bs), 1)

  # ---------------------------------------------------------------- models: trained policy, frozen reference
  policy, reference = load_policy_and_reference(config, workdir, name, inputs, tok)
  shared_ref = reference is None  # LoRA: the reference is the policy's base (adapters off), no copy
  tx = state_lib.make_optimizer(dc.optimizer, steps)
  ref_graphdef = lora.reference_graphdef(policy) if shared_ref else None
  graphdef, state, shardings = state_lib.place_state(policy, tx, mesh)
  if shared_ref:
    ref, ref_shardings = None, None
  else:
    ref_graphdef, ref, ref_shardings = state_lib.place_state(reference, None, mesh)
  del policy, reference
  if dc.precompute_ref:  # one pass over the dataset; deterministic, so a resumed run recomputes the same numbers
    t0 = time.perf_counter()
    train_arrays['ref_logps'] = precompute_ref(ref_graphdef, state if shared_ref else ref, train_arrays, p_len, bs,
                                               mesh, shardings if shared_ref else ref_shardings)
    info['precompute_ref_seconds'] = time.perf_counter() - t0
  train_step = jit_train_step(graphdef, tx, dc, p_len, shardings, None if dc.precompute_ref else ref_shardings, mesh,
                              ref_graphdef)
  logps_fn = shd.mesh_jit(mesh, lambda params, rest, b: response_logps(nnx.merge(graphdef, params, rest), b, p_len),
                     out_shardings=shd.replicated(mesh))  # policy and reference: the same rules place both
  ref_logps_fn = shd.mesh_jit(mesh, lambda params, rest, b: response_logps(nnx.merge(ref_graphdef, params, rest), b, p_len),
                         out_shardings=shd.replicated(mesh))
  eval_loss_fn = jax.jit(lambda p, r, b: preference_loss(p, r, b, dc))

  def evaluate(state) -> dict[str, float]:
    """Held-out DPO metrics of the mode, exact over every held-out ranking."""
    pol, refs = [], []
    keys = ('tokens', 'attention_mask', 'ranking', 'valid')
    for b, n in batches.padded_batches({k: eval_arrays[k] for k in keys}, bs, shd.batch_divisor(mesh)):
      b = shd.put_batch(b, mesh)
      pol.append(np.asarray(logps_fn(state.params, state.rest, b))[:n])
      r = state if ref is None else ref  # LoRA: the policy's own base
      refs.append(np.asarray(ref_logps_fn(r.params, r.rest, b))[:n])
    loss, m = eval_loss_fn(np.concatenate(pol), np.concatenate(refs),
                           {k: eval_arrays[k] for k in ('ranking', 'valid', 'lengths')})
    return {'loss': float(loss), **metrics_lib.to_host(m)}

  # ---------------------------------------------------------------- resume
  loader = sources.GrainLoader(train_arrays, bs, config.seed)
  ckpt, state, start = checkpoint.resume_stage(out, config, name, state, loader)

  # ---------------------------------------------------------------- train
  writer = metrics_lib.MetricsWriter(out, total_steps=steps, desc=name, initial_step=start,
                                     show=('loss', 'rewards/accuracies', 'rewards/margins', 'eval_loss'),
                                     progress=config.progress)
  if start == 0:
    writer.write(0, {'rankings': len(recs), 'eval_rankings': len(eval_recs), 'k_max': k_max,
                     'params': state_lib.num_params(state.params), **cut.as_metrics('data'), **info}, split='info')
  local_bs = shd.process_rows(mesh, bs)
  rows = batches.compact_rows(train_arrays['valid'], local_bs.stop - local_bs.start, jax.local_device_count())
  t0, last = time.perf_counter(), start
  for step in range(start + 1, steps + 1):
    batch = next(loader)
    small = compact(batch, rows, local_bs.start * batch['valid'].shape[1])
    state, m = train_step(state, None if dc.precompute_ref else ref,
                          shd.put_batch(batch if small is None else small, mesh, local=True))
    writer.advance()
    if step % config.log_every == 0 or step == steps:
      m = metrics_lib.to_host(m)
      writer.write(step, {**m, 'steps/s': (step - last) / max(time.perf_counter() - t0, 1e-9),
                          'epoch': loader.epoch})  # the first interval includes the compile
      t0, last = time.perf_counter(), step
    if eval_recs and dc.eval_every and step % dc.eval_every == 0 and step != steps:
      writer.write(step, {f'eval_{k}': v for k, v in evaluate(state).items()}, split='eval')
    ckpt.step_end(step, steps, state, {'step': step, 'loader': loader.state(), 'seed': config.seed})
  ckpt.close()

  # ---------------------------------------------------------------- evaluate and export
  ev = {f'eval_{k}': v for k, v in evaluate(state).items()} if eval_recs else {}
  if ev:
    writer.write(steps, ev, split='eval')
  writer.close()
  hf.save_pretrained(nnx.merge(graphdef, state.params, state.rest), os.path.join(out, 'hf'), tokenizer=tok)
  common.export_lora(nnx.merge(graphdef, state.params, state.rest), config, out, os.path.join(policy_dir, 'hf'))
  summary = {'stage': 'dpo', 'name': name, 'inputs': inputs, 'mode': dc.mode, 'loss_type': dc.loss_type,
             'beta': dc.beta, 'steps': steps, **ev}
  checkpoint.mark_done(out, summary)
  nan = float('nan')
  print(f'[{name}] done: {dc.mode} {dc.loss_type} DPO, {steps} steps; held-out loss {ev.get("eval_loss", nan):.4f}, '
        f'reward accuracy {ev.get("eval_rewards/accuracies", nan):.3f} on {len(eval_recs)} rankings; '
        f'exported {os.path.join(out, "hf")}')
  return summary


def run_online(config, workdir: str, name: str, inputs: Mapping[str, str]) -> dict:
  """`run` with `dpo.online`: rounds of samples of the current policy ranked by the judge (module docstring).
  inputs: policy, reference and, for the rm judge, reward (role -> run name; `run` fills in the defaults)."""
  dc = config.dpo
  out = common.stage_dir(workdir, name)
  judge, every, n = dc.online_judge, dc.online_every, dc.online_samples
  loss_cfg = types.SimpleNamespace(mode=ONLINE_PAIRS[dc.online_pairs], beta=dc.beta, loss_type=dc.loss_type,
                                   label_smoothing=dc.label_smoothing, rpo_alpha=dc.rpo_alpha)
  task = None
  if judge == 'task':
    task = common.get_task(config)
    if task is None:
      raise common.UserError('dpo.online_judge=task needs an embedded task (task.name), and task.name is empty')
  common.require_stage(workdir, inputs['policy'], name)
  common.require_stage(workdir, inputs['reference'], name)
  reward_dir = common.require_stage(workdir, inputs['reward'], name) if judge == 'rm' else None
  tok = common.load_tokenizer(config)
  mesh = common.mesh(config)
  p_len, r_len = config.data.max_prompt_len, config.data.max_response_len

  # ---------------------------------------------------------------- prompts: E x B per round
  info: dict = {}
  recs = common.records_for(config, workdir, 'prompts', 'train', tok, info)
  prompt_arrays, cut = batches.prompts(tok, recs, p_len)
  texts = [r['prompt'] for r in recs]
  bs = dc.batch_size
  if bs % shd.batch_divisor(mesh):
    raise common.UserError(f'dpo.batch_size={bs} must be divisible by the data x fsdp devices '
                           f'({shd.batch_divisor(mesh)})')
  per_round = bs * every * dc.online_oversample
  if per_round > len(recs):
    raise common.UserError(f'{name}: a round samples dpo.batch_size x dpo.online_every x dpo.online_oversample = '
                           f'{per_round} prompts, more than the {len(recs)} training prompts')
  steps = dc.steps or max(dc.epochs * (len(recs) // bs), 1)

  # ---------------------------------------------------------------- models: trained policy, frozen reference/RM
  policy, reference = load_policy_and_reference(config, workdir, name, inputs, tok)
  tx = state_lib.make_optimizer(dc.optimizer, steps)
  graphdefs, frozen, frozen_sh = {}, {}, {}
  graphdefs['policy'], state, shardings = state_lib.place_state(policy, tx, mesh)
  if reference is None:  # LoRA: the policy's base, adapters off, on the policy's state
    graphdefs['reference'] = lora.reference_graphdef(policy)
  else:
    graphdefs['reference'], frozen['reference'], frozen_sh['reference'] = state_lib.place_state(reference, None, mesh)
  if reward_dir is not None:
    rm = hf.load_scalar_model(os.path.join(reward_dir, 'hf'), dtype=config.model.dtype,
                              param_dtype=config.model.param_dtype)
    graphdefs['reward'], frozen['reward'], frozen_sh['reward'] = state_lib.place_state(rm, None, mesh)
    del rm
  del policy, reference
  settings = online_settings(dc, tok, r_len)
  rep = shd.replicated(mesh)
  pool_sh = shd.NamedSharding(mesh, shd.P(None, shd.BATCH_AXES))  # [E, B, ...]: each step's B rows over the mesh
  sample_fn = shd.mesh_jit(
      mesh,
      lambda st, fz, b, key: sample_round(graphdefs, settings, every, {'policy': st, **fz}, b, key,
                                          min_gap=dc.online_min_gap, oversample=dc.online_oversample),
      in_shardings=(shardings, frozen_sh, shd.batch_sharding(mesh), rep), out_shardings=(pool_sh, pool_sh, rep))
  train_step = shd.mesh_jit(mesh, lambda s, pool, j: online_train_step(graphdefs['policy'], tx, loss_cfg, p_len, s, pool, j),
                       donate_argnums=0, in_shardings=(shardings, pool_sh, rep), out_shardings=(shardings, rep))
  length = p_len + r_len
  empty = {'tokens': ((n, length), jnp.int32), 'attention_mask': ((n, length), jnp.int32),
           'ref_logps': ((n,), jnp.float32), 'lengths': ((n,), jnp.int32), 'valid': ((n,), jnp.bool_),
           'ranking': ((n,), jnp.int32)}
  pool = jax.jit(lambda: {k: jnp.zeros((every, bs, *s), d) for k, (s, d) in empty.items()},
                 out_shardings=pool_sh)()  # before the first round; the checkpoint's template

  # ---------------------------------------------------------------- resume (the round's samples are in the state)
  loader = sources.GrainLoader(prompt_arrays, per_round, config.seed)
  ckpt, saved, start = checkpoint.resume_stage(out, config, name, {'policy': state, 'pool': pool}, loader)
  state, pool = saved['policy'], saved['pool']
  rng = jax.random.key(config.seed + 11)

  # ---------------------------------------------------------------- train
  writer = metrics_lib.MetricsWriter(out, total_steps=steps, desc=name, initial_step=start,
                                     show=('loss', 'rewards/margins', 'online/score', 'labels_used'),
                                     progress=config.progress)
  if start == 0:
    writer.write(0, {'prompts': len(recs), 'online_samples': n, 'prompts_per_round': per_round,
                     'params': state_lib.num_params(state.params), **cut.as_metrics('data'), **info}, split='info')
  t0, last, round_metrics = time.perf_counter(), start, {}
  for step in range(start + 1, steps + 1):
    j = (step - 1) % every
    if j == 0:  # a new round: sample with the current policy, then judge
      batch = shd.put_batch(next(loader), mesh, local=True)  # this process's rows of the round's prompts
      pool, _, round_metrics = sample_fn(state, frozen, {k: batch[k] for k in ('prompt', 'prompt_mask')},
                                         jax.random.fold_in(rng, step))
      if task is not None:  # every process decodes and ranks all of the round's samples the same way
        prompts = [texts[i] for i in shd.to_host(batch['index'])]
        pool = {**pool, 'ranking': judge_with_task(task, pool, prompts, tok, p_len, mesh,
                                                   np.random.default_rng([config.seed, 11, step]))}
    state, m = train_step(state, pool, jnp.int32(j))
    writer.advance()
    if step % config.log_every == 0 or step == steps:
      m = {**metrics_lib.to_host(m), **metrics_lib.to_host(round_metrics)}
      if task is not None:
        m['labels_used'] = labels_used(step, every, per_round)
      writer.write(step, {**m, 'steps/s': (step - last) / max(time.perf_counter() - t0, 1e-9),
                          'epoch': loader.epoch})  # the first interval includes the compile
      t0, last = time.perf_counter(), step
    ckpt.step_end(step, steps, {'policy': state, 'pool': pool},
                  {'step': step, 'loader': loader.state(), 'seed': config.seed})
  ckpt.close()
  writer.close()

  # ---------------------------------------------------------------- export
  hf.save_pretrained(nnx.merge(graphdefs['policy'], state.params, state.rest), os.path.join(out, 'hf'), tokenizer=tok)
  common.export_lora(nnx.merge(graphdefs['policy'], state.params, state.rest), config, out,
                     os.path.join(common.stage_dir(workdir, inputs['policy']), 'hf'))
  summary = {'stage': 'dpo', 'name': name, 'inputs': {k: inputs[k] for k in ('policy', 'reference')} |
             ({'reward': inputs['reward']} if judge == 'rm' else {}), 'online': True, 'judge': judge,
             'pairs': dc.online_pairs, 'samples': n, 'every': every, 'loss_type': dc.loss_type, 'beta': dc.beta,
             'steps': steps, 'labels_used': labels_used(steps, every, per_round) if task is not None else 0}
  checkpoint.mark_done(out, summary)
  print(f'[{name}] done: online {dc.online_pairs} {dc.loss_type} DPO, {steps} steps, {n} samples per prompt ranked by '
        f'{judge}' + (f' ({summary["labels_used"]} labels)' if task is not None else '') +
        f'; exported {os.path.join(out, "hf")}')
  return summary
