"""The run's report: W/eval/report.md, a self-contained W/eval/report.html and W/eval/plots/*.png.

Every number comes from W/eval/results.json and W/eval/samples.jsonl (written by the eval stage), the curves
from W/<stage>/metrics.jsonl. The eval stage calls `write`; to regenerate the report of a finished run:

  python -m jax_rlhf.report --workdir W

Plots (matplotlib, Agg backend):
  training_<stage>.png  loss / accuracy / PPO score, KL, beta, clip fraction, response length against steps
                        (the PPO runs of an ablation overlaid in training_ppo.png); a panel whose every
                        curve is constant (beta when the KL coefficient is fixed) is left out
  overoptimisation.png  gold and RM score against KL to the reference, for the policy snapshots along PPO
  alignment_tax.png     the rise of held-out pretraining LM loss over SFT, and the gold score, per model
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import os
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

# (metric key, split, panel title) per kind of stage.
LM_CURVES = (('loss', 'train', 'train loss'), ('eval_loss', 'eval', 'held-out loss'))
RM_CURVES = (('loss', 'train', 'ranking loss'), ('accuracy', 'train', 'train pair accuracy (all pairs)'),
             ('eval_accuracy_distinct', 'eval', 'held-out pair accuracy, distinct responses'),
             ('eval_gold_accuracy', 'eval', 'held-out agreement with the gold labeler'))
PPO_CURVES = (('score', 'train', 'RM score'), ('kl', 'train', 'KL to reference (nats / episode)'),
              ('beta', 'train', 'beta (KL coefficient)'), ('clipfrac', 'train', 'clip fraction'),
              ('response_length', 'train', 'response length (tokens)'), ('ptx_loss', 'train', 'ptx LM loss'))


def _read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _summary(workdir: str, name: str) -> dict:
  path = os.path.join(workdir, name, 'DONE')
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def ppo_runs(workdir: str, results: dict) -> list[str]:
  """The runs of the compared models that are PPO runs (their DONE says stage ppo), in the results' order (a
  model named for its round, round<r>, stands for its run)."""
  runs = [r.get('run', n) for n, r in results['models'].items()]
  return [n for n in runs if _summary(workdir, n).get('stage') == 'ppo']


def describe(workdir: str, name: str) -> str:
  s = _summary(workdir, name)
  if s.get('stage') != 'ppo':
    return name
  parts = [f'beta {s["kl_coef"]:g}'] if 'kl_coef' in s else []
  if s.get('ptx_coef'):
    parts.append(f'ptx {s["ptx_coef"]:g}')
  return f'{name} ({", ".join(parts)})' if parts else name


# ------------------------------------------------------------------------------------------------ plots
def _curve_figure(runs: dict[str, list[dict]], curves, title: str, path: str) -> bool:
  """One panel per metric some run logged and some run changed; a line per run. False (nothing written) without
  data."""
  def series(key, split):
    return [[r[key] for r in recs if r['split'] == split and key in r] for recs in runs.values()]

  def fixed(key, split):  # every run logged the same value at least twice: a constant (beta of a fixed KL)
    return all(len(v) > 1 and len(set(v)) == 1 for v in series(key, split) if v)

  panels = [c for c in curves if any(series(c[0], c[1])) and not fixed(c[0], c[1])]
  if not panels:
    return False
  cols = min(3, len(panels))
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
  for ax, (key, split, label) in zip(axes.flat, panels):
    for i, (run, recs) in enumerate(runs.items()):  # a run keeps its colour in every panel
      pts = [(r['step'], r[key]) for r in recs if r['split'] == split and key in r]
      if pts:
        ax.plot(*zip(*pts), marker='.' if len(pts) < 30 else None, label=run, color=f'C{i}')
    ax.set_title(label, fontsize=10)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    if len(runs) > 1:
      ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis('off')
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return True


def plot_training(workdir: str, results: dict, out: str) -> dict[str, str]:
  """training_<stage>.png for pretrain, sft, rm and the PPO runs (one figure): {stage: path}."""
  made = {}
  for stage, curves in (('pretrain', LM_CURVES), ('sft', LM_CURVES), ('rm', RM_CURVES)):
    path = os.path.join(workdir, stage, 'metrics.jsonl')
    if os.path.exists(path):
      png = os.path.join(out, f'training_{stage}.png')
      if _curve_figure({stage: _read_jsonl(path)}, curves, f'{stage} training', png):
        made[stage] = png
  runs = {n: _read_jsonl(os.path.join(workdir, n, 'metrics.jsonl')) for n in ppo_runs(workdir, results)
          if os.path.exists(os.path.join(workdir, n, 'metrics.jsonl'))}
  png = os.path.join(out, 'training_ppo.png')
  if runs and _curve_figure(runs, PPO_CURVES, 'PPO training', png):
    made['ppo'] = png
  return made


def plot_overoptimisation(results: dict, path: str) -> bool:
  curves = results.get('overoptimisation') or {}
  bon = results.get('best_of_n') or {}
  if not curves:
    return False
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for name, c in curves.items():
    kl = [p['kl_to_ref'] for p in c['points']]
    for ax, key in zip(axes, ('gold_score', 'rm_score')):
      ax.plot(kl, [p[key] for p in c['points']], marker='o', ms=3, label=name)
  if bon:  # best-of-n of SFT samples by the RM, at its KL bound (on all eval prompts)
    kl = [r['kl_bound'] for r in bon.values()]
    for ax, key in zip(axes, ('gold_score', 'rm_score')):
      ax.plot(kl, [r[key] for r in bon.values()], ls='--', marker='s', ms=3, color='k', label='best-of-n by RM')
    axes[0].plot(kl, [r['oracle_gold'] for r in bon.values()], ls=':', color='grey', label='best-of-n by gold')
  for ax, label in zip(axes, ('gold score (labeler)', 'RM score (proxy)')):
    ax.set_xlabel('KL to reference (nats)')
    ax.set_title(label, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  n = next(iter(curves.values()))['n_prompts']
  fig.suptitle(f'Over-optimisation: policy snapshots along PPO, {n} held-out prompts (first point: SFT)')
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return True


def plot_alignment_tax(results: dict, path: str) -> bool:
  models = results['models']
  if 'sft' not in models or len(models) < 2:
    return False
  if any(m.get('alignment_tax') is None or m.get('gold_score') is None for m in models.values()):
    return False  # real data without a labeler or held-out pretraining text
  names = list(models)
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  colors = ['tab:gray' if n == 'sft' else 'tab:green' if 'ptx' in n else 'tab:blue' for n in names]
  for ax, key, label in ((axes[0], 'alignment_tax', 'alignment tax: pretraining LM loss - SFT\'s (nats/token)'),
                         (axes[1], 'gold_score', 'gold score (labeler)')):
    vals = [models[n][key] for n in names]
    bars = ax.bar(names, vals, color=colors)
    ax.bar_label(bars, fmt='%.3f', fontsize=8)
    ax.set_title(label, fontsize=10)
    ax.tick_params(axis='x', labelsize=8)
    ax.grid(alpha=0.3, axis='y')
  fig.suptitle('The alignment tax, with and without ptx')
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return True


# ------------------------------------------------------------------------------------------------ tables
def results_table(results: dict, names: dict[str, str] | None = None) -> tuple[list[str], list[list[str]]]:
  """The results table (the one formatter: the eval stage prints it, report.md and the README show it): one
  row per model of results.json's `models`, named `names[model]` when given; cells that tests parse back."""
  cats = results['categories']
  header = ['model', 'gold', *cats, 'win vs SFT (95% CI)', 'RM score', 'KL to ref', 'LM loss (pretrain)']
  rows = []
  for name, r in results['models'].items():
    win = '-'
    if 'win_rate_vs_sft' in r:
      lo, hi = r['win_rate_vs_sft_ci95']
      win = f'{r["win_rate_vs_sft"]:.3f} [{lo:.3f}, {hi:.3f}]'
    gold = '-' if r['gold_score'] is None else f'{r["gold_score"]:.3f}'
    lm = '-' if r['lm_loss_pretrain'] is None else f'{r["lm_loss_pretrain"]:.4f}'
    rows.append([(names or {}).get(name, name), gold, *[f'{r["per_category"][c]:.3f}' for c in cats],
                 win, f'{r["rm_score"]:+.3f}', f'{r["kl_to_ref"]:.3f}', lm])
  return header, rows


def fmt_results_table(workdir: str, results: dict) -> tuple[list[str], list[list[str]]]:
  """`results_table` with each PPO run named with its beta and ptx coefficient (from its DONE summary)."""
  return results_table(results, {n: describe(workdir, n) for n in results['models']})


def fmt_rounds_table(results: dict) -> tuple[list[str], list[list[str]]]:
  """Iterated RLHF, one row per round: the policy's gold, win vs SFT (95% CI) and its share of the ceiling,
  its win vs the last round's policy head to head, its own RM's score, the labels used so far, and the new and
  old RM's agreement with the gold labeler on the samples that round labelled."""
  ceiling = results.get('win_rate_ceiling')
  header = ['round', 'policy', 'gold', 'win vs SFT (95% CI)', 'share of ceiling', 'win vs last round (95% CI)',
            'own RM score', 'KL to ref', 'labels so far (prompts / pairs)', 'RM agreement new / old']
  rows = []
  for r in results.get('rounds', []):
    win = share = '-'
    if r.get('win_rate_vs_sft') is not None:
      lo, hi = r['win_rate_vs_sft_ci95']
      win = f'{r["win_rate_vs_sft"]:.3f} [{lo:.3f}, {hi:.3f}]'
      if ceiling:
        share = f'{r["win_rate_vs_sft"] / ceiling:.1%}'
    agree = '-'
    if 'rm_agreement_new' in r:
      old = f'{r["rm_agreement_old"]:.3f}' if 'rm_agreement_old' in r else '-'
      agree = f'{r["rm_agreement_new"]:.3f} / {old}'
    gold = '-' if r['gold_score'] is None else f'{r["gold_score"]:.3f}'
    prev = '-'
    if 'win_rate_vs_previous' in r:
      lo, hi = r['win_rate_vs_previous_ci95']
      prev = f'{r["win_rate_vs_previous"]:.3f} [{lo:.3f}, {hi:.3f}]'
    rows.append([str(r['round']), r['policy'], gold, win, share, prev, f'{r["rm_score_own"]:+.3f}',
                 f'{r["kl_to_ref"]:.3f}',
                 f'{r["labels_used"]["prompts"]} / {r["labels_used"]["pairs"]}', agree])
  return header, rows


def plot_rounds(results: dict, path: str) -> bool:
  """Gold score, win vs SFT (95% interval; the ceiling dotted) and the round's own RM score of each round's policy
  against the round (SFT at round 0), with the new and old RM's agreement with the gold labeler."""
  rounds = results.get('rounds') or []
  if not rounds or rounds[0].get('gold_score') is None:
    return False
  fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
  xs = [0] + [r['round'] for r in rounds]
  sft = results['models'].get('sft', {})
  ax[0].plot(xs, [sft.get('gold_score', float('nan'))] + [r['gold_score'] for r in rounds], 'o-', label='gold')
  if all(r.get('win_rate_vs_sft') is not None for r in rounds):  # the win with its 95% interval, and its ceiling
    win = [0.5] + [r['win_rate_vs_sft'] for r in rounds]
    lo = [0.5] + [r['win_rate_vs_sft_ci95'][0] for r in rounds]
    hi = [0.5] + [r['win_rate_vs_sft_ci95'][1] for r in rounds]
    ax[0].errorbar(xs, win, yerr=[[w - a for w, a in zip(win, lo)], [b - w for w, b in zip(win, hi)]], fmt='s--',
                   color='C4', capsize=3, label='win vs SFT')
    if results.get('win_rate_ceiling'):
      ax[0].axhline(results['win_rate_ceiling'], color='C4', lw=0.8, ls=':', label='win ceiling')
  ax[0].legend(loc='lower right', fontsize=7)
  ax[0].set_title('gold score and win vs SFT (task labeler)')
  ax[1].plot(xs[1:], [r['rm_score_own'] for r in rounds], 'o-', color='C1', label="the round's RM")
  if any('rm_agreement_new' in r for r in rounds):
    ax2 = ax[1].twinx()
    ax2.plot(xs[1:], [r.get('rm_agreement_new', float('nan')) for r in rounds], 's--', color='C2', label='new RM agreement')
    ax2.plot(xs[1:], [r.get('rm_agreement_old', float('nan')) for r in rounds], 'x:', color='C3', label='old RM agreement')
    ax2.set_ylabel('agreement with gold')
    ax2.legend(loc='lower right', fontsize=7)
  ax[1].set_title("RM score (each round's own RM)")
  for a in ax:
    a.set_xlabel('round (0 = SFT)')
    a.set_xticks(xs if a is ax[0] else xs[1:])
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def text_table(header: list[str], rows: list[list[str]]) -> str:
  """A table as fixed-width text lines, `| a | b |`, for the console."""
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
  line = lambda cells: '| ' + ' | '.join(c.ljust(w) for c, w in zip(cells, widths)) + ' |'
  sep = '|' + '|'.join('-' * (w + 2) for w in widths) + '|'
  return '\n'.join([line(header), sep, *[line(r) for r in rows]])


def fmt_subcategory_table(results: dict) -> tuple[list[str], list[list[str]]]:
  """Exact-answer rates per subcategory (rows) and model (columns), from each model's `per_subcategory`
  (`evaluate.exact_rates`); no rows when no model has them (real data without a task)."""
  names = [n for n, r in results['models'].items() if r.get('per_subcategory')]
  subs = sorted({s for n in names for s in results['models'][n]['per_subcategory']})
  rows = [[s, *[('-' if s not in results['models'][n]['per_subcategory'] else
                 f'{results["models"][n]["per_subcategory"][s]:.3f}') for n in names]] for s in subs]
  return ['subcategory (exact answers)', *names], rows


def fmt_curve_table(results: dict) -> tuple[list[str], list[list[str]]]:
  header = ['run', 'iteration', 'KL to ref', 'gold', 'RM score']
  rows = [[name, str(p['iteration']), f'{p["kl_to_ref"]:.3f}', f'{p["gold_score"]:.3f}', f'{p["rm_score"]:+.3f}']
          for name, c in (results.get('overoptimisation') or {}).items() for p in c['points']]
  return header, rows


def fmt_best_of_n_table(results: dict) -> tuple[list[str], list[list[str]]]:
  header = ['n', 'gold', 'gold of the best (oracle)', 'win vs SFT (95% CI)', 'RM score', 'KL bound (nats)']
  rows = [[n, f'{r["gold_score"]:.3f}', f'{r["oracle_gold"]:.3f}',
           f'{r["win_rate_vs_sft"]:.3f} [{r["win_rate_vs_sft_ci95"][0]:.3f}, {r["win_rate_vs_sft_ci95"][1]:.3f}]',
           f'{r["rm_score"]:+.3f}', f'{r["kl_bound"]:.3f}'] for n, r in (results.get('best_of_n') or {}).items()]
  return header, rows


def sample_table(samples: list[dict], models: list[str], n: int) -> tuple[list[str], list[list[str]]]:
  header = ['#', 'category', 'prompt']
  for m in models:
    header += [f'{m} response', 'gold', 'RM']
  rows = []
  for i, s in enumerate(samples[:n]):
    row = [str(i + 1), s.get('category') or '', s['prompt']]
    for m in models:
      gold = '-' if s[m]['gold'] is None else f'{s[m]["gold"]:.2f}'  # no labeler on real data
      row += [s[m]['response'], gold, f'{s[m]["rm"]:+.2f}']
    rows.append(row)
  return header, rows


# ------------------------------------------------------------------------------------------------ rendering
def _md_cell(text: str) -> str:
  return text.replace('|', '\\|').replace('\n', ' ') or ' '


def md_table(header, rows) -> str:
  lines = ['| ' + ' | '.join(_md_cell(h) for h in header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(_md_cell(c) for c in r) + ' |' for r in rows]
  return '\n'.join(lines)


def _html_table(header, rows) -> str:
  th = ''.join(f'<th>{html.escape(h)}</th>' for h in header)
  trs = ''.join('<tr>' + ''.join(f'<td>{html.escape(c)}</td>' for c in r) + '</tr>' for r in rows)
  return f'<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>'


def render(blocks, out_dir: str) -> tuple[str, str]:
  """blocks: ('h1'|'h2'|'p', text) | ('table', header, rows) | ('img', caption, path). -> (markdown, html)."""
  md, body = [], []
  for b in blocks:
    kind = b[0]
    if kind in ('h1', 'h2'):
      md.append(('# ' if kind == 'h1' else '## ') + b[1])
      body.append(f'<{kind}>{html.escape(b[1])}</{kind}>')
    elif kind == 'p':
      md.append(b[1])
      body.append(f'<p>{html.escape(b[1])}</p>')
    elif kind == 'table':
      md.append(md_table(b[1], b[2]))
      body.append(_html_table(b[1], b[2]))
    elif kind == 'img':
      md.append(f'![{b[1]}]({os.path.relpath(b[2], out_dir)})')
      with open(b[2], 'rb') as f:
        data = base64.b64encode(f.read()).decode('ascii')
      body.append(f'<figure><img alt="{html.escape(b[1])}" src="data:image/png;base64,{data}">'
                  f'<figcaption>{html.escape(b[1])}</figcaption></figure>')
  style = ('body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}'
           'table{border-collapse:collapse;margin:1em 0;font-size:13px}'
           'td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}th{background:#f3f3f3}'
           'img{max-width:100%}figcaption{font-size:12px;color:#555}')
  page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>jax_rlhf report</title>'
          f'<style>{style}</style></head><body>\n' + '\n'.join(body) + '\n</body></html>\n')
  return '\n\n'.join(md) + '\n', page


def rm_summary(workdir: str, name: str = 'rm') -> str | None:
  """The reward model's held-out accuracy in one sentence, from W/<name>/DONE; None without one. The headline
  is the pair accuracy on distinct responses (a pair of identical samples is a coin flip for any RM), with the
  agreement with the gold labeler beside it."""
  s = _summary(workdir, name)
  if 'eval_accuracy_distinct' not in s:
    return None
  text = f'Reward model ({name}): held-out pair accuracy {s["eval_accuracy_distinct"]:.3f} on distinct responses'
  if 'eval_gold_accuracy' in s:
    text += f', agreement with the gold labeler {s["eval_gold_accuracy"]:.3f}'
  return text + f' (all labelled pairs, identical samples included: {s["eval_accuracy"]:.3f}).'


def write(workdir: str, n_samples: int = 20, name: str = 'eval') -> str:
  """Writes W/<name>/report.md, report.html and plots/*.png from the eval run's files; returns report.md's
  path."""
  out = os.path.join(workdir, name)
  with open(os.path.join(out, 'results.json')) as f:
    results = json.load(f)
  samples = _read_jsonl(os.path.join(out, 'samples.jsonl'))
  plots = os.path.join(out, 'plots')
  os.makedirs(plots, exist_ok=True)
  models = list(results['models'])

  blocks = [('h1', 'jax_rlhf report'),
            ('p', f'Workdir {os.path.abspath(workdir)}. {results["models"][models[0]]["n_prompts"]} held-out '
                  f'prompts, one sample each at temperature {results["temperature"]:g}; gold = the task\'s '
                  f'labeler (never seen in training), RM score = the reward model PPO optimised, KL = sum over '
                  f'response tokens of log pi - log pi_SFT (nats), alignment tax = held-out pretraining LM loss '
                  f'minus SFT\'s (nats/token). Machine: {results.get("machine", "unknown")}.'),
            ('h2', 'Results'),
            ('table', *fmt_results_table(workdir, results))]
  sub_header, sub_rows = fmt_subcategory_table(results)
  if sub_rows:
    blocks += [('h2', 'Exact answers per subcategory'),
               ('p', 'The share of held-out prompts answered exactly (the task\'s '
                     'verifier on the list tasks; elsewhere the labeler\'s full score: the known fact, "i don\'t '
                     'know" to an unknown creature, the refusal of an unsafe request).'),
               ('table', sub_header, sub_rows)]
  rm_line = rm_summary(workdir)
  if rm_line:
    blocks.append(('p', rm_line))
  if results.get('rounds'):
    blocks += [('h2', 'Rounds of iterated RLHF'),
               ('p', 'Each round labels fresh prompts with samples of the last round\'s policy, retrains the RM on every '
                     'ranking so far and continues the policy against it (SFT stays the KL anchor). RM agreement: '
                     'the share of pairs of that round\'s labelled policy\'s held-out samples the new RM and the '
                     'previous round\'s RM order as the gold labeler does. Share of ceiling: win rate over the win '
                     f'rate of a policy that is always right ({results.get("win_rate_ceiling", float("nan")):.3f}).'),
               ('table', *fmt_rounds_table(results))]
    rounds_png = os.path.join(plots, 'rounds.png')
    if plot_rounds(results, rounds_png):
      blocks.append(('img', 'Gold and RM score against rounds', rounds_png))
  tax = os.path.join(plots, 'alignment_tax.png')
  if plot_alignment_tax(results, tax):
    blocks.append(('img', 'The alignment tax with and without ptx, and the gold score it buys', tax))
  over = os.path.join(plots, 'overoptimisation.png')
  if plot_overoptimisation(results, over):
    blocks += [('h2', 'Over-optimisation'),
               ('p', 'Gold and RM score against KL to the reference for the policy snapshots kept along each PPO '
                     'run (Gao et al. 2023). Over-optimisation shows as a gold score that rises and then falls '
                     'while the RM score (the proxy PPO optimises) keeps rising.'),
               ('img', 'Gold score and RM score against KL to the reference', over),
               ('table', *fmt_curve_table(results))]
  if results.get('best_of_n'):
    blocks += [('h2', 'Best-of-n: the reward model\'s ceiling'),
               ('p', 'The RM picks the best of n fresh SFT samples per held-out prompt, with no policy training, '
                     'at KL <= log n - (n-1)/n; the oracle picks by gold score. Where the RM\'s pick stops '
                     'improving with n while the oracle\'s keeps rising, the reward model limits what PPO can '
                     'reach.'),
               ('table', *fmt_best_of_n_table(results))]
  # ---- public benchmarks (jax_rlhf/benchmarks/), when the eval config asked for any
  from jax_rlhf import benchmarks
  bench_header, bench_rows = benchmarks.table_rows(results['models'])
  if bench_rows:
    blocks += [('h2', 'Public benchmarks'), ('p', benchmarks.REPORT_NOTE), ('table', bench_header, bench_rows)]
  training = plot_training(workdir, results, plots)
  if training:
    blocks.append(('h2', 'Training curves'))
    blocks += [('img', f'{stage} training curves', path) for stage, path in training.items()]
  shown = [m for m in ('sft', 'ppo') if m in models] or models[:2]
  blocks += [('h2', f'{min(n_samples, len(samples))} held-out prompts'),
             ('p', 'One sample per model per prompt (the ones scored above); gold = labeler score, '
                   'RM = reward model score.'),
             ('table', *sample_table(samples, shown, n_samples))]
  md, page = render(blocks, out)
  path = os.path.join(out, 'report.md')
  with open(path, 'w') as f:
    f.write(md)
  with open(os.path.join(out, 'report.html'), 'w') as f:
    f.write(page)
  return path


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description='Regenerate W/eval/report.{md,html} and plots of a finished run.')
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--samples', type=int, default=20, help='held-out prompts shown side by side')
  args = ap.parse_args(argv)
  if not os.path.exists(os.path.join(args.workdir, 'eval', 'results.json')):
    print(f'error: no {os.path.join(args.workdir, "eval", "results.json")}; run the eval stage first',
          file=sys.stderr)
    return 2
  print(write(args.workdir, args.samples))
  return 0


if __name__ == '__main__':
  sys.exit(main())
