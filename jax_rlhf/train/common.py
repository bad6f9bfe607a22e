"""What every stage does the same way: the workdir layout, the tokenizer, the task's data, the mesh,
model configs, loading the previous stage, and the one-line error for a stage whose input is missing."""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from jax_rlhf import sharding as shd
from jax_rlhf.data import records
from jax_rlhf.models import transformer
from jax_rlhf.train import checkpoint


class UserError(Exception):
  """A mistake the user can fix (missing input, bad config, bad data): printed as one line, exit 2."""


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), stage)


def require_stage(workdir: str, stage: str, needed_by: str) -> str:
  """The folder of a finished stage, or a UserError saying what to run first."""
  d = stage_dir(workdir, stage)
  if not checkpoint.is_done(d):
    raise UserError(f'{needed_by} needs the {stage} stage in {d}, which is missing or unfinished: run '
                    f'`python -m jax_rlhf.main --config configs/{stage}.py --workdir {workdir}` first '
                    f'(or configs/pipeline.py to run every stage)')
  return d


def load_tokenizer(config: ml_collections.ConfigDict):
  from transformers import AutoTokenizer
  path = config.data.tokenizer
  if not path:
    if config.task.name != 'instruct_world':
      raise UserError('data.tokenizer is empty: set it to a local tokenizer folder')
    from jax_rlhf.tasks import instruct_world
    path = instruct_world.tokenizer_path()
  path = os.path.expanduser(path)
  if not os.path.isdir(path):
    raise UserError(f'tokenizer folder {path} does not exist (data.tokenizer)')
  tok = AutoTokenizer.from_pretrained(path)
  if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
    raise UserError(f'the tokenizer in {path} needs a pad token distinct from EOS (N+ detail #3)')
  return tok


def world(config: ml_collections.ConfigDict):
  from jax_rlhf.tasks import instruct_world
  t = config.task
  return instruct_world.World(instruct_world.WorldConfig(seed=t.seed, demo_error_rate=t.demo_error_rate))


def task_files(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """The task's JSONL files under W/data, written once (deterministic from task.seed)."""
  d = stage_dir(workdir, 'data')
  index = os.path.join(d, 'files.json')
  if config.task.name != 'instruct_world' and not os.path.exists(index):
    raise UserError(f'unknown task {config.task.name!r}; the embedded task is instruct_world')
  t = config.task
  if jax.process_index() == 0 and not os.path.exists(index):
    os.makedirs(d, exist_ok=True)
    paths = world(config).write(d, n_pretrain=t.n_pretrain, n_sft_train=t.n_sft_train, n_sft_eval=t.n_sft_eval,
                                n_prompts_train=t.n_prompts_train, n_prompts_eval=t.n_prompts_eval)
    paths = {k: os.path.abspath(v) for k, v in paths.items()}
    with open(index + '.tmp', 'w') as f:
      json.dump(paths, f, indent=1)
    os.replace(index + '.tmp', index)
  if jax.process_count() > 1:  # the others wait until process 0 has written them
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('task_files')
  with open(index) as f:
    return json.load(f)


def read(config: ml_collections.ConfigDict, path: str, kind: str) -> list[dict[str, Any]]:
  try:
    recs, _ = records.read_jsonl(path, kind, on_error=config.data.on_error)
  except records.RecordError as e:
    raise UserError(str(e)) from None
  if not recs:
    raise UserError(f'{path}: no {kind} records')
  return recs


def mesh(config: ml_collections.ConfigDict):
  try:
    return shd.make_mesh(dict(config.mesh))
  except ValueError as e:
    raise UserError(f'config.mesh: {e}') from None


def model_config(config: ml_collections.ConfigDict, tokenizer, **overrides) -> transformer.TransformerConfig:
  """The preset, with the tokenizer's vocabulary and token ids, dtypes from the config."""
  vocab = len(tokenizer)
  try:
    cfg = transformer.preset(config.model.preset)
  except ValueError as e:
    raise UserError(f'config.model.preset: {e}') from None
  return cfg.replace(vocab_size=max(vocab, cfg.vocab_size if cfg.vocab_size >= vocab else vocab),
                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                     bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                     else tokenizer.eos_token_id,
                     dtype=config.model.dtype, param_dtype=config.model.param_dtype, **overrides)


def load_lm(path: str, config: ml_collections.ConfigDict, **overrides):
  """A causal LM from a Hugging Face folder (our exports or a real checkpoint); overrides: config fields."""
  from jax_rlhf.models import hf
  path = os.path.expanduser(path)
  if not os.path.isdir(path):
    raise UserError(f'model folder {path} does not exist')
  return hf.load_pretrained(path, dtype=config.model.dtype, param_dtype=config.model.param_dtype, **overrides)


def write_json(path: str, obj: Any) -> None:
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
      json.dump(obj, f, indent=1, default=float)
    os.replace(path + '.tmp', path)
