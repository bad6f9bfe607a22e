"""Reward model: train the K-way ranking loss on rankings, normalise, export.

1. Rankings: those of the `rankings` input run (a label run: SFT samples ranked by the task's labeler,
   jax_rlhf/train/label.py) or runs (a tuple: a later round's RM trains on every round's rankings, each run
   holding out its own first rm.eval_fraction), or `data.rankings` (any ranking source), or `rm.data`.
2. Train a ScalarModel initialised from the `init` run: an LM's body (SFT; head N(0, 1/sqrt(d+1)), bias 0) or
   a reward model run, continued head and all, for `rm.epochs` epochs: all K responses of a prompt go
   through the model once, the loss averages -log sigmoid(r_better - r_worse) over the prompt's C(K,2)
   pairs, each prompt counting once. Rankings with a judge's soft preferences ('prefs', the lm: judge) train
   on the soft Bradley-Terry target instead (`losses.soft_ranking_loss`, rm.soft_labels).
3. Normalise: a bias so that reference demonstrations score mean 0 (InstructGPT), optionally a gain so the
   SFT samples' scores have std 1 (Ziegler; N+ #15).
"""
from __future__ import annotations

import os
from typing import Mapping
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_rlhf import judges, losses
from jax_rlhf import metrics as metrics_lib
from jax_rlhf import sharding as shd
from jax_rlhf.data import batches, sources
from jax_rlhf.models import hf
from jax_rlhf.train import checkpoint, common
from jax_rlhf.train import state as state_lib


# ---------------------------------------------------------------------------------------------------- steps

def scores_of(model, tokens, attention_mask):
  """tokens/attention_mask [B, K, L] -> reward at each sequence's last real token [B, K]."""
  b, k, length = tokens.shape
  r = model.score(tokens.reshape(b * k, length), attention_mask.reshape(b * k, length))
  return r.reshape(b, k)


def compact_scores(model, batch):
  """Scores [B, K] of a compacted batch (`compact`): the model runs on the real responses only."""
  b, k = batch['valid'].shape
  r = model.score(batch['row_tokens'], batch['row_mask'])  # [R]
  flat = jnp.zeros((b * k,), r.dtype).at[batch['row_index']].set(r, mode='drop')  # padding rows point past the end
  return flat.reshape(b, k)


def rm_loss(model, batch, rm_cfg):
  if 'row_tokens' in batch:
    rewards = compact_scores(model, batch)  # [B, K]
  else:
    rewards = scores_of(model, batch['tokens'], batch['attention_mask'])  # [B, K]
  if 'prefs' in batch:  # a judge's soft labels
    return losses.soft_ranking_loss(rewards, batch['prefs'], batch['valid'])
  return losses.ranking_loss(rewards, batch['ranking'], batch['valid'], margin=rm_cfg.margin,
                             centering_coef=rm_cfg.centering_coef)


def rm_train_step(graphdef, tx, rm_cfg, state, batch):
  def loss_fn(params):
    loss, m = rm_loss(nnx.merge(graphdef, params, state.rest), batch, rm_cfg)
    return loss, m
  (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return (state.replace(step=state.step + 1, params=params, opt_state=opt_state),
          {'loss': loss, 'accuracy': m['accuracy'], 'margin': m['margin_mean'], 'grad_norm': optax.tree.norm(grads),
           'nonfinite_skipped': state_lib.nonfinite_counts(opt_state)[1]})


def rm_eval_step(graphdef, state, batch):
  """Scores of every response of a batch of rankings: [B, K]."""
  return scores_of(nnx.merge(graphdef, state.params, state.rest), batch['tokens'], batch['attention_mask'])


def ranking_metrics(rewards: np.ndarray, recs: list[dict], rm_cfg) -> dict[str, float]:
  """Held-out metrics of the scores [N, K] of ranking records, computed on the host.

  accuracy: pairs ordered as the labels order them, averaged per prompt then over prompts (ties count as
  wrong, as in the loss); accuracy_distinct: the same over pairs whose two responses differ (identical
  samples are a coin flip for any RM); gold_accuracy: pairs with different gold scores ordered as the gold
  labeler orders them (when the records carry gold scores).
  """
  k = rewards.shape[1]
  ranking = np.zeros((len(recs), k), np.int32)
  valid = np.zeros((len(recs), k), bool)
  for i, r in enumerate(recs):
    ranking[i, :len(r['ranking'])] = r['ranking']
    valid[i, :len(r['ranking'])] = True
  loss, m = losses.ranking_loss(jnp.asarray(rewards), jnp.asarray(ranking), jnp.asarray(valid),
                                margin=rm_cfg.margin, centering_coef=rm_cfg.centering_coef)
  distinct = [0, 0]
  gold = [0, 0]
  by_category: dict[str, list[int]] = {}
  for r, row in zip(recs, rewards):
    order = r['ranking']
    for a in range(len(order)):
      for b in range(a + 1, len(order)):
        hi, lo = order[a], order[b]
        if r['responses'][hi] != r['responses'][lo]:
          distinct[0] += row[hi] > row[lo]
          distinct[1] += 1
        g = r.get('gold')
        if g and g[hi] != g[lo]:
          right = int((row[hi] > row[lo]) == (g[hi] > g[lo]))
          gold[0] += right
          gold[1] += 1
          if r.get('category'):
            c = by_category.setdefault(r['category'], [0, 0])
            c[0] += right
            c[1] += 1
  out = {'loss': float(loss), 'accuracy': float(m['accuracy']),
         'accuracy_distinct': float(distinct[0] / max(distinct[1], 1))}
  if gold[1]:
    out['gold_accuracy'] = gold[0] / gold[1]
  for c, (right, total) in sorted(by_category.items()):
    out[f'gold_accuracy/{c}'] = right / total
  return out


# ---------------------------------------------------------------------------------------------------- stage

def run(config, workdir: str, name: str = 'rm', inputs: Mapping[str, str] | None = None) -> dict:
  """Trains a reward model into W/<name> from the `init` input run's body (default sft) on the rankings of the
  `rankings` input run (default label) unless `data.rankings` or `rm.data` gives them."""
  inputs = {'init': 'sft', 'rankings': 'label', **(inputs or {})}
  rc = config.rm
  out = common.stage_dir(workdir, name)
  os.makedirs(out, exist_ok=True)
  sft_dir = common.require_stage(workdir, inputs['init'], name)
  tok = common.load_tokenizer(config)
  mesh = common.mesh(config)

  # ---------------------------------------------------------------- rankings
  t0 = time.perf_counter()
  info = {}
  eval_recs = train_recs = None
  if config.data.rankings:  # a ranking source: its held-out split (or the first data.eval_fraction) for eval
    recs = common.records_for(config, workdir, 'rankings', 'train', tok, info)
    eval_recs = common.records_for(config, workdir, 'rankings', 'eval', tok, info)
  elif rc.data:
    recs = common.read(config, rc.data, 'ranking')
  else:  # one label run, or (later rounds) several: each holds out its own first rm.eval_fraction
    parts = [common.read_rankings(workdir, run_name, name) for run_name in _runs(inputs['rankings'])]
    recs = [r for part in parts for r in part]
    if len(parts) > 1:
      cuts = [max(int(len(part) * rc.eval_fraction), 1) for part in parts]
      eval_recs = [r for part, n in zip(parts, cuts) for r in part[:n]]
      train_recs = [r for part, n in zip(parts, cuts) for r in part[n:]]
  label_s = time.perf_counter() - t0
  if eval_recs is None:
    n_eval = max(int(len(recs) * rc.eval_fraction), 1)
    train_recs, eval_recs = recs[n_eval:], recs[:n_eval]
  elif train_recs is None:
    train_recs = recs
  k_max = max(len(r['responses']) for r in train_recs + eval_recs)
  train_arrays, cut = batches.rankings(tok, train_recs, config.data.max_prompt_len, config.data.max_response_len, k_max)
  eval_arrays, _ = batches.rankings(tok, eval_recs, config.data.max_prompt_len, config.data.max_response_len, k_max)
  soft = bool(rc.soft_labels) and any('prefs' in r for r in train_recs)
  if soft:
    train_arrays['prefs'] = judges.soft_labels(train_recs, k_max)
  bs = min(rc.batch_size, len(train_recs))
  bs -= bs % shd.batch_divisor(mesh)
  if bs <= 0:
    raise common.UserError(f'rm: {len(train_recs)} training rankings are fewer than the data x fsdp devices')
  steps = max(rc.epochs * (len(train_recs) // bs), 1)

  # ---------------------------------------------------------------- model: SFT body + fresh scalar head
  if _is_scalar(os.path.join(sft_dir, 'hf')):  # init is a reward model run: continue it, head included
    model = hf.load_scalar_model(os.path.join(sft_dir, 'hf'), **common.model_kw(config))
  else:
    model = hf.load_pretrained_body(os.path.join(sft_dir, 'hf'), seed=config.seed, **common.model_kw(config))
  model = common.add_lora(model, config)  # LoRA: adapters + the head train; exported merged
  tx = state_lib.make_optimizer(rc.optimizer, steps)
  graphdef, state, shardings = state_lib.place_state(model, tx, mesh)
  del model
  batch_sh = shd.batch_sharding(mesh)
  train_step = shd.mesh_jit(mesh, lambda s, b: rm_train_step(graphdef, tx, rc, s, b), donate_argnums=0,
                       in_shardings=(shardings, batch_sh), out_shardings=(shardings, shd.replicated(mesh)))
  eval_step = shd.mesh_jit(mesh, lambda s, b: rm_eval_step(graphdef, s, b), in_shardings=(shardings, batch_sh))

  # ---------------------------------------------------------------- resume
  loader = sources.GrainLoader(train_arrays, bs, config.seed)
  ckpt, state, start = checkpoint.resume_stage(out, config, name, state, loader)

  def evaluate(state) -> dict[str, float]:  # scores sharded over the processes' devices, gathered on each
    rewards = [shd.to_host(eval_step(state, shd.put_batch(b, mesh)))[:n]
               for b, n in batches.padded_batches(eval_arrays, bs, shd.batch_divisor(mesh))]
    return ranking_metrics(np.concatenate(rewards), eval_recs, rc)

  # ---------------------------------------------------------------- train
  writer = metrics_lib.MetricsWriter(out, total_steps=steps, desc=name, initial_step=start,
                                     show=('loss', 'accuracy', 'eval_accuracy'), progress=config.progress)
  if start == 0:
    gold_acc = common.labeler_agreement(recs)
    writer.write(0, {'rankings': len(recs), 'label_seconds': label_s, 'label_vs_gold_accuracy': gold_acc,
                     **cut.as_metrics('data'), **info}, split='info')
  local_bs = shd.process_rows(mesh, bs)
  rows = batches.compact_rows(train_arrays['valid'], local_bs.stop - local_bs.start, jax.local_device_count())
  for step in range(start + 1, steps + 1):
    batch = next(loader)
    small = batches.compact(batch, rows, local_bs.start * batch['valid'].shape[1])
    if small is not None and 'prefs' in batch:
      small['prefs'] = batch['prefs']
    state, m = train_step(state, shd.put_batch(batch if small is None else small, mesh, local=True))
    writer.advance()
    if step % config.log_every == 0 or step == steps:
      writer.write(step, m)
    ckpt.step_end(step, steps, state, {'step': step, 'loader': loader.state()})
  ckpt.close()
  ev = evaluate(state)
  writer.write(steps, {f'eval_{k}': v for k, v in ev.items()}, split='eval')

  # ---------------------------------------------------------------- normalise and export
  model = nnx.merge(graphdef, state.params, state.rest)
  norm = normalise(model, config, workdir, tok, train_arrays)
  writer.write(steps, norm, split='eval')
  writer.close()
  hf.save_pretrained(model, os.path.join(out, 'hf'), tokenizer=tok)
  summary = {'stage': 'rm', 'steps': steps, 'init': inputs['init'], 'rankings_from': list(_runs(inputs['rankings'])),
             'train_rankings': len(train_recs), 'soft_labels': soft, **{f'eval_{k}': v for k, v in ev.items()}, **norm, **info}
  checkpoint.mark_done(out, summary)
  print(f'[{name}] done: held-out pairwise accuracy {ev["accuracy"]:.3f} ({ev["accuracy_distinct"]:.3f} on distinct '
        f'responses, {ev.get("gold_accuracy", float("nan")):.3f} against the gold labeler) on {len(eval_recs)} prompts; '
        f'exported {os.path.join(out, "hf")}')
  return summary


def _runs(src) -> tuple[str, ...]:
  """The label runs of the `rankings` input: one name, or a tuple of names (later rounds: every round's)."""
  return (src,) if isinstance(src, str) else tuple(src)


def _is_scalar(hf_dir: str) -> bool:
  """Whether an HF folder holds a scalar (sequence-classification) model, i.e. a reward model run's export."""
  import json
  with open(os.path.join(hf_dir, 'config.json')) as f:
    return any(a.endswith('ForSequenceClassification') for a in json.load(f).get('architectures') or [])


def normalise(model, config, workdir, tok, train_arrays) -> dict[str, float]:
  """Set the head's gain/bias: demonstrations score mean 0 (and, optionally, SFT samples std 1)."""
  rc = config.rm
  score = jax.jit(lambda m, t, a: m.score(t, a))
  out = {}
  gain = 1.0
  model.head.norm_gain.set_value(jnp.ones((), jnp.float32))  # measure the raw head
  model.head.norm_bias.set_value(jnp.zeros((), jnp.float32))
  if rc.normalize_gain:  # std of the scores of the ranked SFT samples
    t = train_arrays['tokens'][train_arrays['valid']][:512]
    a = train_arrays['attention_mask'][train_arrays['valid']][:512]
    s = shd.to_host(score(model, t, a))
    gain = 1.0 / max(float(s.std()), 1e-6)
  model.head.norm_gain.set_value(jnp.asarray(gain, jnp.float32))
  if rc.normalize:
    demos = []
    if config.data.demonstrations or not (rc.data or config.data.rankings):
      demos = common.records_for(config, workdir, 'demonstrations', 'train', tok)[:512]
    if demos:
      arr, _ = batches.demonstrations(tok, demos, config.data.max_prompt_len, config.data.max_response_len)
      s = shd.to_host(score(model, arr['tokens'], arr['attention_mask']))  # already includes the gain
      model.head.norm_bias.set_value(jnp.asarray(-float(s.mean()), jnp.float32))
      out['demo_score_mean_before'] = float(s.mean())
    else:
      print('[rm] warning: rm.normalize is on but there are no demonstrations of the task to centre on '
            '(rm.data is set); the bias is left at 0')
  out['norm_gain'] = gain
  out['norm_bias'] = float(model.head.norm_bias[...])
  return out
