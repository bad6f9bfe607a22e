"""The label stage: InstructGPT's labelling step in miniature, writing the rankings a reward model trains on.

For each of the first `label.num_prompts` training prompts of the task, sample K responses (K uniform in
[k_min, k_max]) from the `policy` input run (default sft) at `label.temperature`, and let the judge
`label.judge` rank them. Judges: `task`, the task's noisy labeler (instruct_world: ~73% inter-labeler
agreement). Writes W/<name>/rankings.jsonl, one ranking record per prompt (the ranking schema of
jax_rlhf/data/records.py): {'prompt', 'responses', 'ranking' (indices, best first), 'gold' (the task's exact
score of each response), 'category'}. Responses may be empty strings (a sample that is EOS at once).

Every process samples every prompt (the policy is process-local, so each computes what one process would);
process 0 writes the file.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from jax_rlhf import sampling
from jax_rlhf.data import batches, records
from jax_rlhf.train import checkpoint, common

def task_judge(config) -> Callable[[str, Sequence[str], np.random.Generator], dict]:
  """The task's labeler as a judge: (prompt, responses, rng) -> {'ranking', 'gold', 'category'}."""
  task = common.get_task(config)
  if task is None:
    raise common.UserError('label.judge=task needs an embedded task (task.name is empty)')

  def judge(prompt, responses, rng):
    return {'ranking': task.rank(prompt, responses, rng), 'gold': [task.gold_score(prompt, r) for r in responses],
            'category': task.category(prompt)}
  return judge


JUDGES = {'task': task_judge}


def get_judge(config):
  """The judge `label.judge` names; a UserError naming the known judges for any other name."""
  name = config.label.judge
  if name not in JUDGES:
    raise common.UserError(f'label.judge={name!r} is no judge; judges: {", ".join(sorted(JUDGES))}')
  return JUDGES[name](config)


def label_rankings(config, workdir: str, policy_dir: str, judge) -> list[dict]:
  """Sample K responses per prompt from the policy exported in `policy_dir` and rank them with `judge`.

  Random numbers: K per prompt and the judge's noise from one numpy Generator([seed, 1]) (all K first, then
  the rankings in prompt order); the samples under jax.random.key(seed + 1), in calls of `label.batch_size`
  responses (`sampling.sample_responses`)."""
  lc = config.label
  tok = common.load_tokenizer(config)
  files = common.task_files(config, workdir)
  prompts = common.read(config, files['prompts_train'], 'prompt')[:lc.num_prompts]
  policy = common.load_lm(os.path.join(policy_dir, 'hf'), config)
  graphdef, state = nnx.split(policy)
  rng = np.random.default_rng([config.seed, 1])
  ks = rng.integers(lc.k_min, lc.k_max + 1, size=len(prompts))
  rows = [p for p, k in zip(prompts, ks) for _ in range(k)]
  arrays, _ = batches.prompts(tok, rows, config.data.max_prompt_len)
  texts, _, _ = sampling.sample_responses(graphdef, state, tok, arrays, jax.random.key(config.seed + 1),
                                          batch_size=lc.batch_size, max_new_tokens=config.data.max_response_len,
                                          temperature=lc.temperature)
  recs, i = [], 0
  for p, k in zip(prompts, ks):
    responses = texts[i:i + k]
    i += k
    recs.append({'prompt': p['prompt'], 'responses': responses, **judge(p['prompt'], responses, rng)})
  return recs


def run(config, workdir: str, name: str = 'label', inputs: Mapping[str, str] | None = None) -> dict:
  """Labels samples of the `policy` input run (default sft) into W/<name>/rankings.jsonl."""
  inputs = {'policy': 'sft', **(inputs or {})}
  out = common.stage_dir(workdir, name)
  policy_dir = common.require_stage(workdir, inputs['policy'], name)
  judge = get_judge(config)
  lc = config.label
  if not 1 <= lc.k_min <= lc.k_max:
    raise common.UserError(f'label: need 1 <= k_min <= k_max, got k_min={lc.k_min}, k_max={lc.k_max}')
  t0 = time.perf_counter()
  recs = label_rankings(config, workdir, policy_dir, judge)
  seconds = time.perf_counter() - t0
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, common.RANKINGS)
    records.write_jsonl(path + '.tmp', recs)
    os.replace(path + '.tmp', path)
  summary = {'stage': 'label', 'run': name, 'policy': inputs['policy'], 'judge': lc.judge, 'rankings': len(recs),
             'responses': sum(len(r['responses']) for r in recs), 'label_seconds': seconds,
             'label_vs_gold_accuracy': common.labeler_agreement(recs)}
  checkpoint.mark_done(out, summary)
  print(f'[{name}] done: {len(recs)} prompts, {summary["responses"]} responses of {inputs["policy"]} ranked by '
        f'{lc.judge}; wrote {os.path.join(out, common.RANKINGS)}')
  return summary
