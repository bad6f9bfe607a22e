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

Online DPO (`dpo.online`, the same run kind) lives in train/dpo_online.py: `run` hands it the run; it reuses
this module's step (`dpo_train_step`), loss (`preference_loss`) and model loading.
"""
from __future__ import annotations

import json
import os
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_rlhf import losses
from jax_rlhf import metrics as metrics_lib
from jax_rlhf import sharding as shd
from jax_rlhf.data import batches, sources
from jax_rlhf.models import hf, lora, scoring
from jax_rlhf.train import checkpoint, common
from jax_rlhf.train import state as state_lib

MODES = ('pairwise', 'listwise', 'best_vs_worst')


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
  """One AdamW step of DPO. `ref` is the reference's TrainState (run in this step under `ref_graphdef`, default
  the policy's), or None when the batch carries precomputed `ref_logps` [B, K] or, with LoRA, when the reference
  is the policy's own base: then `ref_graphdef` (the policy's graphdef with its adapters off) runs on `state`.
  Returns (state, metrics)."""
  if 'ref_logps' in batch:
    ref_logps = batch['ref_logps']
  else:  # a LoRA policy's reference run has no adapters: always its own graphdef, never the policy's
    ref_logps = reference_logps(ref_graphdef or graphdef, state if ref is None else ref, batch, prompt_len)

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
    from jax_rlhf.train import dpo_online  # the online half imports this module: loaded when a run needs it
    return dpo_online.run(config, workdir, name, inputs)
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
  ref_logps_fn = logps_fn if ref_graphdef == graphdef else shd.mesh_jit(  # LoRA: another graph, its own program
      mesh, lambda params, rest, b: response_logps(nnx.merge(ref_graphdef, params, rest), b, p_len),
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
