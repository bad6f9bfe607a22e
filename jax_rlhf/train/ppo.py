"""PPO against the reward model with a per-token KL penalty to the SFT model (optionally PPO-ptx).

Four models: policy (from SFT, trained), value (from the RM, trained), reward (the RM, frozen) and
reference (SFT, frozen). Two compiled functions per iteration, built from the shared parts:

  experience: `rollout.rollout` (sample with the KV cache; policy and reference log-probs of the sampled
              tokens, teacher-forced, logits / T; RM score at EOS) -> values -> fixed penalty without EOS ->
              r_t = -beta * (logp_t - logp_ref_t), + score on the last response token -> GAE -> returns,
              whitened advantages.
  update:     `update.update` over {policy, value}: epochs x minibatches in one lax.scan of the clipped policy
              loss + vf_coef * clipped value loss (+ gamma_ptx * LM loss on pretraining text). Old log-probs and
              values are frozen per batch, so the ratio is 1 on the first minibatch.
beta is fixed or follows Ziegler's adaptive controller between iterations. Every `ppo.snapshot_every` iterations
the policy is exported to W/<run>/snapshots/<iteration> (the eval stage scores them: the over-optimisation curve).
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jax_rlhf import losses, rl
from jax_rlhf import metrics as metrics_lib
from jax_rlhf import sharding as shd
from jax_rlhf.data import batches, sources
from jax_rlhf.models import hf, lora, scoring
from jax_rlhf.train import checkpoint, common, lm, rollout
from jax_rlhf.train import state as state_lib
from jax_rlhf.train import update as update_lib

DEFAULT_INPUTS = {'policy': 'sft', 'reference': 'sft', 'reward': 'rm'}
TRAINED = ('policy', 'value')


def experience(graphdefs, ppo_config, settings, states, batch, rng, beta):
  """One batch of experience (pure; jitted once): a rollout, values, KL-shaped rewards, GAE."""
  ro = rollout.rollout(graphdefs, states, batch, rng, settings)
  seq, att, mask, logp, has_eos = ro['seq'], ro['att'], ro['mask'], ro['logp'], ro['has_eos']
  prompt_len = batch['prompt'].shape[1]
  values = scoring.response_values(rollout.merge(graphdefs['value'], states['value']), seq, att, prompt_len)
  score = ro['scores']  # [B], at the last real token (EOS)
  if ppo_config.apply_missing_eos_penalty:
    score = jnp.where(has_eos, score, ppo_config.missing_eos_penalty)

  rewards, kl = rl.kl_shaped_rewards(logp, ro['ref_logp'], score, mask, beta, ppo_config.kl.estimator)
  if ppo_config.whiten_rewards:
    rewards = rl.masked_whiten(rewards, mask, shift_mean=False)
  advantages, returns = rl.gae(rewards, values, mask, ppo_config.gamma, ppo_config.lam)
  if ppo_config.whiten_advantages:
    advantages = rl.masked_whiten(advantages, mask)

  episodes = mask.shape[0]
  metrics = {
      'score': jnp.mean(score), 'rm_score_raw': jnp.mean(jnp.where(has_eos, score, 0.0)),
      'kl': rl.masked_sum(kl, mask) / episodes,  # nats per episode (what the adaptive controller targets)
      'beta': beta, 'non_score_reward': rl.masked_sum(rewards, mask) / episodes - jnp.mean(score),
      'response_length': jnp.mean(jnp.sum(mask, 1)), 'eos_fraction': jnp.mean(has_eos),
      'entropy': rl.masked_mean(rl.entropy_from_logits(ro['logits']), mask),
      'value_mean': rl.masked_mean(values, mask),
      'sampler_logp_mismatch': jnp.max(jnp.abs(logp - ro['sampler_logp']) * mask),
  }
  exp = {'seq': seq, 'att': att, 'mask': mask, 'old_logp': logp, 'old_values': values,
         'advantages': advantages, 'returns': returns}
  return exp, metrics


def ppo_loss(graphdefs, ppo_config, params, rest, minibatch, ptx_batch):
  """Clipped policy loss + vf_coef * clipped value loss (+ ptx.coef * LM loss): `update.update`'s loss_fn."""
  prompt_len = minibatch['seq'].shape[1] - minibatch['mask'].shape[1]
  policy = nnx.merge(graphdefs['policy'], params['policy'], rest['policy'])
  value = nnx.merge(graphdefs['value'], params['value'], rest['value'])
  logp, logits = scoring.response_logprobs(policy, minibatch['seq'], minibatch['att'], prompt_len,
                                           ppo_config.temperature)
  pg_loss, policy_metrics = losses.clipped_policy_loss(logp, minibatch['old_logp'], minibatch['advantages'],
                                                       minibatch['mask'], ppo_config.clip)
  v = scoring.response_values(value, minibatch['seq'], minibatch['att'], prompt_len)
  vf_loss, value_metrics = losses.clipped_value_loss(v, minibatch['old_values'], minibatch['returns'],
                                                     minibatch['mask'], ppo_config.vf_clip)
  loss = pg_loss + ppo_config.vf_coef * vf_loss
  metrics = {'pg_loss': pg_loss, 'vf_loss': vf_loss, **policy_metrics, **value_metrics,
             'policy_entropy': rl.masked_mean(rl.entropy_from_logits(logits), minibatch['mask'])}
  if ptx_batch is not None:
    ptx_loss, _ = lm.lm_loss(policy, ptx_batch)
    loss = loss + ppo_config.ptx.coef * ptx_loss
    metrics['ptx_loss'] = ptx_loss
  metrics['loss'] = loss
  return loss, metrics


def ppo_update(graphdefs, ppo_config, optimizers, trained, exp, ptx, rng):
  """ppo_epochs x num_minibatches steps of {policy, value}. ptx: [E*M, b, L] pretraining batches or None."""
  trained, metrics, per_step = update_lib.update(
      lambda params, rest, minibatch, extra: ppo_loss(graphdefs, ppo_config, params, rest, minibatch, extra),
      optimizers, trained, exp, rng, epochs=ppo_config.ppo_epochs, num_minibatches=ppo_config.num_minibatches,
      extra=ptx, skip=lambda m: m['ratio_mean'] > ppo_config.ratio_threshold)  # TRL's ratio_threshold
  metrics['ratio_skipped'] = metrics.pop('skipped')  # minibatches skipped in this iteration
  metrics['first_ratio_mean'] = per_step['ratio_mean'][0]
  metrics['first_clipfrac'] = per_step['clipfrac'][0]
  return trained, metrics


class PPOTrainer:
  """The four models' sharded states ({policy, value, reference, reward}; with LoRA and models['reference'] None,
  no reference state: the reference runs on the policy's state with its adapters off) and two compiled functions:
  experience(states, prompts, rng, beta) -> (exp, metrics) and update(trained, exp, ptx, rng) -> (trained,
  metrics), where trained = {policy, value} (donated)."""

  def __init__(self, config, mesh, models: dict, tokenizer_ids):
    ppo_config = config.ppo
    self.ppo_config, self.mesh = ppo_config, mesh
    eos_id, pad_id = tokenizer_ids
    self.settings = rollout.Settings(ppo_config.max_new_tokens, ppo_config.temperature, ppo_config.top_k,
                                     ppo_config.top_p, eos_id, pad_id)
    n_updates = ppo_config.iterations * ppo_config.ppo_epochs * ppo_config.num_minibatches
    self.optimizers = {'policy': state_lib.make_optimizer(ppo_config.policy_optimizer, n_updates),
                       'value': state_lib.make_optimizer(ppo_config.value_optimizer, n_updates)}
    graphdefs, self.states, shardings = {}, {}, {}
    if models.get('reference') is None:  # LoRA: the reference is the policy's own base, adapters off
      graphdefs['reference'] = lora.reference_graphdef(models['policy'])
    for name in ('policy', 'value', 'reference', 'reward'):
      if name == 'reference' and models.get('reference') is None:
        continue
      model, tx = models[name], self.optimizers.get(name)
      if tx is None and config.model.frozen_dtype != 'float32':
        model = _cast(model, config.model.frozen_dtype)
      graphdefs[name], self.states[name], shardings[name] = state_lib.place_state(model, tx, mesh)
    self.graphdefs, self.shardings = graphdefs, shardings
    rep, batch_sh = shd.replicated(mesh), shd.batch_sharding(mesh)
    trained_sh = {name: shardings[name] for name in TRAINED}
    self.experience = shd.mesh_jit(
        mesh, lambda states, batch, rng, beta: experience(graphdefs, ppo_config, self.settings, states, batch, rng, beta),
        in_shardings=(shardings, batch_sh, rep, rep))
    self.update = shd.mesh_jit(
        mesh, lambda trained, exp, ptx, rng: ppo_update(graphdefs, ppo_config, self.optimizers, trained, exp, ptx, rng),
        in_shardings=(trained_sh, batch_sh, shd.NamedSharding(mesh, shd.P(None, shd.BATCH_AXES)), rep),
        out_shardings=(trained_sh, rep), donate_argnums=0)

  def trained(self) -> dict:
    return {name: self.states[name] for name in TRAINED}

  def step(self, prompts, ptx, rng, beta):
    """One PPO iteration: (experience metrics + update metrics)."""
    k_exp, k_upd = jax.random.split(rng)
    exp, experience_metrics = self.experience(self.states, prompts, k_exp, jnp.float32(beta))
    trained, update_metrics = self.update(self.trained(), exp, ptx, k_upd)
    self.states.update(trained)
    return {**experience_metrics, **update_metrics}


def _cast(model, dtype: str):
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
  return nnx.merge(graphdef, state)


def load_models(config, workdir: str, name: str = 'ppo', inputs=None) -> dict:
  """{policy, value, reference, reward} from the input runs' HF exports (a missing run: UserError)."""
  inputs = {**DEFAULT_INPUTS, **(inputs or {})}
  if 'value' not in inputs and config.ppo.value_from not in ('rm', 'sft'):
    raise common.UserError(f'ppo.value_from must be rm | sft, got {config.ppo.value_from!r}')
  hf_dir = {role: os.path.join(common.require_stage(workdir, run, name), 'hf') for role, run in inputs.items()}
  kw = common.model_kw(config)
  # LoRA with the reference run = the policy's run: no second copy (the reference is the policy's base)
  shared_ref = common.lora_config(config).rank > 0 and inputs['reference'] == inputs['policy']
  models = {'policy': common.add_lora(hf.load_pretrained(hf_dir['policy'], **kw), config),
            'reference': None if shared_ref else hf.load_pretrained(hf_dir['reference'], **kw),
            'reward': hf.load_scalar_model(hf_dir['reward'], **kw)}
  if 'value' in inputs or config.ppo.value_from == 'rm':
    models['value'] = hf.load_scalar_model(hf_dir.get('value', hf_dir['reward']), **kw)
  else:  # a fresh head on the policy's body
    models['value'] = hf.load_pretrained_body(hf_dir['policy'], seed=config.seed, **kw)
  models['value'] = common.add_lora(models['value'], config)
  return models


def run(config, workdir: str, name: str = 'ppo', inputs=None) -> dict:
  """Trains the policy into W/<name>. inputs: role -> run name (default {policy: sft, reference: sft,
  reward: rm}; the value model from the reward run, or from the policy run's body when ppo.value_from='sft')."""
  ppo_config = config.ppo
  out = common.stage_dir(workdir, name)

  # ---------------------------------------------------------------- models (fails fast if an input is missing)
  models = load_models(config, workdir, name, inputs)
  tok = common.load_tokenizer(config)
  mesh = common.mesh(config)
  if ppo_config.batch_size % (shd.batch_divisor(mesh) * ppo_config.num_minibatches):
    raise common.UserError(f'ppo.batch_size={ppo_config.batch_size} must be divisible by num_minibatches x data x '
                           f'fsdp devices ({ppo_config.num_minibatches * shd.batch_divisor(mesh)})')
  trainer = PPOTrainer(config, mesh, models, (tok.eos_token_id, tok.pad_token_id))
  del models

  # ---------------------------------------------------------------- data: prompts, pretraining text for ptx
  info = {}
  prompt_arrays, cut = batches.prompts(tok, common.records_for(config, workdir, 'prompts', 'train', tok, info),
                                       config.data.max_prompt_len)
  prompts = sources.GrainLoader(prompt_arrays, ppo_config.batch_size, config.seed)
  n_ptx = ppo_config.ppo_epochs * ppo_config.num_minibatches
  ptx_loader = None
  if ppo_config.ptx.coef > 0:
    texts = batches.texts(tok, [r['text'] for r in common.records_for(config, workdir, 'pretrain', 'train',
                                                                      counts=info)], config.data.seq_len)
    ptx_loader = sources.GrainLoader(texts, ppo_config.ptx.batch_size * n_ptx, config.seed + 7)

  # ---------------------------------------------------------------- resume
  ckpt = checkpoint.for_stage(out, config)
  trained, meta = ckpt.resume(trainer.trained(), prompts=prompts, ptx=ptx_loader)
  trainer.states.update(trained)
  beta = float(meta.get('beta', ppo_config.kl.init if ppo_config.kl.adaptive else ppo_config.kl.coef))
  start = int(meta.get('step', 0))
  if start:
    print(f'[{name}] resumed from iteration {start}')
  rng = jax.random.key(config.seed + 3)

  # ---------------------------------------------------------------- train
  writer = metrics_lib.MetricsWriter(out, total_steps=ppo_config.iterations, desc=name, initial_step=start,
                                     show=('score', 'kl', 'beta', 'clipfrac', 'episodes/s'), progress=config.progress)
  if start == 0:
    writer.write(0, {**cut.as_metrics('data'), **info}, split='info')
  t0 = time.perf_counter()
  for it in range(start + 1, ppo_config.iterations + 1):
    batch = next(prompts)
    ptx = ptx_batch(next(ptx_loader), n_ptx, mesh) if ptx_loader is not None else None
    m = trainer.step(shd.put_batch({'prompt': batch['prompt'], 'prompt_mask': batch['prompt_mask']}, mesh, local=True),
                     ptx, jax.random.fold_in(rng, it), beta)
    m = metrics_lib.to_host(m)  # one small transfer per iteration; it waits, so the timing is compute
    if ppo_config.kl.adaptive:
      beta = float(rl.adaptive_kl_update(beta, m['kl'], ppo_config.batch_size, ppo_config.kl.target,
                                         ppo_config.kl.horizon))
    writer.advance()
    now = time.perf_counter()
    writer.write(it, {**m, 'episodes/s': ppo_config.batch_size / max(now - t0, 1e-9)})
    t0 = now
    if ppo_config.snapshot_every and (it % ppo_config.snapshot_every == 0 or it == ppo_config.iterations):
      hf.save_pretrained(rollout.merge(trainer.graphdefs['policy'], trainer.states['policy']),
                         os.path.join(out, 'snapshots', str(it)))
    ckpt.step_end(it, ppo_config.iterations, trainer.trained(),
                  {'step': it, 'beta': beta, 'prompts': prompts.state(),
                   'ptx': ptx_loader.state() if ptx_loader is not None else None})
  ckpt.close()
  writer.close()

  # ---------------------------------------------------------------- export
  hf.save_pretrained(rollout.merge(trainer.graphdefs['policy'], trainer.states['policy']), os.path.join(out, 'hf'),
                     tokenizer=tok)
  common.export_lora(rollout.merge(trainer.graphdefs['policy'], trainer.states['policy']), config, out,
                     os.path.join(common.stage_dir(workdir, {**DEFAULT_INPUTS, **(inputs or {})}['policy']), 'hf'))
  summary = {'stage': 'ppo', 'run': name, 'iterations': ppo_config.iterations, 'final_beta': beta,
             'ptx_coef': ppo_config.ptx.coef, 'kl_coef': ppo_config.kl.coef, **info}
  checkpoint.mark_done(out, summary)
  print(f'[{name}] done; exported {os.path.join(out, "hf")}')
  return summary


def ptx_batch(arrays: dict, n: int, mesh):
  """One update's pretraining text: this host's rows [n*b, L] -> [n, b, L] batches (n = epochs x minibatches)."""
  arrays = {k: v.reshape(n, -1, *v.shape[1:]) for k, v in arrays.items()}
  return shd.put_batch(arrays, mesh, local=True, batch_dim=1)
