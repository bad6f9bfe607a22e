"""GRPO and its critic-free family (Dr. GRPO, DAPO, RLOO, REINFORCE++): the compiled step functions.

No value model. One iteration = rollout, advantages, loss, update, each on the shared parts; per rollout,
`prompts_per_step` prompts x G = `num_generations` samples each:

  rollout:    `rollout.rollout` (train/rollout.py) with G rows per prompt from ONE prefill per prompt, rows
              group-major (row i answers prompt i // G): reference log-probs of the sampled tokens (teacher-
              forced, logits / T; only when a KL term is on), behaviour log-probs (only when the policy moves
              before the last use of the rollout: num_iterations > 1, several minibatches, or a KL in the
              reward), the RM's score at the last real token (in the graph; host reward functions score the
              decoded texts between two jits: `rollout.host_responses`, `rollout.call_reward_fn`).
  advantages: per-response rewards [B*G] (the RM's, the task's verifier, a user's function, mixed) -> overlong
              handling -> DAPO's dynamic sampling inside a fixed compiled batch (`drop_equal_groups`: groups
              whose rewards are all equal are replaced by groups from the extra sampled prompts) -> advantages
              by `grpo.estimator`: grpo (group-normalised), dr_grpo (no std), rloo (leave-one-out),
              reinforce_pp (per-token KL in the reward, whitened returns).
  loss:       `losses.grpo_policy_loss` (asymmetric clip, token / sequence / constant aggregation, optional
              GSPO sequence ratio, beta x kl_estimate in the loss).
  update:     `update.update` over {policy}: num_iterations x num_minibatches steps in one `lax.scan`. With one
              update per rollout the ratio is exactly 1 and the old log-probs are the loss's own
              (stop-gradient), as TRL; so no extra forward is spent on them.

beta is fixed or follows `rl.adaptive_loss_beta_update` on the measured loss-side KL (a host scalar between
rollouts). Equations and defaults: ../shared/POSTTRAINING_DETAILS.md, section 2.

Reward functions (`grpo.rewards`: rm, task:verify, a user's module.path:function, each `spec[:weight]`) and
their mix live in `jax_rlhf/rewards.py`. `rm` alone is scored inside the compiled rollout (one jit: sample ->
ref -> RM -> advantages); with any host function: jit(rollout) -> host decode + functions
(`rewards.HostRewards`) -> jit(advantages) -> update.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_rlhf import losses, rl
from jax_rlhf import metrics as metrics_lib
from jax_rlhf import rewards as rewards_lib
from jax_rlhf import sharding as shd
from jax_rlhf.data import batches, sources
from jax_rlhf.models import hf, lora, scoring
from jax_rlhf.train import checkpoint, common
from jax_rlhf.train import rollout as rollout_lib
from jax_rlhf.train import state as state_lib
from jax_rlhf.train import update as update_lib

ESTIMATORS = ('grpo', 'dr_grpo', 'rloo', 'reinforce_pp')


def uses_ref(gc) -> bool:
  """Whether the reference model is run: a KL term whose coefficient is, or may become, non-zero."""
  return gc.kl.coef > 0 or gc.kl.adaptive or gc.estimator == 'reinforce_pp'


def needs_old_logp(gc) -> bool:
  """Whether the behaviour log-probs are computed at rollout time: the policy moves before their last use in
  the ratio, or a KL in the reward needs them before the update."""
  kl_in_reward = uses_ref(gc) and (gc.kl.where == 'reward' or gc.estimator == 'reinforce_pp')
  return gc.num_iterations > 1 or gc.num_minibatches > 1 or kl_in_reward


def sampled_prompts(gc) -> int:
  """Prompts sampled per rollout: prompts_per_step, times `oversample` under DAPO's dynamic sampling."""
  return gc.prompts_per_step * (gc.oversample if gc.drop_equal_groups else 1)


def check_config(gc) -> None:
  """Static checks of the `grpo` block (ValueError with one line; the stage turns it into a UserError)."""
  if gc.estimator not in ESTIMATORS:
    raise ValueError(f'grpo.estimator must be one of {" | ".join(ESTIMATORS)}, got {gc.estimator!r}')
  if gc.num_generations < 2:
    raise ValueError(f'grpo.num_generations must be >= 2 (a group needs a baseline), got {gc.num_generations}')
  if gc.kl.where not in ('loss', 'reward'):
    raise ValueError(f"grpo.kl.where must be 'loss' or 'reward', got {gc.kl.where!r}")
  if gc.estimator == 'reinforce_pp' and gc.kl.estimator not in ('k1', 'k3'):
    raise ValueError(f"grpo.kl.estimator must be 'k1' or 'k3' for reinforce_pp (a per-token reward), got "
                     f'{gc.kl.estimator!r}')
  if gc.overlong not in ('none', 'mask', 'penalty'):
    raise ValueError(f"grpo.overlong must be 'none', 'mask' or 'penalty', got {gc.overlong!r}")
  if (gc.prompts_per_step * gc.num_generations) % gc.num_minibatches:
    raise ValueError(f'grpo: prompts_per_step x num_generations must be divisible by num_minibatches '
                     f'({gc.num_minibatches})')
  if gc.reward_mix not in rewards_lib.REWARD_MIXES:
    raise ValueError(f'grpo.reward_mix must be one of {" | ".join(rewards_lib.REWARD_MIXES)}, got {gc.reward_mix!r}')
  if gc.drop_equal_groups and gc.oversample < 2:
    raise ValueError(f'grpo.oversample must be >= 2 with drop_equal_groups, got {gc.oversample}')


# ---------------------------------------------------------------------------------------------------------
# Experience
# ---------------------------------------------------------------------------------------------------------


def settings(gc, eos_id: int, pad_id: int) -> rollout_lib.Settings:
  """The rollout's sampling settings: G = num_generations rows per prompt from one shared prefill."""
  return rollout_lib.Settings(gc.max_new_tokens, gc.temperature, gc.top_k, gc.top_p, eos_id, pad_id,
                              group_size=gc.num_generations)


def rollout(graphdefs, gc, settings_: rollout_lib.Settings, states, batch, rng):
  """G samples per prompt and everything the loss needs that does not depend on the rewards (pure): the shared
  `rollout.rollout` (one prefill per prompt; reference log-probs when `uses_ref`; the RM's score at the last
  real token when states['reward'] is set, else 0), kept as the experience the update reads.

  states: {'policy', 'reference', 'reward'} TrainStates (reference/reward None when unused); batch:
  {'prompt', 'prompt_mask'} [Bp, P] left-padded. Returns (exp, metrics); exp holds [Bp*G, ...] rows,
  group-major: seq/att [R, P+N], tokens/mask [R, N], has_eos [R], rm_score [R], ref_logp [R, N] when a KL term
  is on, old_logp [R, N] (the behaviour log-probs) only when `needs_old_logp`.
  """
  ro = rollout_lib.rollout(graphdefs, states, batch, rng, settings_, policy_logp=needs_old_logp(gc))
  exp = {k: ro[k] for k in ('seq', 'att', 'tokens', 'mask', 'has_eos')}
  exp['rm_score'] = ro['scores']
  if 'ref_logp' in ro:
    exp['ref_logp'] = ro['ref_logp']
  if 'logp' in ro:
    exp['old_logp'] = ro['logp']
  metrics = {'response_length': jnp.mean(jnp.sum(exp['mask'], 1)), 'eos_fraction': jnp.mean(exp['has_eos']),
             'rm_score': jnp.mean(exp['rm_score'])}
  return exp, metrics


def _select_groups(gc, rewards, exp):
  """DAPO's dynamic sampling in a fixed compiled batch (Yu et al. 2025, sec. 3.2; verl `filter_groups`).

  Of the Bs = prompts_per_step x oversample sampled groups, keeps prompts_per_step: those whose rewards are
  not all equal first (in sampling order), then, if too few, all-equal ones with their loss masked out.
  Returns (rewards [Bk*G], exp with Bk*G rows, keep [Bk*G] bool, frac_reward_zero_std over the sampled groups).
  """
  n_gen, k = gc.num_generations, gc.prompts_per_step
  grouped = rewards.reshape(-1, n_gen)  # [Bs, G]
  informative = jnp.any(grouped != grouped[:, :1], axis=1)  # [Bs]
  frac_zero_std = 1.0 - jnp.mean(informative.astype(jnp.float32))
  if not gc.drop_equal_groups:
    return rewards, exp, jnp.ones(rewards.shape, jnp.bool_), frac_zero_std
  order = jnp.argsort(~informative, stable=True)[:k]  # informative groups first, each kind in sampling order
  rows = (order[:, None] * n_gen + jnp.arange(n_gen)[None, :]).reshape(-1)  # [Bk*G]
  exp = jax.tree.map(lambda x: x[rows], exp)
  keep = jnp.repeat(informative[order], n_gen)  # [Bk*G]
  return rewards[rows], exp, keep, frac_zero_std


def advantages(gc, exp, rewards, beta):
  """From per-response rewards to what the update consumes (pure).

  exp: `rollout`'s output; rewards [R] (already weighted and summed over the reward functions); beta scalar.
  Overlong responses (no EOS within max_new_tokens): 'mask' drops them from the loss (DAPO), 'penalty' gives
  them `overlong_penalty` instead of their reward (as PPO's missing-EOS penalty). Returns (exp, metrics): exp
  with 'advantages' ([R] or [R, N] for reinforce_pp) and 'mask' (0 on the rows the loss ignores).
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  if gc.overlong == 'penalty':
    rewards = jnp.where(exp['has_eos'], rewards, gc.overlong_penalty)
  metrics = {'reward': jnp.mean(rewards), 'reward_std': jnp.std(rewards)}
  rewards, exp, keep, frac_zero_std = _select_groups(gc, rewards, exp)
  metrics['frac_reward_zero_std'] = frac_zero_std
  if gc.overlong == 'mask':
    keep = keep & exp['has_eos']
  exp = dict(exp)
  mask = exp['mask'] * keep[:, None].astype(jnp.float32)  # [R, N]
  n_gen = gc.num_generations
  kl_in_reward = gc.kl.where == 'reward' and 'ref_logp' in exp
  if gc.estimator == 'reinforce_pp':
    adv, _ = rl.reinforce_pp_advantages(
        exp['old_logp'], exp['ref_logp'], rewards, mask, beta,
        group_size=n_gen if gc.reinforce_pp_baseline else None, kl_kind=gc.kl.estimator)
  else:
    if kl_in_reward:  # sequence KL in the reward, as TRL's RLOO: r_i - beta sum_t kl_t
      kl = rl.kl_estimate(exp['old_logp'], exp['ref_logp'], gc.kl.estimator, mask=exp['mask'])
      rewards = rewards - beta * jnp.sum(kl, axis=1)
    if gc.estimator == 'grpo':
      adv = rl.group_advantages(rewards, n_gen, scale=gc.scale_rewards, eps=gc.adv_eps)
    elif gc.estimator == 'dr_grpo':
      adv = rl.group_advantages(rewards, n_gen, scale='none')
    else:
      adv = rl.rloo_advantages(rewards, n_gen)
  exp['advantages'] = adv
  exp['mask'] = mask
  metrics['kept_fraction'] = jnp.mean(keep.astype(jnp.float32))
  return exp, metrics


# ---------------------------------------------------------------------------------------------------------
# Update
# ---------------------------------------------------------------------------------------------------------


def grpo_loss(graphdefs, gc, prompt_len: int, params, rest, mb, beta):
  """The policy loss of one minibatch and its metrics (pure). mb: a minibatch of `advantages`' exp."""
  policy = nnx.merge(graphdefs['policy'], params, rest)
  logp, logits = scoring.response_logprobs(policy, mb['seq'], mb['att'], prompt_len,
                                           scoring.effective_temperature(gc.temperature))
  old_logp = mb['old_logp'] if 'old_logp' in mb else jax.lax.stop_gradient(logp)
  kl_in_loss = gc.kl.where == 'loss' and 'ref_logp' in mb and gc.estimator != 'reinforce_pp'
  loss, m = losses.grpo_policy_loss(
      logp, old_logp, mb['advantages'], mb['mask'], clip_low=gc.clip_low, clip_high=gc.clip_high,
      aggregation=gc.aggregation, constant_len=gc.max_new_tokens, ratio_level=gc.ratio_level,
      ref_logp=mb['ref_logp'] if kl_in_loss else None, beta=beta, kl_kind=gc.kl.estimator)
  if 'ref_logp' in mb and not kl_in_loss:  # log the KL the reward already paid
    m['kl'] = rl.masked_mean(rl.kl_estimate(logp, mb['ref_logp'], gc.kl.estimator, mask=mb['mask']), mb['mask'])
  m['entropy'] = rl.masked_mean(rl.entropy_from_logits(logits), mb['mask'])
  m['loss'] = loss
  return loss, m


def update(graphdefs, gc, tx, policy, exp, rng, beta):
  """num_iterations x num_minibatches optimizer steps of the policy alone, `update.update`'s one `lax.scan`
  (pure). Returns (policy, metrics)."""
  exp = {k: v for k, v in exp.items() if k in ('seq', 'att', 'mask', 'advantages', 'ref_logp', 'old_logp')}
  prompt_len = exp['seq'].shape[1] - exp['mask'].shape[1]
  trained, metrics, _ = update_lib.update(
      lambda params, rest, mb, _: grpo_loss(graphdefs, gc, prompt_len, params['policy'], rest['policy'], mb, beta),
      {'policy': tx}, {'policy': policy}, exp, rng, epochs=gc.num_iterations, num_minibatches=gc.num_minibatches)
  metrics['grad_norm'] = metrics.pop('policy_grad_norm')
  metrics['beta'] = jnp.asarray(beta, jnp.float32)
  return trained['policy'], metrics


class GRPOTrainer:
  """The policy's (trained) and the reference's and reward model's (frozen) sharded states ({policy, reference,
  reward}; reference None without a KL term, reward None without an in-graph RM) and the compiled steps:
  experience (rollout + in-graph RM reward + advantages, one jit), or, with host rewards, sample (the rollout)
  and advantages; then update (the policy, donated)."""

  def __init__(self, config, mesh, policy_model, ref_model, reward_model, tokenizer_ids):
    gc = config.grpo
    check_config(gc)
    self.gc, self.mesh = gc, mesh
    self.settings = settings(gc, *tokenizer_ids)
    self.tx = state_lib.make_optimizer(gc.optimizer, gc.iterations * gc.num_iterations * gc.num_minibatches)
    g, st, sh = {}, {}, {}
    models = {'policy': (policy_model, self.tx), 'reference': (ref_model if uses_ref(gc) else None, None),
              'reward': (reward_model, None)}
    for name, (model, tx) in models.items():
      if model is None and name == 'reference' and uses_ref(gc):
        # LoRA: the reference is the policy's base with the adapters off, run on the policy's state (no state)
        g[name] = lora.reference_graphdef(policy_model)
      elif model is None:
        g[name], st[name], sh[name] = None, None, None
      else:
        g[name], st[name], sh[name] = state_lib.place_state(model, tx, mesh)
    self.graphdefs, self.states, self.shardings = g, st, sh
    rep, batch_sh = shd.replicated(mesh), shd.batch_sharding(mesh)

    def experience(states, batch, key, beta):
      exp, m = rollout(g, gc, self.settings, states, batch, key)
      exp, am = advantages(gc, exp, exp['rm_score'], beta)
      return exp, {**m, **am}

    # Each step's experience leaves batch-sharded, as the next step takes it: without out_shardings XLA may
    # return a gathered row selection (DAPO's dynamic sampling) replicated, which the update's in_shardings refuse.
    exp_out = (batch_sh, rep)
    self.experience = shd.mesh_jit(mesh, experience, in_shardings=(sh, batch_sh, rep, rep), out_shardings=exp_out)
    # The host-scored path: the rollout alone, then (after the host's rewards) the advantages.
    self.sample = shd.mesh_jit(mesh, lambda states, batch, key: rollout(g, gc, self.settings, states, batch, key),
                               in_shardings=(sh, batch_sh, rep), out_shardings=exp_out)
    self.advantages = jax.jit(lambda exp, rewards, beta: advantages(gc, exp, rewards, beta),
                              in_shardings=(batch_sh, batch_sh, rep), out_shardings=exp_out)
    self.update = shd.mesh_jit(mesh, lambda p, e, k, beta: update(g, gc, self.tx, p, e, k, beta),
                          in_shardings=(sh['policy'], batch_sh, rep, rep), out_shardings=(sh['policy'], rep),
                          donate_argnums=(0,))

  def step(self, prompts, rng, beta, host_rewards: Callable | None = None):
    """One iteration: rollout, advantages, update. Returns (experience metrics + update metrics).

    host_rewards: None (rewards = the in-graph RM score), or exp -> (rewards np [R], metrics dict) run on the
    host between the compiled rollout and the compiled advantages (the same keys either way)."""
    st = self.states
    k_exp, k_upd = jax.random.split(rng)
    beta = jnp.float32(beta)
    if host_rewards is None:
      exp, em = self.experience(st, prompts, k_exp, beta)
    else:
      exp, em = self.sample(st, prompts, k_exp)
      rewards, hm = host_rewards(exp)
      exp, am = self.advantages(exp, shd.put_batch(np.asarray(rewards, np.float32), self.mesh), beta)
      em = {**em, **hm, **am}
    st['policy'], um = self.update(st['policy'], exp, k_upd, beta)
    return {**em, **um}


# ---------------------------------------------------------------------------------------------------------
# The grpo stage
# ---------------------------------------------------------------------------------------------------------

DEFAULT_INPUTS = {'policy': 'sft', 'reference': 'sft', 'reward': 'rm'}


def run(config, workdir: str, name: str = 'grpo', inputs: Mapping[str, str] | None = None) -> dict:
  """The `grpo` stage: trains the policy into W/<name> (resumable; exports W/<name>/hf).

  inputs: role -> run name (default {policy: sft, reference: sft, reward: rm}; the reward run is read only when
  `grpo.rewards` holds rm, the reference only when a KL term is on). Prompts: the task's / data.prompts train
  split, `sampled_prompts` per rollout."""
  gc = config.grpo
  try:
    check_config(gc)
    rewards = rewards_lib.parse_rewards(gc.rewards)
  except ValueError as e:
    raise common.UserError(str(e)) from None
  inputs = {**DEFAULT_INPUTS, **(inputs or {})}
  names = [n for n, _ in rewards]
  out = common.stage_dir(workdir, name)

  # ---------------------------------------------------------------- reward functions (fail fast)
  fns = rewards_lib.host_functions(config, names)

  # ---------------------------------------------------------------- models (a missing input run: UserError)
  roles = ['policy'] + (['reference'] if uses_ref(gc) else []) + (['reward'] if 'rm' in names else [])
  hf_dir = {role: os.path.join(common.require_stage(workdir, inputs[role], name), 'hf') for role in roles}
  kw = common.model_kw(config)
  policy = common.add_lora(hf.load_pretrained(hf_dir['policy'], **kw), config)
  # LoRA with the reference run = the policy's run: no second copy (the reference is the policy's base)
  shared_ref = common.lora_config(config).rank > 0 and inputs['reference'] == inputs['policy']
  ref = hf.load_pretrained(hf_dir['reference'], **kw) if 'reference' in hf_dir and not shared_ref else None
  reward = hf.load_scalar_model(hf_dir['reward'], **kw) if 'reward' in hf_dir else None
  tok = common.load_tokenizer(config)
  mesh = common.mesh(config)
  n_prompts = sampled_prompts(gc)
  div = shd.batch_divisor(mesh)
  if n_prompts % div or (gc.prompts_per_step * gc.num_generations // gc.num_minibatches) % div:
    raise common.UserError(f'grpo: prompts sampled per rollout ({n_prompts}) and rows per minibatch '
                           f'(prompts_per_step x num_generations / num_minibatches) must be divisible by the data x '
                           f'fsdp devices ({div})')
  trainer = GRPOTrainer(config, mesh, policy, ref, reward, (tok.eos_token_id, tok.pad_token_id))
  del policy, ref, reward

  # ---------------------------------------------------------------- prompts
  info: dict = {}
  recs = common.records_for(config, workdir, 'prompts', 'train', tok, info)
  prompt_arrays, cut = batches.prompts(tok, recs, config.data.max_prompt_len)
  if len(recs) < n_prompts:
    raise common.UserError(f'grpo: {len(recs)} training prompts are fewer than the {n_prompts} sampled per rollout')
  texts = [r['prompt'] for r in recs]
  prompts = sources.GrainLoader(prompt_arrays, n_prompts, config.seed)
  in_graph = names == ['rm']
  host = None if in_graph else rewards_lib.HostRewards(rewards, fns, tok, tok.eos_token_id, gc.reward_mix)

  # ---------------------------------------------------------------- resume
  ckpt = checkpoint.for_stage(out, config)
  state, meta = ckpt.resume(trainer.states['policy'], prompts=prompts)
  trainer.states['policy'] = state
  beta = float(meta.get('beta', gc.kl.coef))
  start = int(meta.get('step', 0))
  if start:
    print(f'[{name}] resumed from iteration {start}')
  rng = jax.random.key(config.seed + 5)

  # ---------------------------------------------------------------- train
  writer = metrics_lib.MetricsWriter(out, total_steps=gc.iterations, desc=name, initial_step=start,
                                     show=('reward', 'kl', 'beta', 'frac_reward_zero_std', 'responses/s'),
                                     progress=config.progress)
  if start == 0:
    writer.write(0, {**cut.as_metrics('data'), **info, 'prompts': len(recs),
                     'params': state_lib.num_params(trainer.states['policy'].params)}, split='info')
  t0 = time.perf_counter()
  for it in range(start + 1, gc.iterations + 1):
    batch = shd.put_batch(dict(next(prompts)), mesh, local=True)
    host_fn = None
    if host is not None:
      idx = shd.to_host(batch['index'])
      rows = rollout_lib.group_rows([texts[i] for i in idx], gc.num_generations, n_prompts * gc.num_generations)
      host_fn = lambda exp, rows=rows: host(exp, rows)  # noqa: E731
    m = metrics_lib.to_host(trainer.step(batch, jax.random.fold_in(rng, it), beta, host_fn))
    m['beta'] = beta
    if in_graph:
      m['reward/rm'] = m['rm_score']
    if gc.kl.adaptive and 'kl' in m:
      beta = float(rl.adaptive_loss_beta_update(beta, m['kl'], gc.prompts_per_step * gc.num_generations,
                                                gc.kl.target, gc.kl.horizon))
    writer.advance()
    now = time.perf_counter()
    writer.write(it, {**m, 'responses/s': n_prompts * gc.num_generations / max(now - t0, 1e-9)})
    t0 = now
    ckpt.step_end(it, gc.iterations, trainer.states['policy'], {'step': it, 'beta': beta, 'prompts': prompts.state()})
  ckpt.close()
  writer.close()

  # ---------------------------------------------------------------- export
  hf.save_pretrained(rollout_lib.merge(trainer.graphdefs['policy'], trainer.states['policy']), os.path.join(out, 'hf'),
                     tokenizer=tok)
  common.export_lora(rollout_lib.merge(trainer.graphdefs['policy'], trainer.states['policy']), config, out, hf_dir['policy'])
  summary = {'stage': 'grpo', 'run': name, 'inputs': inputs, 'iterations': gc.iterations, 'estimator': gc.estimator,
             'rewards': [f'{n}:{w:g}' for n, w in rewards], 'final_beta': beta, **info}
  checkpoint.mark_done(out, summary)
  print(f'[{name}] done; exported {os.path.join(out, "hf")}')
  return summary
