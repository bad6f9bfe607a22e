"""What every stage does the same way: the workdir layout, the tokenizer, the task's data, the mesh,
model configs, loading an input run, and the one-line error for a run whose input is missing."""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import ml_collections

from jax_rlhf import sharding as shd
from jax_rlhf.data import records
from jax_rlhf.models import transformer_config
from jax_rlhf.train import checkpoint


class UserError(Exception):
  """A mistake the user can fix (missing input, bad config, bad data): printed as one line, exit 2."""


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), stage)


def require_stage(workdir: str, stage: str, needed_by: str) -> str:
  """The folder of the finished run `stage` (an input of `needed_by`), or a UserError saying to make it first."""
  d = stage_dir(workdir, stage)
  if not checkpoint.is_done(d):
    how = (f'`python -m jax_rlhf.main --config configs/{stage}.py --workdir {workdir}`' if stage in _KINDS else
           f'the plan that names it (`python -m jax_rlhf.main --config configs/pipeline.py --workdir {workdir}`)')
    raise UserError(f'{needed_by} needs the {stage} run in {d}, which is missing or unfinished: make {stage} first '
                    f'with {how} (or configs/pipeline.py to run every stage)')
  return d


_KINDS = ('pretrain', 'sft', 'label', 'rm', 'ppo', 'eval', 'dpo', 'grpo')


def get_task(config: ml_collections.ConfigDict):
  """The embedded task of `config.task` (jax_rlhf.tasks.Task), None when `task.name` is empty; a bad name or
  knob is a UserError."""
  from jax_rlhf import tasks
  try:
    return tasks.get_task(config)
  except tasks.TaskError as e:
    raise UserError(str(e)) from None


def load_tokenizer(config: ml_collections.ConfigDict):
  from transformers import AutoTokenizer
  path = config.data.tokenizer
  if not path:
    task = get_task(config)
    if task is None:
      raise UserError('data.tokenizer is empty: set it to a local tokenizer folder')
    path = task.tokenizer_path()
  path = os.path.expanduser(path)
  if not os.path.isdir(path):
    raise UserError(f'tokenizer folder {path} does not exist (data.tokenizer)')
  tok = AutoTokenizer.from_pretrained(path)
  if (tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id) and config.data.pad_token:
    tok.add_special_tokens({'pad_token': config.data.pad_token})  # GPT-2, Qwen2.5 base: N+ detail #3
  if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
    raise UserError(f'the tokenizer in {path} needs a pad token distinct from EOS (N+ detail #3): '
                    f'set data.pad_token (e.g. <|pad|>) to add one')
  return tok


def task_files(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """The task's JSONL files under W/data, written once (deterministic from the task's knobs), with the knobs that
  wrote them in W/data/task.json. A later run whose knobs differ only by a larger file size the task grows
  prefix-stably (`task.file_sizes`: instruct_world's n_prompts_train, ..., as rounds=N raises) rewrites them,
  every record an earlier run read unchanged; any other difference is a UserError naming the knob, since the
  runs already in the workdir read the old files. A workdir from before task.json is taken as it is."""
  d = stage_dir(workdir, 'data')
  index = os.path.join(d, 'files.json')
  task = get_task(config)
  if task is None and not os.path.exists(index):
    raise UserError('task.name is empty: there are no task files (set the data.* sources)')
  knobs = config.task.to_dict()
  write = not os.path.exists(index)
  if task is not None and not write:
    write = _files_outgrown(d, knobs, getattr(task, 'file_sizes', ()))
  if jax.process_index() == 0 and write:
    os.makedirs(d, exist_ok=True)
    try:
      paths = task.write_files(d)
    except ValueError as e:
      raise UserError(str(e)) from None
    paths = {k: os.path.abspath(v) for k, v in paths.items()}
    for name, obj in (('task.json', knobs), ('files.json', paths)):
      with open(os.path.join(d, name) + '.tmp', 'w') as f:
        json.dump(obj, f, indent=1)
      os.replace(os.path.join(d, name) + '.tmp', os.path.join(d, name))
  if jax.process_count() > 1:  # the others wait until process 0 has written them
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('task_files')
  with open(index) as f:
    return json.load(f)


def _files_outgrown(data_dir: str, knobs: dict, grows: Sequence[str]) -> bool:
  """Whether W/data's files (written with the knobs in task.json) must be rewritten for `knobs`: True when the
  only differences are larger sizes in `grows`; a UserError for any other difference; False when equal or when
  there is no task.json (a workdir from before it)."""
  path = os.path.join(data_dir, 'task.json')
  if not os.path.exists(path):
    return False
  with open(path) as f:
    have = json.load(f)
  differ = sorted(k for k in set(have) | set(knobs) if have.get(k) != knobs.get(k))
  for k in differ:
    if not (k in grows and isinstance(have.get(k), int) and isinstance(knobs.get(k), int) and knobs[k] > have[k]):
      raise UserError(f'{data_dir} holds the task files written with task.{k}={have.get(k)!r}, and this run has '
                      f'task.{k}={knobs.get(k)!r}: the runs in this workdir read those files; use a new workdir '
                      f'or the same task.{k}')
  if differ and jax.process_index() == 0:
    print(f'[data] task files grow ({", ".join(f"task.{k} {have[k]} -> {knobs[k]}" for k in differ)}); the '
          f'records earlier runs read are unchanged', flush=True)
  return bool(differ)


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


def model_kw(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The `TransformerConfig` fields every stage takes from `config.model` for every model it builds or loads:
  dtypes, `remat` and `scan_layers`."""
  m = config.model
  remat = m.get('remat', 'none')
  if remat not in transformer_config.REMAT_POLICIES:
    raise UserError(f'config.model.remat must be one of {", ".join(transformer_config.REMAT_POLICIES)}, got {remat!r}')
  return dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=remat, scan_layers=bool(m.get('scan_layers', False)))


def model_config(config: ml_collections.ConfigDict, tokenizer, **overrides) -> transformer_config.TransformerConfig:
  """The preset, with the tokenizer's vocabulary and token ids; dtypes, remat and scan_layers from the config."""
  vocab = len(tokenizer)
  try:
    cfg = transformer_config.preset(config.model.preset)
  except ValueError as e:
    raise UserError(f'config.model.preset: {e}') from None
  return cfg.replace(vocab_size=max(vocab, cfg.vocab_size if cfg.vocab_size >= vocab else vocab),
                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                     bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                     else tokenizer.eos_token_id,
                     **{**model_kw(config), **overrides})


def load_lm(path: str, config: ml_collections.ConfigDict, tok=None, **overrides):
  """A causal LM from a Hugging Face folder (our exports or a real checkpoint); overrides: config fields.
  With `tok`, an embedding smaller than the tokenizer (a pad token was added) grows to fit it."""
  from jax_rlhf.models import hf
  path = os.path.expanduser(path)
  if not os.path.isdir(path):
    raise UserError(f'model folder {path} does not exist')
  model = hf.load_pretrained(path, **{**model_kw(config), **overrides})
  if tok is not None and len(tok) > model.config.vocab_size:
    resize_vocab(model, len(tok))
  return model


def resize_vocab(model, vocab: int) -> None:
  """Grow the token embedding (and an untied LM head) to `vocab` rows, new rows the mean of the old ones
  (as transformers' resize_token_embeddings), so that added tokens (a pad) start as an average token."""
  import numpy as np
  old = np.asarray(model.wte[...])
  extra = vocab - old.shape[0]
  model.wte.set_value(jax.numpy.asarray(np.concatenate([old, np.repeat(old.mean(0, keepdims=True), extra, 0)])))
  if getattr(model, 'has_lm_head', False):
    head = np.asarray(model.lm_head[...])
    model.lm_head.set_value(jax.numpy.asarray(
        np.concatenate([head, np.repeat(head.mean(1, keepdims=True), extra, 1)], 1)))
  model.config = model.config.replace(vocab_size=vocab)


def lora_config(config: ml_collections.ConfigDict):
  """`model.lora` as a `models.lora.LoRAConfig` (a bad value: UserError)."""
  from jax_rlhf.models import lora
  try:
    return lora.LoRAConfig.from_config(config.model.get('lora'))
  except ValueError as e:
    raise UserError(str(e)) from None


def add_lora(model, config: ml_collections.ConfigDict):
  """`model` with LoRA adapters attached when model.lora.rank > 0 (else unchanged)."""
  from jax_rlhf.models import lora
  lcfg = lora_config(config)
  if lcfg.rank:
    try:
      lora.add(model, lcfg, seed=config.seed)
    except ValueError as e:
      raise UserError(str(e)) from None
  return model


def export_lora(model, config: ml_collections.ConfigDict, out: str, base_dir: str) -> None:
  """With model.lora.export=peft, also write the adapters as a PEFT folder W/<run>/peft on `base_dir` (the
  input run's HF folder the adapters were trained on). `out/hf` is always the merged model (what later
  stages and the eval read)."""
  from jax_rlhf.models import lora
  lcfg = lora_config(config)
  if lcfg.rank and lcfg.export == 'peft':
    try:
      lora.save_peft(model, os.path.join(out, 'peft'), lcfg, base_dir)
    except ValueError as e:
      raise UserError(str(e)) from None


def write_json(path: str, obj: Any) -> None:
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
      json.dump(obj, f, indent=1, default=float)
    os.replace(path + '.tmp', path)


def has_source(config: ml_collections.ConfigDict, role: str) -> bool:
  """Whether `role` can be read: from `data.<role>`, or from the embedded task's files."""
  from jax_rlhf.tasks import FILE_ROLES
  return bool(config.data[role]) or (bool(config.task.name) and (role, 'train') in FILE_ROLES)


def records_for(config: ml_collections.ConfigDict, workdir: str, role: str, split: str = 'train', tok=None,
                counts: dict | None = None) -> list[dict[str, Any]]:
  """The records of a data role (demonstrations | rankings | prompts | pretrain) and split (train | eval), from
  `data.<role>` or the task's files; prompts formatted by the tokenizer's chat template when `tok` is given,
  and, with `data.cut_prompts=False`, checked against `data.max_prompt_len`. A bad record is a UserError
  (`file:line: what`) or, with `data.on_error=skip`, skipped and counted in `counts['data/skipped/<role>']`."""
  from jax_rlhf.data import sources
  from jax_rlhf.data import tokenizer as tok_lib
  from jax_rlhf.tasks import FILE_ROLES
  d = config.data
  kind = sources.KIND_OF[role]
  spec = d[role]
  if not spec:
    if (role, split) not in FILE_ROLES or get_task(config) is None:
      raise UserError(f'data.{role} is empty and the task gives no {role}: set data.{role} to a source '
                      f'(jsonl:PATH, tfds:NAME, hh_rlhf:DIR, tldr_sft:DIR, tldr_comparisons:DIR, rankings:DIR)')
    spec = 'jsonl:' + task_files(config, workdir)[FILE_ROLES[role, split]]
  read_split = split if d[role] else 'all'  # the task's files are split already
  try:
    recs = sources.load(spec, kind, split=read_split, on_error=d.on_error, data_dir=d.tfds_dir,
                        eval_fraction=d.eval_fraction)
    items = recs.items
    if tok is not None and kind != 'text':
      items = tok_lib.format_records(tok, items, d.chat_template)
      if not d.cut_prompts:
        keep, errors = tok_lib.check_prompt_lengths(tok, items, recs.origins, d.max_prompt_len, d.on_error)
        items = [items[i] for i in keep]
        recs.skipped += len(errors)
        recs.errors += errors
  except (records.RecordError, ValueError) as e:
    raise UserError(str(e)) from None
  if recs.skipped:
    print(f'[data] {role} ({split}): skipped {recs.skipped} bad records (data.on_error=skip); first: {recs.errors[0]}',
          flush=True)
  if counts is not None:
    counts[f'data/skipped/{role}'] = counts.get(f'data/skipped/{role}', 0) + recs.skipped
  if not items:
    raise UserError(f'{spec}: no {kind} records in its {split} split')
  return items


RANKINGS = 'rankings.jsonl'  # what a label run writes into its folder


def read_rankings(workdir: str, name: str, needed_by: str) -> list[dict]:
  """The rankings a finished label run wrote (W/<name>/rankings.jsonl), as records."""
  d = require_stage(workdir, name, needed_by)
  path = os.path.join(d, RANKINGS)
  if not os.path.exists(path):
    raise UserError(f'{needed_by}: the run {name} in {d} has no {RANKINGS} (is it a label run?)')
  with open(path) as f:  # our own labels (samples may be empty strings: no schema check)
    return [json.loads(line) for line in f if line.strip()]


def labeler_agreement(recs: Sequence[dict]) -> float:
  """How often the (noisy) ranking orders a pair as the gold score does (pairs with distinct gold); nan
  when the records carry no gold scores."""
  agree = total = 0
  for r in recs:
    gold = r.get('gold')
    if not gold:
      return float('nan')
    pos = {idx: rank for rank, idx in enumerate(r['ranking'])}
    for i in range(len(gold)):
      for j in range(i + 1, len(gold)):
        if gold[i] != gold[j]:
          total += 1
          agree += (gold[i] > gold[j]) == (pos[i] < pos[j])
  return agree / max(total, 1)
