"""Pretraining and supervised fine-tuning: the same LM step, different data and masks.

pretrain: packed text, every token a target, from a random init (or `model.path`).
sft:      demonstrations (prompt + response + EOS), loss on response tokens only (prompt masked), from the
          pretrain stage (or `model.path`); cosine decay to 10% of the peak; held-out demonstration loss.
"""
from __future__ import annotations

import os
import time
from typing import Mapping

import jax
import numpy as np
from flax import nnx

from jax_rlhf import metrics as metrics_lib
from jax_rlhf import sharding as shd
from jax_rlhf.data import batches, sources
from jax_rlhf.models import hf
from jax_rlhf.models.transformer import Transformer
from jax_rlhf.train import checkpoint, common, lm
from jax_rlhf.train import state as state_lib


def _data(config, workdir, stage, tok):
  """(train arrays, held-out arrays, info metrics) from data.pretrain / data.demonstrations or the task."""
  d = config.data
  info = {}
  if stage == 'pretrain':
    train = batches.texts(tok, [r['text'] for r in common.records_for(config, workdir, 'pretrain', 'train',
                                                                      counts=info)], d.seq_len)
    held = batches.texts(tok, [r['text'] for r in common.records_for(config, workdir, 'pretrain', 'eval',
                                                                     counts=info)], d.seq_len)
    return train, held, info
  train, cut = batches.demonstrations(tok, common.records_for(config, workdir, 'demonstrations', 'train', tok, info),
                                      d.max_prompt_len, d.max_response_len)
  held, _ = batches.demonstrations(tok, common.records_for(config, workdir, 'demonstrations', 'eval', tok, info),
                                   d.max_prompt_len, d.max_response_len)
  if d.pack_sft:
    train = batches.pack(train, d.max_prompt_len + d.max_response_len)
  return train, held, {**cut.as_metrics('data'), **info}


def _initial_model(config, workdir, stage, tok, sc, name, inputs):
  """The model this stage starts from: random init, a HF folder, or the export of the `init` input run."""
  init = 'scratch' if stage == 'pretrain' else sc.init
  if config.model.path and init in ('scratch', 'hf', 'pretrain') and (stage == 'pretrain' or init == 'hf'):
    return common.load_lm(config.model.path, config, tok, dropout_rate=sc.dropout)
  if init == 'pretrain':
    prev = common.require_stage(workdir, inputs.get('init', 'pretrain'), name)
    return common.load_lm(os.path.join(prev, 'hf'), config, dropout_rate=sc.dropout)
  if init == 'hf':
    raise common.UserError(f'{stage}.init=hf needs model.path (a Hugging Face folder)')
  if init != 'scratch':
    raise common.UserError(f'{stage}.init must be pretrain | hf | scratch, got {init!r}')
  cfg = common.model_config(config, tok, dropout_rate=sc.dropout)
  return Transformer(cfg, rngs=nnx.Rngs(config.seed))


def _base_dir(config, workdir, sc, inputs) -> str:
  """The HF folder SFT starts from ('' from scratch): the base a PEFT adapter export points to."""
  if sc.init == 'hf':
    return os.path.abspath(os.path.expanduser(config.model.path))
  if sc.init == 'pretrain':
    return os.path.join(common.stage_dir(workdir, inputs.get('init', 'pretrain')), 'hf')
  return ''


def evaluate_lm(eval_fn, state, arrays, batch_size: int, mesh) -> float:
  """Exact mean token loss over every row of `arrays`."""
  total, count = 0.0, 0.0
  for batch, _ in batches.padded_batches(arrays, batch_size, shd.batch_divisor(mesh)):
    out = jax.device_get(eval_fn(state, shd.put_batch(batch, mesh)))
    total += float(out['loss_sum'])
    count += float(out['tokens'])
  return total / max(count, 1.0)


def run(config, workdir: str, name: str = 'sft', inputs: Mapping[str, str] | None = None) -> dict:
  """Supervised fine-tuning into W/<name>, from the `init` input run (default pretrain) when `sft.init=pretrain`."""
  return _train(config, workdir, 'sft', name, {'init': 'pretrain', **(inputs or {})})


def run_pretrain(config, workdir: str, name: str = 'pretrain', inputs: Mapping[str, str] | None = None) -> dict:
  """Pretraining into W/<name> (from a random init, or `model.path`); it has no inputs."""
  return _train(config, workdir, 'pretrain', name, dict(inputs or {}))


def _train(config, workdir: str, stage: str, name: str, inputs: Mapping[str, str]) -> dict:
  sc = config[stage]
  out = common.stage_dir(workdir, name)

  # ---------------------------------------------------------------- data
  tok = common.load_tokenizer(config)
  train_arrays, eval_arrays, data_metrics = _data(config, workdir, stage, tok)
  mesh = common.mesh(config)
  bs = sc.batch_size
  if bs % shd.batch_divisor(mesh):
    raise common.UserError(f'{stage}.batch_size={bs} must be divisible by the data x fsdp devices '
                           f'({shd.batch_divisor(mesh)})')

  # ---------------------------------------------------------------- model, optimizer, sharded state
  model = _initial_model(config, workdir, stage, tok, sc, name, inputs)
  if stage != 'pretrain':  # LoRA (model.lora.rank > 0): the adapters train, the loaded weights stay frozen
    model = common.add_lora(model, config)
  context = config.data.seq_len if stage == 'pretrain' else config.data.max_prompt_len + config.data.max_response_len
  if model.config.layout == 'gpt2' and context > model.config.max_len:  # learned positions end there
    raise common.UserError(f'{stage} sequences of {context} tokens (data.max_prompt_len + data.max_response_len, '
                           f'or data.seq_len) are longer than the model\'s {model.config.max_len} positions')
  tx = state_lib.make_optimizer(sc.optimizer, sc.steps)
  graphdef, state, shardings = state_lib.place_state(model, tx, mesh)
  del model
  train_step = lm.jit_lm_step(graphdef, tx, shardings, mesh)
  eval_step = lm.jit_lm_eval(graphdef, shardings, mesh)

  # ---------------------------------------------------------------- resume
  loader = sources.GrainLoader(train_arrays, bs, config.seed)
  ckpt, state, start = checkpoint.resume_stage(out, config, name, state, loader)
  rng = jax.random.key(config.seed)

  # ---------------------------------------------------------------- train
  writer = metrics_lib.MetricsWriter(out, total_steps=sc.steps, desc=name, initial_step=start,
                                     show=('loss', 'eval_loss', 'tokens/s'), progress=config.progress)
  if start == 0:
    writer.write(0, {**data_metrics, 'params': state_lib.num_params(state.params),
                     'train_sequences': len(train_arrays['tokens'])}, split='info')
  t0, tokens_seen = time.perf_counter(), 0
  m = {}
  for step in range(start + 1, sc.steps + 1):
    batch = next(loader)
    state, m = train_step(state, shd.put_batch(batch, mesh, local=True), rng)
    tokens_seen += int(batch['attention_mask'].sum())
    writer.advance()
    if step % config.log_every == 0 or step == sc.steps:
      m = metrics_lib.to_host(m)  # waits for the step: the timing below is compute, not dispatch
      dt = time.perf_counter() - t0
      writer.write(step, {**m, 'tokens/s': tokens_seen / max(dt, 1e-9), 'epoch': loader.epoch})
      t0, tokens_seen = time.perf_counter(), 0
    if step % sc.eval_every == 0 or step == sc.steps:
      writer.write(step, {'eval_loss': evaluate_lm(eval_step, state, eval_arrays, bs, mesh)}, split='eval')
    ckpt.step_end(step, sc.steps, state, {'step': step, 'loader': loader.state(), 'seed': config.seed})

  # ---------------------------------------------------------------- export
  ckpt.close()
  final_eval = evaluate_lm(eval_step, state, eval_arrays, bs, mesh)
  writer.close()
  hf.save_pretrained(nnx.merge(graphdef, state.params, state.rest), os.path.join(out, 'hf'), tokenizer=tok)
  if stage != 'pretrain':
    common.export_lora(nnx.merge(graphdef, state.params, state.rest), config, out,
                       _base_dir(config, workdir, sc, inputs))
  summary = {'stage': stage, 'steps': sc.steps, 'eval_loss': final_eval, **_skipped(data_metrics),
             'train_loss': float(np.asarray(m['loss'])) if m else None}
  checkpoint.mark_done(out, summary)
  print(f'[{name}] done: eval loss {final_eval:.4f}; exported {os.path.join(out, "hf")}')
  return summary


def _skipped(info: dict) -> dict:
  """The bad records a run skipped (data.on_error=skip), for the stage's summary."""
  return {k: v for k, v in info.items() if k.startswith('data/skipped/')}
