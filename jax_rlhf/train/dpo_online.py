"""Online DPO, the `dpo` run kind with `dpo.online` (train/dpo.py's `run` hands it the run): DPO on the policy's
own samples, ranked by a judge, with train/dpo.py's step and loss.

Online DPO (OAIF, Guo et al. 2024, arXiv 2402.04792; RLHFlow, Xiong et al. 2023, arXiv 2312.11456)
reads no rankings. Every `dpo.online_every` steps a round samples n = `dpo.online_samples` responses from the
CURRENT policy for each of online_every x batch_size training prompts (one prefill per prompt,
`rollout.generate`), and a judge ranks each prompt's n: the reward model in the same jit (`dpo.online_judge=rm`,
the RM's score at the last real token), or the task's noisy labeler on the host (`task`; the rankings it was
asked for are logged as `labels_used`, the cost in "human" labels). The round's steps then train on its prompts,
batch_size each, on best vs worst or on all C(n,2) pairs (`dpo.online_pairs`); online_every = 1 is fully on-policy
(OAIF), larger values let the samples lag the policy by up to online_every - 1 steps (semi-online DPO). The
reference stays the SFT model; its log-probs are taken once per sample in the round. The round's samples are
part of the checkpoint, so a run preempted inside a round resumes bitwise. With the RM judge, `dpo.online_min_gap`
skips the prompts whose samples the judge scores nearly the same, and `dpo.online_oversample` samples more
prompts than a round trains on and keeps those with a pair (refill).
"""
from __future__ import annotations

import os
import time
import types
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_rlhf import rl, sampling
from jax_rlhf import metrics as metrics_lib
from jax_rlhf import sharding as shd
from jax_rlhf.data import batches, sources
from jax_rlhf.models import hf, lora, scoring
from jax_rlhf.train import checkpoint, common, dpo
from jax_rlhf.train import rollout as rollout_lib
from jax_rlhf.train import state as state_lib

JUDGES = ('rm', 'task')
PAIRS = {'best_vs_worst': 'best_vs_worst', 'all': 'pairwise'}  # dpo.online_pairs -> dpo.preference_loss's mode


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
  Metrics: online/identical_fraction, online/near_tie_fraction and the mean score of the prompts whose samples are
  all the same / not (online/score_identical, online/score_distinct) over all sampled prompts; online/no_pair_fraction,
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
    metrics['online/score_identical'] = rl.masked_mean(scores[:, 0], same)  # the prompts DPO cannot move
    metrics['online/score_distinct'] = rl.masked_mean(jnp.mean(scores, -1), ~same)
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
  """`dpo.dpo_train_step` on step j of an online round's pool ([E, B, n, ...]; the reference's log-probs in it)."""
  batch = jax.tree.map(lambda x: x[j], pool)  # [B, n, ...]
  if loss_cfg.mode == 'best_vs_worst':
    batch = best_and_worst(batch)
  return dpo.dpo_train_step(graphdef, tx, loss_cfg, prompt_len, state, None, batch)


def labels_used(step: int, steps_per_round: int, prompts_per_round: int) -> int:
  """Rankings the online judge has made by the end of `step`: every prompt of every round started so far."""
  return ((step - 1) // steps_per_round + 1) * prompts_per_round if step > 0 else 0


# ---------------------------------------------------------------------------------------------------- stage

def check_config(dc) -> None:
  """A bad online `dpo` block is one clear line (UserError), before any model is loaded (after `dpo.check_config`)."""
  if dc.mode != 'pairwise':
    raise common.UserError(f'dpo.mode={dc.mode} picks pairs of offline rankings; online DPO picks its pairs by '
                           f'dpo.online_pairs ({" | ".join(PAIRS)})')
  if dc.online_pairs not in PAIRS:
    raise common.UserError(f'dpo.online_pairs must be one of {" | ".join(PAIRS)}, got {dc.online_pairs!r}')
  if dc.online_judge not in JUDGES:
    raise common.UserError(f'dpo.online_judge must be one of {" | ".join(JUDGES)}, got {dc.online_judge!r}')
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


def run(config, workdir: str, name: str, inputs: Mapping[str, str]) -> dict:
  """`dpo.run` with `dpo.online`: rounds of samples of the current policy ranked by the judge (module docstring).
  inputs: policy, reference and, for the rm judge, reward (role -> run name; `dpo.run` fills in the defaults).
  Resumable; exports W/<name>/hf."""
  dc = config.dpo
  dpo.check_config(dc)
  check_config(dc)
  out = common.stage_dir(workdir, name)
  judge, every, n = dc.online_judge, dc.online_every, dc.online_samples
  loss_cfg = types.SimpleNamespace(mode=PAIRS[dc.online_pairs], beta=dc.beta, loss_type=dc.loss_type,
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
  policy, reference = dpo.load_policy_and_reference(config, workdir, name, inputs, tok)
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
