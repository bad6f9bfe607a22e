"""PPO against the reward model with a per-token KL penalty to the SFT model (optionally PPO-ptx).

Four models: policy (from SFT, trained), value (from the RM, trained), reward (the RM, frozen) and
reference (SFT, frozen). Two compiled functions per iteration:

  experience: sample responses (KV cache) -> policy and reference log-probs of the sampled tokens
              (teacher-forced, logits / T) -> values -> RM score at EOS (fixed penalty without EOS) ->
              r_t = -beta * (logp_t - logp_ref_t), + score on the last response token -> GAE -> returns,
              whitened advantages.
  update:     epochs x minibatches in one lax.scan: clipped policy loss + vf_coef * clipped value loss
              (+ gamma_ptx * LM loss on pretraining text). Old log-probs and values are frozen per batch,
              so the ratio is 1 on the first minibatch.
beta is fixed or follows Ziegler's adaptive controller between iterations. Every `ppo.snapshot_every` iterations
the policy is exported to W/<run>/snapshots/<iteration> (the eval stage scores them: the over-optimisation curve).
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jax_rlhf import losses, rl, sampling
from jax_rlhf import metrics as metrics_lib
from jax_rlhf import sharding as shd
from jax_rlhf.data import batches, sources
from jax_rlhf.models import hf
from jax_rlhf.train import checkpoint, common, lm
from jax_rlhf.train import state as state_lib


def _merge(graphdef, st):
  return nnx.merge(graphdef, st.params, st.rest)


def response_forward(model, seq, att, prompt_len: int):
  """Final hidden states of the positions that predict the response tokens: [B, N, D].

  seq/att: [B, P+N] (left-padded prompt, right-padded response); position P-1+t predicts token t.
  """
  h, _ = model.hidden_states(seq[:, :-1], att[:, :-1])
  return h[:, prompt_len - 1:]


def response_logprobs(model, seq, att, prompt_len: int, temperature: float):
  """log p(token_t) under logits / T, and the logits: ([B, N], [B, N, V])."""
  logits = model.logits(response_forward(model, seq, att, prompt_len))
  if temperature > 0:
    logits = logits / temperature
  return rl.logprobs_from_logits(logits, seq[:, prompt_len:]), logits


def response_values(value_model, seq, att, prompt_len: int):
  """V(s_t) for each response token t (the state before it is generated): [B, N]."""
  return value_model.head(response_forward(value_model.transformer, seq, att, prompt_len))


def experience(g, pc, eos_id: int, pad_id: int, policy, value, ref, reward, batch, rng, beta):
  """One batch of experience (pure; jitted once). g: graphdefs {policy, value, ref, reward}."""
  prompt, prompt_mask = batch['prompt'], batch['prompt_mask']  # [B, P]
  p = prompt.shape[1]
  out = sampling.sample(g['policy'], nnx.merge_state(policy.params, policy.rest), prompt, prompt_mask, rng,
                        max_new_tokens=pc.max_new_tokens, temperature=pc.temperature, top_k=pc.top_k,
                        top_p=pc.top_p, eos_token_id=eos_id, pad_token_id=pad_id)
  tokens, mask = out.tokens, out.mask.astype(jnp.float32)  # [B, N]
  seq = jnp.concatenate([prompt, tokens], 1)  # [B, P+N]
  att = jnp.concatenate([prompt_mask, out.mask], 1)
  temp = pc.temperature if pc.temperature > 0 else 1.0

  logp, logits = response_logprobs(_merge(g['policy'], policy), seq, att, p, temp)
  ref_logp, _ = response_logprobs(_merge(g['ref'], ref), seq, att, p, temp)
  values = response_values(_merge(g['value'], value), seq, att, p)
  score = _merge(g['reward'], reward).score(seq, att)  # [B], at the last real token (EOS)
  has_eos = jnp.any((tokens == eos_id) & (out.mask > 0), axis=1)
  if pc.apply_missing_eos_penalty:
    score = jnp.where(has_eos, score, pc.missing_eos_penalty)

  rewards, kl = rl.kl_shaped_rewards(logp, ref_logp, score, mask, beta, pc.kl.estimator)
  if pc.whiten_rewards:
    rewards = rl.masked_whiten(rewards, mask, shift_mean=False)
  advantages, returns = rl.gae(rewards, values, mask, pc.gamma, pc.lam)
  if pc.whiten_advantages:
    advantages = rl.masked_whiten(advantages, mask)

  b = tokens.shape[0]
  kl_episode = rl.masked_sum(kl, mask) / b  # nats per episode (what the adaptive controller targets)
  metrics = {
      'score': jnp.mean(score), 'rm_score_raw': jnp.mean(jnp.where(has_eos, score, 0.0)),
      'kl': kl_episode, 'beta': beta, 'non_score_reward': rl.masked_sum(rewards, mask) / b - jnp.mean(score),
      'response_length': jnp.mean(jnp.sum(mask, 1)), 'eos_fraction': jnp.mean(has_eos),
      'entropy': rl.masked_mean(rl.entropy_from_logits(logits), mask),
      'value_mean': rl.masked_mean(values, mask),
      'sampler_logp_mismatch': jnp.max(jnp.abs(logp - out.logprobs) * mask),
  }
  exp = {'seq': seq, 'att': att, 'mask': mask, 'old_logp': logp, 'old_values': values,
         'advantages': advantages, 'returns': returns}
  return exp, metrics


def ppo_loss(g, pc, prompt_len: int, policy_params, value_params, policy_rest, value_rest, mb, ptx_batch):
  policy = nnx.merge(g['policy'], policy_params, policy_rest)
  value = nnx.merge(g['value'], value_params, value_rest)
  temp = pc.temperature if pc.temperature > 0 else 1.0
  logp, logits = response_logprobs(policy, mb['seq'], mb['att'], prompt_len, temp)
  pg_loss, pm = losses.clipped_policy_loss(logp, mb['old_logp'], mb['advantages'], mb['mask'], pc.clip)
  v = response_values(value, mb['seq'], mb['att'], prompt_len)
  vf_loss, vm = losses.clipped_value_loss(v, mb['old_values'], mb['returns'], mb['mask'], pc.vf_clip)
  loss = pg_loss + pc.vf_coef * vf_loss
  m = {'pg_loss': pg_loss, 'vf_loss': vf_loss, **pm, **vm,
       'policy_entropy': rl.masked_mean(rl.entropy_from_logits(logits), mb['mask'])}
  if ptx_batch is not None:
    ptx_loss, _ = lm.lm_loss(policy, ptx_batch)
    loss = loss + pc.ptx.coef * ptx_loss
    m['ptx_loss'] = ptx_loss
  m['loss'] = loss
  return loss, m


def update(g, pc, tx_policy, tx_value, policy, value, exp, ptx, rng):
  """ppo_epochs x num_minibatches steps in one lax.scan. ptx: [E*M, b, L] pretraining batches or None."""
  b = exp['seq'].shape[0]
  prompt_len = exp['seq'].shape[1] - exp['mask'].shape[1]
  m_count = pc.num_minibatches
  mb_size = b // m_count
  perms = jax.vmap(lambda k: jax.random.permutation(k, b))(jax.random.split(rng, pc.ppo_epochs))
  idx = perms[:, :mb_size * m_count].reshape(pc.ppo_epochs * m_count, mb_size)  # [E*M, mb]
  if m_count == 1:  # every epoch sees the whole batch: keep the order (no gather)
    idx = jnp.broadcast_to(jnp.arange(b), (pc.ppo_epochs, b))

  def one(carry, xs):
    policy, value = carry
    i, ptx_batch = xs
    mb = jax.tree.map(lambda x: x[i], exp)
    grad_fn = jax.value_and_grad(
        lambda pp, vp: ppo_loss(g, pc, prompt_len, pp, vp, policy.rest, value.rest, mb, ptx_batch),
        argnums=(0, 1), has_aux=True)
    (_, m), (gp, gv) = grad_fn(policy.params, value.params)
    up, po = tx_policy.update(gp, policy.opt_state, policy.params)
    uv, vo = tx_value.update(gv, value.opt_state, value.params)
    new = (policy.replace(step=policy.step + 1, params=optax.apply_updates(policy.params, up), opt_state=po),
           value.replace(step=value.step + 1, params=optax.apply_updates(value.params, uv), opt_state=vo))
    # TRL's ratio_threshold: a minibatch whose mean ratio has run away would make a loss spike; skip it whole
    skip = m['ratio_mean'] > pc.ratio_threshold
    policy, value = jax.tree.map(lambda old, upd: jnp.where(skip, old, upd), (policy, value), new)
    m['ratio_skipped'] = skip.astype(jnp.float32)
    m['policy_grad_norm'] = optax.tree.norm(gp)
    m['value_grad_norm'] = optax.tree.norm(gv)
    return (policy, value), m

  (policy, value), ms = jax.lax.scan(one, (policy, value), (idx, ptx))
  metrics = jax.tree.map(jnp.mean, ms)
  metrics['ratio_skipped'] = jnp.sum(ms['ratio_skipped'])  # minibatches skipped in this iteration
  metrics['nonfinite_skipped'] = state_lib.nonfinite_counts((policy, value))[1]  # updates skipped so far
  metrics['first_ratio_mean'] = ms['ratio_mean'][0]
  metrics['first_clipfrac'] = ms['clipfrac'][0]
  return policy, value, metrics


class PPOTrainer:
  """The four models' sharded states and the two compiled functions."""

  def __init__(self, config, mesh, policy_model, value_model, ref_model, reward_model, tokenizer_ids):
    pc = config.ppo
    self.pc, self.mesh = pc, mesh
    self.eos_id, self.pad_id = tokenizer_ids
    n_updates = pc.iterations * pc.ppo_epochs * pc.num_minibatches
    self.tx_policy = state_lib.make_optimizer(pc.policy_optimizer, n_updates)
    self.tx_value = state_lib.make_optimizer(pc.value_optimizer, n_updates)
    frozen = config.model.frozen_dtype
    g, st, sh = {}, {}, {}
    for name, model, tx in (('policy', policy_model, self.tx_policy), ('value', value_model, self.tx_value),
                            ('ref', ref_model, None), ('reward', reward_model, None)):
      if tx is None and frozen != 'float32':
        model = _cast(model, frozen)
      g[name], st[name], sh[name] = state_lib.place_state(model, tx, mesh)
    self.graphdefs, self.states, self.shardings = g, st, sh
    rep = shd.replicated(mesh)
    batch_sh = shd.batch_sharding(mesh)
    self.experience = jax.jit(
        lambda p, v, r, w, b, k, beta: experience(g, pc, self.eos_id, self.pad_id, p, v, r, w, b, k, beta),
        in_shardings=(sh['policy'], sh['value'], sh['ref'], sh['reward'], batch_sh, rep, rep))
    self.update = jax.jit(
        lambda p, v, e, x, k: update(g, pc, self.tx_policy, self.tx_value, p, v, e, x, k),
        in_shardings=(sh['policy'], sh['value'], batch_sh, shd.NamedSharding(mesh, shd.P(None, shd.BATCH_AXES)),
                      rep),
        out_shardings=(sh['policy'], sh['value'], rep), donate_argnums=(0, 1))

  def step(self, prompts, ptx, rng, beta):
    """One PPO iteration: (experience metrics + update metrics)."""
    st = self.states
    k_exp, k_upd = jax.random.split(rng)
    exp, em = self.experience(st['policy'], st['value'], st['ref'], st['reward'], prompts, k_exp,
                              jnp.float32(beta))
    st['policy'], st['value'], um = self.update(st['policy'], st['value'], exp, ptx, k_upd)
    return {**em, **um}


def _cast(model, dtype: str):
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
  return nnx.merge(graphdef, state)


def load_models(config, workdir: str):
  sft_dir = common.require_stage(workdir, 'sft', 'ppo')
  rm_dir = common.require_stage(workdir, 'rm', 'ppo')
  kw = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype)
  policy = hf.load_pretrained(os.path.join(sft_dir, 'hf'), **kw)
  ref = hf.load_pretrained(os.path.join(sft_dir, 'hf'), **kw)
  reward = hf.load_scalar_model(os.path.join(rm_dir, 'hf'), **kw)
  if config.ppo.value_from == 'rm':
    value = hf.load_scalar_model(os.path.join(rm_dir, 'hf'), **kw)
  elif config.ppo.value_from == 'sft':
    value = hf.load_pretrained_body(os.path.join(sft_dir, 'hf'), seed=config.seed, **kw)
  else:
    raise common.UserError(f'ppo.value_from must be rm | sft, got {config.ppo.value_from!r}')
  return policy, value, ref, reward


def run(config, workdir: str, name: str = 'ppo', inputs=None) -> dict:
  """Trains the policy into W/<name> (name: 'ppo' or one of `config.ppo_runs`)."""
  pc = config.ppo
  out = common.stage_dir(workdir, name)

  # ---------------------------------------------------------------- models (fails fast if sft/rm are missing)
  policy, value, ref, reward = load_models(config, workdir)
  tok = common.load_tokenizer(config)
  mesh = common.mesh(config)
  if pc.batch_size % (shd.batch_divisor(mesh) * pc.num_minibatches):
    raise common.UserError(f'ppo.batch_size={pc.batch_size} must be divisible by num_minibatches x data x fsdp '
                           f'devices ({pc.num_minibatches * shd.batch_divisor(mesh)})')
  trainer = PPOTrainer(config, mesh, policy, value, ref, reward, (tok.eos_token_id, tok.pad_token_id))
  del policy, value, ref, reward

  # ---------------------------------------------------------------- data: prompts, pretraining text for ptx
  info = {}
  prompt_arrays, cut = batches.prompts(tok, common.records_for(config, workdir, 'prompts', 'train', tok, info),
                                       config.data.max_prompt_len)
  prompts = sources.GrainLoader(prompt_arrays, pc.batch_size, config.seed)
  n_ptx = pc.ppo_epochs * pc.num_minibatches
  ptx_loader = None
  if pc.ptx.coef > 0:
    texts = batches.texts(tok, [r['text'] for r in common.records_for(config, workdir, 'pretrain', 'train',
                                                                      counts=info)], config.data.seq_len)
    ptx_loader = sources.GrainLoader(texts, pc.ptx.batch_size * n_ptx, config.seed + 7)

  # ---------------------------------------------------------------- resume
  ckpt = checkpoint.for_stage(out, config)
  trained = {'policy': trainer.states['policy'], 'value': trainer.states['value']}
  trained, meta = ckpt.resume(trained, prompts=prompts, ptx=ptx_loader)
  trainer.states.update(trained)
  beta = float(meta.get('beta', pc.kl.init if pc.kl.adaptive else pc.kl.coef))
  start = int(meta.get('step', 0))
  if start:
    print(f'[{name}] resumed from iteration {start}')
  rng = jax.random.key(config.seed + 3)

  # ---------------------------------------------------------------- train
  writer = metrics_lib.MetricsWriter(out, total_steps=pc.iterations, desc=name, initial_step=start,
                                     show=('score', 'kl', 'beta', 'clipfrac', 'episodes/s'), progress=config.progress)
  if start == 0:
    writer.write(0, {**cut.as_metrics('data'), **info}, split='info')
  t0, last_logged = time.perf_counter(), start
  for it in range(start + 1, pc.iterations + 1):
    batch = next(prompts)
    ptx = _ptx_batch(ptx_loader, n_ptx, pc.ptx.batch_size, mesh)
    m = trainer.step(shd.put_batch({'prompt': batch['prompt'], 'prompt_mask': batch['prompt_mask']}, mesh, local=True),
                     ptx, jax.random.fold_in(rng, it), beta)
    if pc.kl.adaptive:  # host scalar: one small transfer per iteration
      beta = float(rl.adaptive_kl_update(beta, float(m['kl']), pc.batch_size, pc.kl.target, pc.kl.horizon))
    writer.advance()
    if it % config.log_every == 0 or it == pc.iterations or it == 1:
      m = metrics_lib.to_host(m)  # waits for the iteration: the timing is compute, not dispatch
      dt = time.perf_counter() - t0
      writer.write(it, {**m, 'episodes/s': pc.batch_size * (it - last_logged) / max(dt, 1e-9)})
      t0, last_logged = time.perf_counter(), it
    if pc.snapshot_every and (it % pc.snapshot_every == 0 or it == pc.iterations):
      st = trainer.states['policy']
      hf.save_pretrained(nnx.merge(trainer.graphdefs['policy'], st.params, st.rest),
                         os.path.join(out, 'snapshots', str(it)))
    ckpt.step_end(it, pc.iterations, {'policy': trainer.states['policy'], 'value': trainer.states['value']},
                  {'step': it, 'beta': beta, 'prompts': prompts.state(),
                   'ptx': ptx_loader.state() if ptx_loader is not None else None})
  ckpt.close()
  writer.close()

  # ---------------------------------------------------------------- export
  st = trainer.states['policy']
  hf.save_pretrained(nnx.merge(trainer.graphdefs['policy'], st.params, st.rest), os.path.join(out, 'hf'),
                     tokenizer=tok)
  summary = {'stage': 'ppo', 'run': name, 'iterations': pc.iterations, 'final_beta': beta, 'ptx_coef': pc.ptx.coef,
             'kl_coef': pc.kl.coef, **info}
  checkpoint.mark_done(out, summary)
  print(f'[{name}] done; exported {os.path.join(out, "hf")}')
  return summary


def _ptx_batch(loader, n: int, b: int, mesh):
  """[E*M, b, L] pretraining batches for one update (None when ptx is off)."""
  if loader is None:
    return None
  arr = next(loader)
  arr = {k: v.reshape(n, -1, *v.shape[1:]) for k, v in arr.items()}  # this host's share of the rows, as n batches
  return shd.put_batch(arr, mesh, local=True, batch_dim=1)
