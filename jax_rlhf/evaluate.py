"""The eval stage: the labeler judges SFT and PPO samples on held-out prompts, as InstructGPT's labelers did.

For each compared model (`eval.models`, workdir subfolders with an HF export) on the held-out prompts:
  gold_score        mean labeler score of one sample per prompt (the task's gold score; never seen in training)
  per_category      the same per category (helpful / honest / harmless)
  rm_score          the reward model's score of those samples (what PPO optimised)
  kl_to_ref         sum over response tokens of log pi(y_t) - log pi_ref(y_t), mean over prompts (nats)
  lm_loss_pretrain  token loss on held-out pretraining text (the alignment tax when it rises)
  win_rate_vs_sft   P(gold(model) > gold(SFT)) per prompt, ties counting half, with a 95% interval
On real data (`data.prompts` set) there is no labeler: the RM judges the win rate, the gold columns are empty,
and the alignment tax is measured only when `data.pretrain` gives text.
Writes W/eval/results.json and W/eval/samples.jsonl, and prints the table.
"""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_rlhf import rl
from jax_rlhf.data import batches
from jax_rlhf.models import hf
from jax_rlhf.train import checkpoint, common, lm
from jax_rlhf.train.rm import sample_responses


def win_rate(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
  """P(a > b) with ties counted half, and a 95% normal interval over prompts: (rate, low, high)."""
  outcome = np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))
  n = len(outcome)
  rate = float(outcome.mean())
  half = 1.96 * float(outcome.std(ddof=1)) / math.sqrt(n) if n > 1 else float('nan')
  return rate, max(rate - half, 0.0), min(rate + half, 1.0)


def _kl_fn(graphdef):
  """Sum over response tokens of logp - logp_ref (k1), per row: [B]."""
  def f(state, ref_state, seq, att, n_new, temperature):
    out = []
    for st in (state, ref_state):
      model = nnx.merge(graphdef, st)
      h, _ = model.hidden_states(seq[:, :-1], att[:, :-1])
      logits = model.logits(h[:, -n_new:]) / temperature
      out.append(rl.logprobs_from_logits(logits, seq[:, -n_new:]))
    mask = att[:, -n_new:].astype(jnp.float32)
    return jnp.sum((out[0] - out[1]) * mask, axis=1)
  return jax.jit(f, static_argnums=(4, 5))


def _lm_loss_fn(graphdef):
  return jax.jit(lambda st, b: lm.lm_loss(nnx.merge(graphdef, st), b))


def run(config, workdir: str) -> dict:
  ec = config.eval
  out = common.stage_dir(workdir, 'eval')
  if checkpoint.is_done(out):
    print(f'[eval] already complete in {out}; skipping (delete {out} to evaluate again)')
    with open(os.path.join(out, 'results.json')) as f:
      done = json.load(f)
    print(format_table(done['models'], done['categories']))
    return done['models']
  sft_dir = common.require_stage(workdir, 'sft', 'eval')
  rm_dir = common.require_stage(workdir, 'rm', 'eval')
  model_dirs = {name: common.require_stage(workdir, name, 'eval') for name in ec.models}
  tok = common.load_tokenizer(config)
  # The task's labeler judges (gold score) when the prompts are the task's; on real data the RM judges.
  world = common.world(config) if not config.data.prompts and config.task.name == 'instruct_world' else None
  prompt_recs = common.records_for(config, workdir, 'prompts', 'eval', tok)
  if ec.max_prompts:
    prompt_recs = prompt_recs[:ec.max_prompts]
  prompt_arrays, _ = batches.prompts(tok, prompt_recs, config.data.max_prompt_len)
  pre = None
  if common.has_source(config, 'pretrain'):
    texts = [r['text'] for r in common.records_for(config, workdir, 'pretrain', 'eval')][:ec.n_pretrain_eval]
    pre = batches.texts(tok, texts, config.data.seq_len)
  kw = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype)
  ref = hf.load_pretrained(os.path.join(sft_dir, 'hf'), **kw)
  graphdef, ref_state = nnx.split(ref)
  reward = hf.load_scalar_model(os.path.join(rm_dir, 'hf'), **kw)
  score_fn = jax.jit(lambda m, t, a: m.score(t, a))
  kl_fn = _kl_fn(graphdef)
  loss_fn = _lm_loss_fn(graphdef)
  temperature = ec.temperature if ec.temperature > 0 else 1.0
  n_new = ec.max_new_tokens
  categories = sorted({r.get('category') or world.category(r['prompt']) for r in prompt_recs}) if world else []

  results, golds, samples = {}, {}, {name: [] for name in model_dirs}
  for name, d in model_dirs.items():
    model = hf.load_pretrained(os.path.join(d, 'hf'), **kw)
    _, state = nnx.split(model)
    # Every model sees the same sampling keys: differences come from the models.
    texts_out, toks, masks = _sample(graphdef, state, tok, prompt_arrays, ec, config.seed)
    gold = np.array([world.gold_score(r['prompt'], t) for r, t in zip(prompt_recs, texts_out)]) if world else None
    seq = np.concatenate([prompt_arrays['prompt'], toks], 1)
    att = np.concatenate([prompt_arrays['prompt_mask'], masks], 1)
    rm_scores, kls = [], []
    for s in range(0, len(seq), ec.batch_size):
      rm_scores.append(np.asarray(score_fn(reward, seq[s:s + ec.batch_size], att[s:s + ec.batch_size])))
      kls.append(np.asarray(kl_fn(state, ref_state, seq[s:s + ec.batch_size], att[s:s + ec.batch_size],
                                  n_new, temperature)))
    rm_scores, kls = np.concatenate(rm_scores), np.concatenate(kls)
    lm_sum = lm_n = 0.0
    for s in range(0, len(pre['tokens']) if pre else 0, ec.batch_size):
      loss, n = loss_fn(state, {k: v[s:s + ec.batch_size] for k, v in pre.items()})
      lm_sum += float(loss) * float(n)
      lm_n += float(n)
    cats = [r.get('category') or world.category(r['prompt']) for r in prompt_recs] if world else []
    has_eos = ((toks == tok.eos_token_id) & (masks > 0)).any(1)
    results[name] = {
        'gold_score': float(gold.mean()) if world else None,
        'rm_score': float(rm_scores.mean()),
        'per_category': {c: float(gold[[x == c for x in cats]].mean()) for c in categories},
        'kl_to_ref': float(kls.mean()),
        'lm_loss_pretrain': lm_sum / lm_n if lm_n else None,
        'response_length': float(masks.sum(1).mean()),
        'eos_fraction': float(has_eos.mean()),
        'n_prompts': len(prompt_recs),
    }
    golds[name] = gold if world else rm_scores  # the judge of the win rate
    samples[name] = [{'response': t, 'gold': float(g) if world else None, 'rm': float(r)}
                     for t, g, r in zip(texts_out, golds[name], rm_scores)]
  if 'sft' in golds:
    for name in golds:
      if name != 'sft':
        rate, lo, hi = win_rate(golds[name], golds['sft'])
        results[name]['win_rate_vs_sft'] = rate
        results[name]['win_rate_vs_sft_ci95'] = [lo, hi]
        results[name]['win_rate_judge'] = 'gold' if world else 'rm'
  if 'sft' in results and pre:
    for name in results:
      results[name]['alignment_tax'] = results[name]['lm_loss_pretrain'] - results['sft']['lm_loss_pretrain']

  common.write_json(os.path.join(out, 'results.json'), {'models': results, 'temperature': ec.temperature,
                                                        'categories': categories})
  if jax.process_index() == 0:
    with open(os.path.join(out, 'samples.jsonl'), 'w') as f:
      for i, r in enumerate(prompt_recs):
        f.write(json.dumps({'prompt': r['prompt'], 'category': r.get('category'),
                            **{name: samples[name][i] for name in samples}}) + '\n')
  checkpoint.mark_done(out, {'stage': 'eval', 'models': list(results)})
  print(format_table(results, categories))
  return results


def _sample(graphdef, state, tok, prompt_arrays, ec, seed):
  return sample_responses(graphdef, state, tok, prompt_arrays, jax.random.key(seed + 11),
                          batch_size=ec.batch_size, max_new_tokens=ec.max_new_tokens, temperature=ec.temperature)


def format_table(results: dict, categories: list[str]) -> str:
  header = ['model', 'gold', *categories, 'win vs SFT (95% CI)', 'RM score', 'KL to ref', 'LM loss (pretrain)']
  rows = []
  for name, r in results.items():
    gold = '-' if r['gold_score'] is None else f'{r["gold_score"]:.3f}'
    row = [name, gold, *[f'{r["per_category"][c]:.3f}' for c in categories]]
    if 'win_rate_vs_sft' in r:
      lo, hi = r['win_rate_vs_sft_ci95']
      row.append(f'{r["win_rate_vs_sft"]:.3f} [{lo:.3f}, {hi:.3f}]')
    else:
      row.append('-')
    lm = '-' if r['lm_loss_pretrain'] is None else f'{r["lm_loss_pretrain"]:.4f}'
    row += [f'{r["rm_score"]:+.3f}', f'{r["kl_to_ref"]:.3f}', lm]
    rows.append(row)
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
  line = lambda cells: '| ' + ' | '.join(c.ljust(w) for c, w in zip(cells, widths)) + ' |'
  sep = '|' + '|'.join('-' * (w + 2) for w in widths) + '|'
  return '\n'.join([line(header), sep, *[line(r) for r in rows]])
