"""The label stage: InstructGPT's labelling step in miniature, writing the rankings a reward model trains on.

For `label.num_prompts` training prompts from `label.prompt_offset` on (0: the first ones; a later round of
iterated RLHF takes fresh ones past the earlier rounds'), sample K responses (K uniform in
[k_min, k_max]) from the `policy` input run (default sft; a later round: the last round's policy) at
`label.temperature`, and let the judge `label.judge` rank them (jax_rlhf/judges.py: task, the task's noisy
labeler, instruct_world: ~73% inter-labeler agreement; rm:RUN, a reward model; lm:PATH, an AI judge under a
constitution). Writes W/<name>/rankings.jsonl, one ranking record per prompt (the ranking schema of
jax_rlhf/data/records.py): {'prompt', 'responses', 'ranking' (indices, best first), 'prefs' (lm: judge only:
P(i beats j), K x K), 'gold' (the task's exact score of each response, when there is a task), 'category'}.
Responses may be empty strings (a sample that is EOS at once).

Prompts: the train split of `label.prompts` when set, else of `data.prompts` (any source with prompts: jsonl:,
hh_rlhf:, tldr_sft:, rankings:, tfds:; a bad record is one line `file:line: what`), else the task's training
prompts. The policy samples each prompt as the other stages read it (through its tokenizer's chat template when
it has one, `data.chat_template`), and the record's 'prompt' is that text, as the RM and DPO read a label run's
rankings; the judge is given the prompt as the source wrote it.

Every process samples every prompt (the policy is process-local, so each computes what one process would);
process 0 writes the file.
"""
from __future__ import annotations

import copy
import os
import time
from typing import Mapping

import jax
import numpy as np
from flax import nnx

from jax_rlhf import judges, sampling
from jax_rlhf.data import batches, records
from jax_rlhf.data import tokenizer as tok_lib
from jax_rlhf.train import checkpoint, common


def prompt_records(config, workdir: str) -> list[dict]:
  """The prompts a label run can take, as their source wrote them: the train split of `label.prompts`, else of
  `data.prompts`, else the task's training prompts. A bad record is a UserError `file:line: what`."""
  if config.label.prompts:
    config = copy.deepcopy(config)
    config.data.prompts = config.label.prompts
  return common.records_for(config, workdir, 'prompts', 'train')


def label_rankings(config, workdir: str, policy_dir: str, judge) -> list[dict]:
  """Sample K responses per prompt from the policy exported in `policy_dir` and rank them with `judge`.

  Random numbers: K per prompt and the judge's noise from one numpy Generator([seed, 1]) (all K first, then
  the rankings in prompt order); the samples under jax.random.key(seed + 1), in calls of `label.batch_size`
  responses (`sampling.sample_responses`). A run at a prompt offset o > 0 (a later round) draws from
  Generator([seed, 1, o]) and fold_in(key(seed + 1), o) instead, so rounds do not share their noise."""
  lc = config.label
  tok = common.load_tokenizer(config)
  every = prompt_records(config, workdir)
  # the task's own prompts: its gold labeler scores the samples (never trained on: agreement measures)
  gold_task = None if lc.prompts or config.data.prompts else common.get_task(config)
  offset = int(lc.prompt_offset)
  if offset < 0 or (offset and offset + lc.num_prompts > len(every)):
    more = 'raise task.n_prompts_train' if gold_task else 'lower round_prompts or label.num_prompts'
    raise common.UserError(f'label.prompt_offset={offset} with label.num_prompts={lc.num_prompts} needs '
                           f'{offset + lc.num_prompts} training prompts; there are {len(every)} ({more})')
  raw = every[offset:offset + lc.num_prompts]
  prompts = tok_lib.format_records(tok, raw, config.data.chat_template)  # as the policy reads them
  policy = common.load_lm(os.path.join(policy_dir, 'hf'), config)
  graphdef, state = nnx.split(policy)
  rng = np.random.default_rng([config.seed, 1] + ([offset] if offset else []))
  key = jax.random.key(config.seed + 1)
  if offset:
    key = jax.random.fold_in(key, offset)
  ks = rng.integers(lc.k_min, lc.k_max + 1, size=len(prompts))
  rows = [p for p, k in zip(prompts, ks) for _ in range(k)]
  arrays, _ = batches.prompts(tok, rows, config.data.max_prompt_len)
  texts, _, _ = sampling.sample_responses(graphdef, state, tok, arrays, key,
                                          batch_size=lc.batch_size, max_new_tokens=config.data.max_response_len,
                                          temperature=lc.temperature)
  groups, i = [], 0
  for k in ks:
    groups.append(list(texts[i:i + k]))
    i += k
  ranked = judge([p['prompt'] for p in raw], groups, rng)
  recs = []
  for p, q, responses, r in zip(prompts, raw, groups, ranked):
    rec = {'prompt': p['prompt'], 'responses': responses, **r}
    if gold_task is not None:
      rec['gold'] = [gold_task.gold_score(q['prompt'], x) for x in responses]
      rec['category'] = gold_task.category(q['prompt'])
    recs.append(rec)
  return recs


def run(config, workdir: str, name: str = 'label', inputs: Mapping[str, str] | None = None) -> dict:
  """Labels samples of the `policy` input run (default sft) into W/<name>/rankings.jsonl."""
  inputs = {'policy': 'sft', **(inputs or {})}
  out = common.stage_dir(workdir, name)
  policy_dir = common.require_stage(workdir, inputs['policy'], name)
  judge = judges.get_judge(config, workdir, name)
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
             'responses': sum(len(r['responses']) for r in recs), 'prompt_offset': int(lc.prompt_offset),
             'pairs': sum(len(r['responses']) * (len(r['responses']) - 1) // 2 for r in recs),
             'label_seconds': seconds,
             'label_vs_gold_accuracy': common.labeler_agreement(recs)}
  if isinstance(judge, judges.LMJudge):  # the model folder it read, and how many of its texts had to be cut
    summary.update(judge_folder=judge.path, judge_texts_shortened=judge.shortened, judge_texts_cut=judge.cut)
  checkpoint.mark_done(out, summary)
  print(f'[{name}] done: {len(recs)} prompts, {summary["responses"]} responses of {inputs["policy"]} ranked by '
        f'{lc.judge}; wrote {os.path.join(out, common.RANKINGS)}')
  return summary
