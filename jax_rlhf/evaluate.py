"""The eval stage: the labeler judges SFT and PPO samples on held-out prompts, as InstructGPT's labelers did.

Inputs: the `reference` run (default sft: the KL's reference, the best-of-n sampler and the win rate's
baseline) and the `reward` run (default rm). For each compared model (`eval.models`, runs of the workdir with
an HF export) on the held-out prompts:
  gold_score        mean labeler score of one sample per prompt (the task's gold score; never seen in training)
  per_category      the same per category (helpful / honest / harmless)
  per_subcategory   share of exact answers per subcategory (reverse, sort, ..., known, unknown, unsafe):
                    `exact_rates`, the task's verifier where it checks, else a full gold score
  rm_score          the reward model's score of those samples (what PPO optimised)
  kl_to_ref         sum over response tokens of log pi(y_t) - log pi_ref(y_t), mean over prompts (nats)
  lm_loss_pretrain  token loss on held-out pretraining text (the alignment tax when it rises)
  win_rate_vs_sft   P(gold(model) > gold(SFT)) per prompt, ties counting half, with a 95% interval
With `eval.rounds` (iterated RLHF, variant rounds=N), each round's policy is compared as model round<r>, and
results.json's `rounds` holds per round its gold, win vs SFT, win vs the previous round's policy (head to head,
the direct test of a rise), its own RM's score, the labels used so far and
the new and old RM's agreement with the gold labeler on the samples of the policy that round labelled
(`round_measures`); `win_rate_ceiling` is the win rate of a policy that is always right.
and `best_of_n`: the reward model picks the best of n SFT samples (`eval.best_of_n`). It is the RM's ceiling:
what optimising it buys without any policy training, at KL <= log n - (n-1)/n, against the oracle (the best
gold among the n). When best-of-n gold stops rising (or falls) with n, the RM is the bottleneck, not PPO.
The policy snapshots a PPO run kept (W/<run>/snapshots/<iteration>) get gold, RM score and KL on the first
`eval.n_snapshot_prompts` held-out prompts (the over-optimisation curve; SFT is iteration 0).
On real data (`data.prompts` set) there is no labeler: the RM judges the win rate, the gold columns are empty,
and the alignment tax is measured only when `data.pretrain` gives text; best-of-n and the curve need a labeler.
Every process computes every figure with process-local models (the same as one process); process 0 writes
W/<name>/results.json and W/eval/samples.jsonl, prints the table, and writes the report
(W/eval/report.md, report.html, plots/*.png; jax_rlhf/report.py) from those files.
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_rlhf import benchmarks
from jax_rlhf import metrics as metrics_lib
from jax_rlhf.data import batches
from jax_rlhf.models import hf, scoring
from jax_rlhf.sampling import sample_responses
from jax_rlhf.train import checkpoint, common, lm


def win_rate(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
  """P(a > b) with ties counted half, and a 95% normal interval over prompts: (rate, low, high)."""
  outcome = np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))
  n = len(outcome)
  rate = float(outcome.mean())
  half = 1.96 * float(outcome.std(ddof=1)) / math.sqrt(n) if n > 1 else float('nan')
  return rate, max(rate - half, 0.0), min(rate + half, 1.0)


def exact_rates(prompts, responses, gold: np.ndarray, subcategories, task) -> dict[str, float]:
  """Share of exact answers per subcategory (reverse, sort, ..., known, unknown, safe, unsafe): exact is the
  task's verifier where it can check (`task.verify` 1.0), else the labeler's full score (gold == 1.0: the known
  fact, "i don't know" to an unknown creature, the refusal of an unsafe request)."""
  hits: dict[str, list[float]] = {}
  for p, r, g, s in zip(prompts, responses, gold, subcategories):
    v = task.verify(p, r)
    hits.setdefault(s, []).append(float(v == 1.0) if v is not None else float(g >= 1.0))
  return {s: float(np.mean(h)) for s, h in sorted(hits.items())}


def best_of_n(rm_scores: np.ndarray, gold: np.ndarray, sft_gold: np.ndarray, ns, categories=None) -> dict:
  """Best-of-n among the first n of N samples per prompt, picked by the reward model.

  rm_scores, gold: [P, N] for N independent SFT samples per prompt; sft_gold: [P], the gold of the one SFT
  sample the models are compared with. Per n: the gold and RM score of the RM's pick (first index on ties),
  per-category gold (when `categories` [P] is given), the oracle's gold (best of the n), the win rate vs SFT
  (ties half, 95% interval), and `kl_bound` = log n - (n-1)/n, the KL of best-of-n to the sampling policy
  (exact when the n samples are distinct; Stiennon et al. 2020).
  """
  rows = np.arange(len(gold))
  out = {}
  for n in ns:
    pick = np.argmax(rm_scores[:, :n], axis=1)
    g = gold[rows, pick]
    rate, lo, hi = win_rate(g, sft_gold)
    out[str(n)] = {'gold_score': float(g.mean()), 'rm_score': float(rm_scores[rows, pick].mean()),
                   'oracle_gold': float(gold[:, :n].max(1).mean()), 'win_rate_vs_sft': rate,
                   'win_rate_vs_sft_ci95': [lo, hi], 'kl_bound': math.log(n) - (n - 1) / n}
    if categories is not None:
      cats = np.asarray(categories)
      out[str(n)]['per_category'] = {c: float(g[cats == c].mean()) for c in sorted(set(categories))}
  return out


def format_best_of_n(table: dict) -> str:
  lines = ['best-of-n of SFT samples by the RM | gold  | oracle | win vs SFT (95% CI)  | RM score | KL bound',
           '-----------------------------------|-------|--------|----------------------|----------|---------']
  for n, r in table.items():
    lo, hi = r['win_rate_vs_sft_ci95']
    lines.append(f'n = {n:<30} | {r["gold_score"]:.3f} | {r["oracle_gold"]:.3f}  | '
                 f'{r["win_rate_vs_sft"]:.3f} [{lo:.3f}, {hi:.3f}] | {r["rm_score"]:+.3f}   | {r["kl_bound"]:.3f}')
  return '\n'.join(lines)


def _kl_fn(graphdef):
  """Sum over response tokens of logp - logp_ref (k1), per row: [B]."""
  def f(state, ref_state, seq, att, n_new, temperature):
    prompt_len = seq.shape[1] - n_new
    logp, _ = scoring.response_logprobs(nnx.merge(graphdef, state), seq, att, prompt_len, temperature)
    ref_logp, _ = scoring.response_logprobs(nnx.merge(graphdef, ref_state), seq, att, prompt_len, temperature)
    mask = att[:, prompt_len:].astype(jnp.float32)
    return jnp.sum((logp - ref_logp) * mask, axis=1)
  return jax.jit(f, static_argnums=(4, 5))


def _lm_loss_fn(graphdef):
  return jax.jit(lambda st, b: lm.lm_loss(nnx.merge(graphdef, st), b))


def run(config, workdir: str, name: str = 'eval', inputs: Mapping[str, str] | None = None) -> dict:
  """Evaluates `eval.models` against the `reference` run (default sft) with the `reward` run (default rm)."""
  inputs = {'reference': 'sft', 'reward': 'rm', **(inputs or {})}
  ec = config.eval
  out = common.stage_dir(workdir, name)
  if checkpoint.is_done(out):
    print(f'[{name}] already complete in {out}; skipping (delete {out} to evaluate again)')
    with open(os.path.join(out, 'results.json')) as f:
      done = json.load(f)
    print(format_table(done['models'], done['categories']))
    if benchmarks.format_table(done['models']):  # TruthfulQA / toxicity / lm-eval, when measured
      print(benchmarks.format_table(done['models']))
    _write_report(config, workdir, name)
    return done['models']
  # ---- benchmarks (jax_rlhf/benchmarks/): their files are read first, so a bad one stops the stage at once
  bench = benchmarks.Benchmarks(config) if benchmarks.enabled(ec) else None
  sft_dir = common.require_stage(workdir, inputs['reference'], name)
  rm_dir = common.require_stage(workdir, inputs['reward'], name)
  model_dirs = {m: common.require_stage(workdir, m, name) for m in ec.models}
  rounds = parse_rounds(ec.rounds)
  for r, rnd in enumerate(rounds, 1):  # iterated RLHF: each round's policy is compared as round<r>
    model_dirs[f'round{r}'] = common.require_stage(workdir, rnd['policy'], name)
    for role in ('rm', 'label'):
      common.require_stage(workdir, rnd[role], name)
  if any(int(n) < 1 for n in ec.best_of_n):
    raise common.UserError(f'eval.best_of_n must hold positive sample counts, got {tuple(ec.best_of_n)}')
  tok = common.load_tokenizer(config)
  # The task's labeler judges (gold score) when the prompts are the task's; on real data the RM judges.
  world = common.get_task(config) if not config.data.prompts else None
  prompt_recs = common.records_for(config, workdir, 'prompts', 'eval', tok)
  if ec.max_prompts:
    prompt_recs = prompt_recs[:ec.max_prompts]
  prompt_arrays, _ = batches.prompts(tok, prompt_recs, config.data.max_prompt_len)
  pre = None
  if common.has_source(config, 'pretrain'):
    texts = [r['text'] for r in common.records_for(config, workdir, 'pretrain', 'eval')][:ec.n_pretrain_eval]
    pre = batches.texts(tok, texts, config.data.seq_len)
  kw = common.model_kw(config)
  ref = hf.load_pretrained(os.path.join(sft_dir, 'hf'), **kw)
  graphdef, ref_state = nnx.split(ref)
  reward = hf.load_scalar_model(os.path.join(rm_dir, 'hf'), **kw)
  score_fn = jax.jit(lambda m, t, a: m.score(t, a))
  kl_fn = _kl_fn(graphdef)
  loss_fn = _lm_loss_fn(graphdef)
  temperature = scoring.effective_temperature(ec.temperature)
  n_new = ec.max_new_tokens
  categories = sorted({r.get('category') or world.category(r['prompt']) for r in prompt_recs}) if world else []
  cats = [r.get('category') or world.category(r['prompt']) for r in prompt_recs] if world else []
  subcats = [r.get('subcategory') or world.subcategory(r['prompt']) for r in prompt_recs] if world else []

  def evaluate(state, n=None):
    """One sample per held-out prompt (the first n): texts, gold, RM scores, KL, response tokens and mask."""
    arrays = {k: v[:n] for k, v in prompt_arrays.items()}
    # Every model sees the same sampling keys: differences come from the models.
    texts_out, toks, masks = _sample(graphdef, state, tok, arrays, ec, config.seed)
    bs = min(ec.batch_size, len(toks))
    gold = np.array([world.gold_score(r['prompt'], t) for r, t in zip(prompt_recs, texts_out)]) if world else None
    seq = np.concatenate([arrays['prompt'], toks], 1)
    att = np.concatenate([arrays['prompt_mask'], masks], 1)
    rm_scores, kls = [], []
    for s in range(0, len(seq), bs):
      rm_scores.append(np.asarray(score_fn(reward, seq[s:s + bs], att[s:s + bs])))
      kls.append(np.asarray(kl_fn(state, ref_state, seq[s:s + bs], att[s:s + bs], n_new, temperature)))
    return texts_out, gold, np.concatenate(rm_scores), np.concatenate(kls), toks, masks

  run_name = name
  results, golds, samples, curves = {}, {}, {m: [] for m in model_dirs}, {}
  kept = {}  # round<r> -> its samples' (seq, att): scored again by the round's own RM
  sft_point = None
  for name, d in model_dirs.items():
    model = hf.load_pretrained(os.path.join(d, 'hf'), **kw)
    _, state = nnx.split(model)
    texts_out, gold, rm_scores, kls, toks, masks = evaluate(state)
    lm_sum = lm_n = 0.0
    for s in range(0, len(pre['tokens']) if pre else 0, ec.batch_size):
      loss, n = loss_fn(state, {k: v[s:s + ec.batch_size] for k, v in pre.items()})
      lm_sum += float(loss) * float(n)
      lm_n += float(n)
    has_eos = ((toks == tok.eos_token_id) & (masks > 0)).any(1)
    results[name] = {
        'gold_score': float(gold.mean()) if world else None,
        'rm_score': float(rm_scores.mean()),
        'per_category': {c: float(gold[[x == c for x in cats]].mean()) for c in categories},
        'per_subcategory': (exact_rates([r['prompt'] for r in prompt_recs], texts_out, gold, subcats, world)
                            if world else {}),
        'kl_to_ref': float(kls.mean()),
        'lm_loss_pretrain': lm_sum / lm_n if lm_n else None,
        'response_length': float(masks.sum(1).mean()),
        'eos_fraction': float(has_eos.mean()),
        'n_prompts': len(prompt_recs),
    }
    if bench:  # TruthfulQA / toxicity / lm-eval of this model
      results[name].update(bench(model, tok))
    golds[name] = gold if world else rm_scores  # the judge of the win rate
    if name.startswith('round') and rounds:
      results[name]['run'] = rounds[int(name[5:]) - 1]['policy']
      kept[name] = (np.concatenate([prompt_arrays['prompt'], toks], 1),
                    np.concatenate([prompt_arrays['prompt_mask'], masks], 1))
    samples[name] = [{'response': t, 'gold': float(g) if world else None, 'rm': float(r)}
                     for t, g, r in zip(texts_out, golds[name], rm_scores)]
    snap_dir = os.path.join(d, 'snapshots')
    snaps = sorted(int(x) for x in os.listdir(snap_dir) if x.isdigit()) if os.path.isdir(snap_dir) else []
    # the over-optimisation curve: SFT (iteration 0, KL 0) and each snapshot, on the first prompts
    if snaps and world and ec.n_snapshot_prompts > 0:
      n_snap = min(ec.n_snapshot_prompts, len(prompt_recs))
      points = []
      for it in [0, *snaps]:
        if it == 0 and sft_point:
          points.append(sft_point)
          continue
        st = ref_state if it == 0 else nnx.split(hf.load_pretrained(os.path.join(snap_dir, str(it)), **kw))[1]
        _, g, r, k, _, _ = evaluate(st, n_snap)
        points.append({'iteration': it, 'gold_score': float(g.mean()), 'rm_score': float(r.mean()),
                       'kl_to_ref': float(k.mean())})
      sft_point = points[0]  # the same for every run
      curves[name] = {'n_prompts': n_snap, 'points': points}
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
  benchmarks.add_alignment_tax(results)
  extra = {}
  if ec.best_of_n and 'sft' in golds and world:
    bon_scores, bon_gold = _best_of_n_samples(graphdef, ref_state, reward, score_fn, world, tok, prompt_recs,
                                              prompt_arrays, ec, max(int(n) for n in ec.best_of_n), config.seed)
    extra['best_of_n'] = best_of_n(bon_scores, bon_gold, golds['sft'], [int(n) for n in ec.best_of_n], cats)

  if rounds:
    extra['rounds'] = round_measures(config, workdir, rounds, results, golds, kept, graphdef, score_fn, world,
                                     tok, prompt_recs, prompt_arrays, cats)
    if world and 'sft' in golds:  # a policy always right ties the SFT sample where it is exact already
      extra['win_rate_ceiling'] = win_rate(np.maximum(golds['sft'], 1.0), golds['sft'])[0]
  common.write_json(os.path.join(out, 'results.json'), {'models': results, 'temperature': ec.temperature,
                                                        'categories': categories, 'overoptimisation': curves,
                                                        'machine': _machine(), **extra})
  if jax.process_index() == 0:
    with open(os.path.join(out, 'samples.jsonl'), 'w') as f:
      for i, r in enumerate(prompt_recs):
        f.write(json.dumps({'prompt': r['prompt'], 'category': r.get('category'),
                            **{name: samples[name][i] for name in samples}}) + '\n')
  checkpoint.mark_done(out, {'stage': 'eval', 'run': run_name, 'models': list(results)})
  print(format_table(results, categories))
  if world:
    from jax_rlhf import report
    print(report.text_table(*report.fmt_subcategory_table({'models': results})))
  if bench:
    print(benchmarks.format_table(results))
  if extra.get('best_of_n'):
    print(format_best_of_n(extra['best_of_n']))
  if extra.get('rounds'):
    from jax_rlhf import report
    print(report.text_table(*report.fmt_rounds_table({'models': results, **extra})))
  _write_report(config, workdir, run_name)
  return results


def _best_of_n_samples(graphdef, sft_state, reward, score_fn, world, tok, prompt_recs, prompt_arrays, ec, n, seed):
  """n fresh SFT samples per prompt (keys apart from the compared samples'): RM scores and gold, [P, n] each."""
  rep = {k: np.repeat(v, n, axis=0) for k, v in prompt_arrays.items()}
  texts, toks, masks = sample_responses(graphdef, sft_state, tok, rep, jax.random.key(seed + 13),
                                        batch_size=ec.batch_size, max_new_tokens=ec.max_new_tokens,
                                        temperature=ec.temperature)
  seq = np.concatenate([rep['prompt'], toks], 1)
  att = np.concatenate([rep['prompt_mask'], masks], 1)
  scores = np.concatenate([np.asarray(score_fn(reward, seq[s:s + ec.batch_size], att[s:s + ec.batch_size]))
                           for s in range(0, len(seq), ec.batch_size)])
  prompts = [r['prompt'] for r in prompt_recs for _ in range(n)]
  gold = np.array([world.gold_score(p, t) for p, t in zip(prompts, texts)])
  return scores.reshape(-1, n), gold.reshape(-1, n)


def parse_rounds(spec) -> list[dict]:
  """eval.rounds ('policy:rm:label' per round) as [{'policy', 'rm', 'label'}]; a bad entry is a UserError."""
  out = []
  for entry in spec:
    parts = str(entry).split(':')
    if len(parts) != 3 or not all(parts):
      raise common.UserError(f"eval.rounds: {entry!r} is not 'policy:rm:label' (the runs of one round)")
    out.append(dict(zip(('policy', 'rm', 'label'), parts)))
  return out


def gold_agreement(scores: np.ndarray, gold: np.ndarray) -> tuple[float, int]:
  """How often a scorer orders two samples of the same prompt as the gold labeler does: over the pairs with
  different gold scores, the share with the scores strictly in gold's order (a tie is wrong, as in the RM's
  accuracy). scores, gold: [P, n]. Returns (agreement, pairs); nan without such pairs."""
  right = total = 0
  n = gold.shape[1]
  for i in range(n):
    for j in range(i + 1, n):
      differ = gold[:, i] != gold[:, j]
      right += int(np.sum(differ & ((scores[:, i] - scores[:, j]) * (gold[:, i] - gold[:, j]) > 0)))
      total += int(np.sum(differ))
  return (right / total if total else float('nan')), total


def round_measures(config, workdir, rounds, results, golds, kept, graphdef, score_fn, world, tok, prompt_recs,
                   prompt_arrays, cats) -> list[dict]:
  """Per round r of iterated RLHF: the round's policy (model round<r>: gold, win vs SFT, win vs round r-1's
  policy head to head on the same held-out prompts, its own RM's score of its samples), the labels used so far
  (ranked prompts, responses and pairs of label runs 1..r), and how stale the reward models are: on
  `eval.round_samples` fresh samples per held-out prompt of the policy the round's label run sampled (round
  r-1's policy; SFT in round 1), the share of pairs the new RM (rm_r) and the old RM (rm_{r-1}) order as the
  gold labeler does. Without a task (no gold) only the first two."""
  ec = config.eval
  kw = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype)
  n = int(ec.round_samples)
  rep = {k: np.repeat(v, n, axis=0) for k, v in prompt_arrays.items()}
  prompts = [r['prompt'] for r in prompt_recs for _ in range(n)]
  cats_rep = np.asarray(cats)
  bs = ec.batch_size
  rms, out, used = {}, [], {'prompts': 0, 'responses': 0, 'pairs': 0}

  def rm(run):
    if run not in rms:
      rms[run] = hf.load_scalar_model(os.path.join(common.stage_dir(workdir, run), 'hf'), **kw)
    return rms[run]

  def scores(model, seq, att):
    return np.concatenate([np.asarray(score_fn(model, seq[s:s + bs], att[s:s + bs])) for s in range(0, len(seq), bs)])

  for r, rnd in enumerate(rounds, 1):
    with open(os.path.join(common.stage_dir(workdir, rnd['label']), 'DONE')) as f:
      lab = json.load(f)
    recs = common.read_rankings(workdir, rnd['label'], 'eval')
    used['prompts'] += len(recs)
    used['responses'] += sum(len(x['responses']) for x in recs)
    used['pairs'] += sum(len(x['responses']) * (len(x['responses']) - 1) // 2 for x in recs)
    name = f'round{r}'
    m = results[name]
    seq, att = kept[name]
    row = {'round': r, 'model': name, **rnd, 'sampled_from': lab.get('policy'), 'judge': lab.get('judge'),
           'gold_score': m['gold_score'], 'per_category': m['per_category'], 'kl_to_ref': m['kl_to_ref'],
           'win_rate_vs_sft': m.get('win_rate_vs_sft'), 'win_rate_vs_sft_ci95': m.get('win_rate_vs_sft_ci95'),
           'rm_score_own': float(scores(rm(rnd['rm']), seq, att).mean()),
           'labels_used': dict(used), 'label_prompts': len(recs)}
    if world and lab.get('policy'):
      d = common.require_stage(workdir, lab['policy'], 'eval')
      _, st = nnx.split(hf.load_pretrained(os.path.join(d, 'hf'), **kw))
      texts, toks, masks = sample_responses(graphdef, st, tok, rep, jax.random.key(config.seed + 17 + r),
                                            batch_size=bs, max_new_tokens=ec.max_new_tokens,
                                            temperature=ec.temperature)
      gold = np.array([world.gold_score(p, t) for p, t in zip(prompts, texts)]).reshape(-1, n)
      s_seq = np.concatenate([rep['prompt'], toks], 1)
      s_att = np.concatenate([rep['prompt_mask'], masks], 1)
      new = scores(rm(rnd['rm']), s_seq, s_att).reshape(-1, n)
      row['rm_agreement_new'], row['agreement_pairs'] = gold_agreement(new, gold)
      row['rm_agreement_new_per_category'] = {c: gold_agreement(new[cats_rep == c], gold[cats_rep == c])[0]
                                              for c in sorted(set(cats))}
      if r > 1:
        old = scores(rm(rounds[r - 2]['rm']), s_seq, s_att).reshape(-1, n)
        row['rm_agreement_old'] = gold_agreement(old, gold)[0]
        row['rm_agreement_old_per_category'] = {c: gold_agreement(old[cats_rep == c], gold[cats_rep == c])[0]
                                                for c in sorted(set(cats))}
    if r > 1 and world:  # head to head on the same held-out prompts: did this round beat the last?
      rate, lo, hi = win_rate(golds[name], golds[f'round{r - 1}'])
      row['win_rate_vs_previous'], row['win_rate_vs_previous_ci95'] = rate, [lo, hi]
    out.append(row)
  return out


def _write_report(config, workdir: str, name: str) -> None:
  if jax.process_index() == 0:
    from jax_rlhf import report
    path = report.write(workdir, n_samples=config.eval.report_samples, name=name)
    print(f'[{name}] report: {path}')


def _machine() -> str:
  """Where the eval ran, in words: the accelerator (or CPU cores and model) and the host."""
  import platform
  dev = jax.devices()[0]
  if dev.platform == 'cpu':
    model = metrics_lib.cpu_model()
    what = f'{os.cpu_count()} CPU cores' + (f' ({model})' if model else '')
  else:
    what = f'{jax.device_count()} x {dev.device_kind}'
  return f'{what}, {platform.machine()} {platform.system()}, jax {jax.__version__}'


def _sample(graphdef, state, tok, prompt_arrays, ec, seed):
  return sample_responses(graphdef, state, tok, prompt_arrays, jax.random.key(seed + 11),
                          batch_size=min(ec.batch_size, len(prompt_arrays['prompt'])),
                          max_new_tokens=ec.max_new_tokens, temperature=ec.temperature)


def format_table(results: dict, categories: list[str]) -> str:
  """The results table as fixed-width text (the cells of `report.results_table`, as report.md shows them)."""
  from jax_rlhf import report
  return report.text_table(*report.results_table({'models': results, 'categories': categories}))
