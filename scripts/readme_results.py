"""Regenerate the README's results section from a finished run's workdir.

  python scripts/readme_results.py --workdir runs/ablation [--section results] [--readme README.md] [--docs docs]

Replaces what lies between `<!-- SECTION:begin -->` and `<!-- SECTION:end -->` in the README (`--section`:
results, the ablation; compare, the methods after InstructGPT; rounds, iterated RLHF) with: the command and
machine the run used, its wall time per run (W/wall_times.jsonl), the results table (built from
W/eval/results.json by jax_rlhf.report, the same cells as W/eval/report.md), the per-subcategory exact rates
when the eval has them (sections other than results), and the plots the eval drew (the over-optimisation
curve and the alignment tax; the rounds plot), copied into `--docs`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jax_rlhf import report  # pylint: disable=wrong-import-position

SECTIONS = ('results', 'compare', 'rounds')
PLOTS = {'results': (('overoptimisation.png', 'Gold and RM score against KL to the reference along PPO'),
                     ('alignment_tax.png', 'The alignment tax with and without ptx')),
         'compare': (),
         'rounds': (('rounds.png', 'Gold and RM score of each round\'s policy'),)}


def markers(name: str) -> tuple[str, str]:
  return f'<!-- {name}:begin -->', f'<!-- {name}:end -->'


def wall_times(workdir: str) -> dict[str, float]:
  """Seconds per stage, the last time each ran (a resumed stage counts its last run only)."""
  times = {}
  path = os.path.join(workdir, 'wall_times.jsonl')
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          r = json.loads(line)
          times[r['stage']] = r['wall_s']
  return times


def _minutes(s: float) -> str:
  return f'{int(s // 60)} min {int(round(s % 60))} s' if s >= 60 else f'{s:.0f} s'


def section(workdir: str, readme_dir: str, docs: str, command: str, name: str = 'results') -> str:
  with open(os.path.join(workdir, 'eval', 'results.json')) as f:
    results = json.load(f)
  plots_dir = os.path.join(workdir, 'eval', 'plots')
  report.write(workdir)  # the plots and report.md of these very results
  os.makedirs(docs, exist_ok=True)
  lines = []
  if command:
    lines.append(f'`{command}`')
  times = wall_times(workdir)
  if times:
    per = ', '.join(f'{k} {v:.0f} s' for k, v in times.items())
    lines.append(f'Wall time {_minutes(sum(times.values()))} ({per}) on {results.get("machine", "an unknown machine")}.')
  header, rows = report.fmt_results_table(workdir, results)
  lines.append(report.md_table(header, rows))
  sub_header, sub_rows = report.fmt_subcategory_table(results)
  if name != 'results' and sub_rows:
    lines.append(report.md_table(sub_header, sub_rows))
  for plot, caption in PLOTS[name]:
    src = os.path.join(plots_dir, plot)
    if os.path.exists(src):
      shutil.copyfile(src, os.path.join(docs, plot))
      lines.append(f'![{caption}]({os.path.relpath(os.path.join(docs, plot), readme_dir)})')
  return '\n\n'.join(lines)


def replace_section(text: str, body: str, name: str = 'results') -> str:
  BEGIN, END = markers(name)  # pylint: disable=invalid-name
  if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
    raise ValueError(f'the README has no {BEGIN} ... {END} section to replace')
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  return f'{head}{BEGIN}\n{body}\n{END}{tail}'


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--workdir', required=True, help='a finished run (W/eval/results.json)')
  ap.add_argument('--section', default='results', choices=SECTIONS, help='which marked README section to rewrite')
  ap.add_argument('--readme', default=os.path.join(ROOT, 'README.md'))
  ap.add_argument('--docs', default=os.path.join(ROOT, 'docs'), help='where the two plots are copied')
  ap.add_argument('--command', default='', help='the command that produced the workdir, shown above the table')
  args = ap.parse_args(argv)
  if not os.path.exists(os.path.join(args.workdir, 'eval', 'results.json')):
    print(f'error: no {os.path.join(args.workdir, "eval", "results.json")}; run the pipeline first', file=sys.stderr)
    return 2
  with open(args.readme) as f:
    text = f.read()
  try:
    body = section(args.workdir, os.path.dirname(os.path.abspath(args.readme)), args.docs, args.command,
                   args.section)
    text = replace_section(text, body, args.section)
  except ValueError as e:
    print(f'error: {args.readme}: {e}', file=sys.stderr)
    return 2
  with open(args.readme, 'w') as f:
    f.write(text)
  print(f'updated {args.readme}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
