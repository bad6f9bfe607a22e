"""End to end: `python -m jax_rlhf.main --config configs/pipeline.py:quick` once (module fixture), then what a
user sees: exit codes, DONE markers, checkpoints, metrics, eval results, HF exports that transformers loads,
skipping finished stages, one-line errors, and resuming PPO from its last checkpoint.

The subprocesses inherit the test environment (conftest: 8 fake CPU devices), so the default mesh is data=8.
Checkpoints every 2 steps (instead of quick's 10) so that PPO (4 iterations) can be resumed from the middle.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ('pretrain', 'sft', 'rm', 'ppo')
QUICK = ('configs/pipeline.py:quick', '--config.checkpoint.every=2')
EXPECTED_KEYS = {  # split -> keys some record of that split must have
    'pretrain': {'train': {'loss'}, 'eval': {'eval_loss'}},
    'sft': {'train': {'loss'}, 'eval': {'eval_loss'}},
    'rm': {'train': {'loss', 'accuracy'}, 'eval': {'eval_accuracy'}},
    'ppo': {'train': {'score', 'kl', 'beta', 'clipfrac'}},
}


def main(config, workdir, *overrides, timeout=600):
  cmd = [sys.executable, '-m', 'jax_rlhf.main', '--config', config, '--workdir', str(workdir), *overrides]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def explain(proc):
  return f'exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}'


@pytest.fixture(scope='module')
def run(quick_pipeline):  # conftest: one run shared with the other end-to-end tests
  return quick_pipeline


@pytest.fixture(scope='module')
def workdir(run):
  w, proc = run
  assert proc.returncode == 0, explain(proc)
  return w


def read_metrics(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_pipeline_exits_zero_and_every_stage_is_done(run):
  w, proc = run
  assert proc.returncode == 0, explain(proc)
  for stage in (*STAGES, 'label'):
    assert (w / stage / 'DONE').is_file(), stage
    json.loads((w / stage / 'DONE').read_text())  # a JSON summary
    assert f'[{stage}] done' in proc.stdout, stage
  assert (w / 'eval' / 'results.json').is_file()
  timed = [json.loads(line)['stage'] for line in (w / 'wall_times.jsonl').read_text().splitlines()]
  assert timed == ['pretrain', 'sft', 'label', 'rm', 'ppo', 'eval']


def test_label_run_writes_rankings_the_rm_reads(workdir):
  recs = [json.loads(line) for line in (workdir / 'label' / 'rankings.jsonl').read_text().splitlines()]
  assert len(recs) == 48  # quick's label.num_prompts
  for r in recs:
    assert 2 <= len(r['responses']) <= 4 and sorted(r['ranking']) == list(range(len(r['responses'])))
    assert len(r['gold']) == len(r['responses']) and r['category'] in ('helpful', 'honest', 'harmless')
  done = json.loads((workdir / 'label' / 'DONE').read_text())
  assert (done['policy'], done['judge'], done['rankings']) == ('sft', 'task', 48)
  info = next(r for r in read_metrics(workdir / 'rm' / 'metrics.jsonl') if r['split'] == 'info')
  assert info['rankings'] == 48


def test_unknown_judge_is_one_line_and_exit_2(workdir, tmp_path):
  copy = tmp_path / 'W'
  shutil.copytree(workdir / 'sft', copy / 'sft', symlinks=True)
  proc = main('configs/label.py:quick', copy, '--config.label.judge=human')
  assert proc.returncode == 2, explain(proc)
  assert proc.stderr.strip().startswith("error: label.judge='human' is no judge; judges: task, rm:RUN"), explain(proc)
  assert len(proc.stderr.strip().splitlines()) == 1, explain(proc)


@pytest.mark.parametrize('stage', STAGES)
def test_checkpoints_and_metrics_per_stage(workdir, stage):
  ckpts = workdir / stage / 'checkpoints'
  steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  assert steps, f'no checkpoint in {ckpts}: {list(ckpts.iterdir())}'
  records = read_metrics(workdir / stage / 'metrics.jsonl')
  for split, keys in EXPECTED_KEYS[stage].items():
    seen = set().union(*[r.keys() for r in records if r['split'] == split])
    assert keys <= seen, (stage, split, keys - seen)
    for r in records:
      if r['split'] == split:
        assert all(np.isfinite(r[k]) for k in keys & r.keys()), r
  assert any(r['split'] == 'info' for r in records)


def test_eval_results_have_every_field(workdir):
  results = json.loads((workdir / 'eval' / 'results.json').read_text())['models']
  assert set(results) == {'sft', 'ppo'}
  for name, r in results.items():
    for key in ('gold_score', 'rm_score', 'per_category', 'kl_to_ref', 'lm_loss_pretrain'):
      assert key in r, (name, key)
    assert set(r['per_category']) == {'helpful', 'honest', 'harmless'}
    assert 0.0 <= r['gold_score'] <= 1.0
    assert all(0.0 <= v <= 1.0 for v in r['per_category'].values())
  assert results['sft']['kl_to_ref'] == pytest.approx(0.0, abs=1e-5)  # the SFT model is the reference
  ppo = results['ppo']
  lo, hi = ppo['win_rate_vs_sft_ci95']
  assert 0.0 <= lo <= ppo['win_rate_vs_sft'] <= hi <= 1.0
  assert 'win_rate_vs_sft' not in results['sft']
  bon = json.loads((workdir / 'eval' / 'results.json').read_text())['best_of_n']
  assert set(bon) == {'1', '2'}  # the quick variant's eval.best_of_n
  for r in bon.values():
    assert 0.0 <= r['gold_score'] <= r['oracle_gold'] <= 1.0
  assert bon['2']['oracle_gold'] >= bon['1']['oracle_gold']


def test_hf_exports_load_in_transformers(workdir):
  import transformers
  for stage in ('pretrain', 'sft', 'ppo'):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(workdir / stage / 'hf', output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys'], (stage, info)
  rm, info = transformers.AutoModelForSequenceClassification.from_pretrained(workdir / 'rm' / 'hf',
                                                                             output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  assert rm.config.num_labels == 1
  tok = transformers.AutoTokenizer.from_pretrained(workdir / 'ppo' / 'hf')
  assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id


def test_second_run_skips_every_finished_stage(workdir):
  before = {s: (workdir / s / 'DONE').stat().st_mtime_ns for s in STAGES}
  proc = main(QUICK[0], workdir, *QUICK[1:])
  assert proc.returncode == 0, explain(proc)
  for stage in STAGES:
    assert f'[{stage}] already complete' in proc.stdout, (stage, explain(proc))
    assert (workdir / stage / 'DONE').stat().st_mtime_ns == before[stage]
  assert 'resumed' not in proc.stdout


def test_stage_without_its_input_exits_2_with_one_line(tmp_path):
  proc = main('configs/ppo.py', tmp_path / 'empty')
  assert proc.returncode == 2, explain(proc)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, explain(proc)
  assert 'ppo needs the sft run' in lines[0] and 'make sft first' in lines[0] and 'configs/sft.py' in lines[0], lines[0]
  assert 'Traceback' not in proc.stderr


def test_misspelt_override_fails_naming_the_key(tmp_path):
  proc = main('configs/pipeline.py:quick', tmp_path / 'W', '--config.ppo.kl_cof=1')
  assert proc.returncode != 0
  assert proc.stderr == 'error: ppo has no field kl_cof; did you mean ppo.kl.coef?\n', explain(proc)
  assert not (tmp_path / 'W').exists()  # nothing ran
  # main.py's contract: a user's mistake ends in one line and exit status 2, not a traceback.
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, explain(proc)


def train_records(path, step):
  """The numbers logged for `step` (wall-clock figures left out), one dict per time it was logged."""
  return [{k: v for k, v in r.items() if k not in ('step', 'split', 'time', 'episodes/s')}
          for r in read_metrics(path) if r['split'] == 'train' and r['step'] == step]


def test_ppo_killed_and_resumed_ends_where_the_uninterrupted_run_does(workdir, tmp_path):
  """A PPO run killed after its iteration-2 checkpoint (drop the later checkpoint, DONE and the export) resumes
  from iteration 2 and ends with the same weights and the same last metrics as the uninterrupted run."""
  copy = tmp_path / 'W'
  shutil.copytree(workdir, copy, symlinks=True)
  ckpts = copy / 'ppo' / 'checkpoints'
  assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ['2', '4']
  shutil.rmtree(ckpts / '4')
  (copy / 'ppo' / 'DONE').unlink()
  shutil.rmtree(copy / 'ppo' / 'hf')
  proc = main('configs/ppo.py:quick', copy, *QUICK[1:])
  assert proc.returncode == 0, explain(proc)
  assert 'resumed from iteration 2' in proc.stdout, explain(proc)
  assert (copy / 'ppo' / 'DONE').is_file()
  from safetensors.numpy import load_file
  ours = load_file(copy / 'ppo' / 'hf' / 'model.safetensors')
  theirs = load_file(workdir / 'ppo' / 'hf' / 'model.safetensors')
  assert ours.keys() == theirs.keys()
  for k in ours:
    np.testing.assert_allclose(ours[k], theirs[k], rtol=0, atol=1e-6, err_msg=k)
  (uninterrupted,) = train_records(workdir / 'ppo' / 'metrics.jsonl', 4)
  first, resumed = train_records(copy / 'ppo' / 'metrics.jsonl', 4)  # the copy's log gets a second step 4
  assert first == uninterrupted
  assert resumed.keys() == uninterrupted.keys()
  for k in uninterrupted:
    np.testing.assert_allclose(resumed[k], uninterrupted[k], rtol=1e-5, atol=1e-6, err_msg=k)


# ------------------------------------------------------------------ the report (jax_rlhf/report.py) and ablation
PLOTS = ('training_pretrain', 'training_sft', 'training_rm', 'training_ppo', 'overoptimisation', 'alignment_tax')
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def md_tables(md):
  """{section title: [rows as lists of cells]} of report.md's tables (header row first)."""
  tables, title = {}, None
  for line in md.splitlines():
    if line.startswith('## '):
      title = line[3:]
    elif line.startswith('| ') and title:
      cells = [c.strip().replace('\\|', '|') for c in line.strip()[2:-2].replace('\\|', '\0').split(' | ')]
      tables.setdefault(title, []).append([c.replace('\0', '|') for c in cells])
  return tables


def assert_cell(cell, value, decimals):
  assert abs(float(cell) - value) <= 0.5 * 10 ** -decimals + 1e-12, (cell, value)


def check_results_table(rows, results):
  header, *rows = rows
  assert [r[0].split(' ')[0] for r in rows] == list(results['models'])
  for row in rows:
    r = results['models'][row[0].split(' ')[0]]
    cell = dict(zip(header, row))
    assert_cell(cell['gold'], r['gold_score'], 3)
    for c in results['categories']:
      assert_cell(cell[c], r['per_category'][c], 3)
    assert_cell(cell['RM score'], r['rm_score'], 3)
    assert_cell(cell['KL to ref'], r['kl_to_ref'], 3)
    assert_cell(cell['LM loss (pretrain)'], r['lm_loss_pretrain'], 4)
    if 'win_rate_vs_sft' in r:
      rate, ci = cell['win vs SFT (95% CI)'].split(' ', 1)
      assert_cell(rate, r['win_rate_vs_sft'], 3)
      for got, want in zip(ci.strip('[]').split(', '), r['win_rate_vs_sft_ci95']):
        assert_cell(got, want, 3)
    else:
      assert cell['win vs SFT (95% CI)'] == '-'


def test_report_and_every_plot_are_written(workdir):
  import base64
  ev = workdir / 'eval'
  md = (ev / 'report.md').read_text()
  page = (ev / 'report.html').read_text()
  for name in PLOTS:
    png = (ev / 'plots' / f'{name}.png').read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000, name
    assert f'](plots/{name}.png)' in md, name
    assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in page, name  # self-contained
  assert page.count('<img ') == len(PLOTS)


def test_report_numbers_are_those_of_results_json(workdir):
  ev = workdir / 'eval'
  results = json.loads((ev / 'results.json').read_text())
  tables = md_tables((ev / 'report.md').read_text())
  check_results_table(tables['Results'], results)
  rm = json.loads((workdir / 'rm' / 'DONE').read_text())  # the RM's headline: distinct responses, gold beside it
  assert f'held-out pair accuracy {rm["eval_accuracy_distinct"]:.3f} on distinct responses' in (ev / 'report.md').read_text()
  # The over-optimisation curve: SFT (iteration 0, KL 0) then a snapshot every 2 PPO iterations.
  points = results['overoptimisation']['ppo']['points']
  assert [p['iteration'] for p in points] == [0, 2, 4]
  assert points[0]['kl_to_ref'] == pytest.approx(0.0, abs=1e-5)
  header, *rows = tables['Over-optimisation']
  rows = [r for r in rows if r[0] == 'ppo']
  assert [int(r[1]) for r in rows] == [p['iteration'] for p in points]
  for row, p in zip(rows, points):
    for cell, key in zip(row[2:], ('kl_to_ref', 'gold_score', 'rm_score')):
      assert_cell(cell, p[key], 3)
  header, *rows = tables["Best-of-n: the reward model's ceiling"]
  assert [r[0] for r in rows] == list(results['best_of_n'])
  for row, r in zip(rows, results['best_of_n'].values()):
    for cell, key in zip(row[1:3], ('gold_score', 'oracle_gold')):
      assert_cell(cell, r[key], 3)
    assert_cell(row[3].split(' ')[0], r['win_rate_vs_sft'], 3)
  samples = [json.loads(line) for line in (ev / 'samples.jsonl').read_text().splitlines()]
  header, *rows = tables['20 held-out prompts']
  assert len(rows) == 20
  for row, s in zip(rows, samples):
    assert row[2] == s['prompt'].strip()
    for j, m in ((3, 'sft'), (6, 'ppo')):
      assert row[j] == (s[m]['response'].strip() or '')
      assert_cell(row[j + 1], s[m]['gold'], 2)
      assert_cell(row[j + 2], s[m]['rm'], 2)


def test_ablation_runs_ptx_and_lowbeta_from_the_same_sft_and_rm_and_eval_compares_all(workdir, tmp_path):
  copy = tmp_path / 'W'
  shutil.copytree(workdir, copy, symlinks=True)
  shutil.rmtree(copy / 'eval')
  proc = main('configs/pipeline.py:quick,ablation', copy, *QUICK[1:], '--config.ppo.iterations=2')
  assert proc.returncode == 0, explain(proc)
  for stage in STAGES:  # the same SFT and RM (and the plain PPO run) are reused
    assert f'[{stage}] already complete' in proc.stdout, (stage, explain(proc))
  for name, kl, ptx in (('ppo_ptx', 0.2, 1.0), ('ppo_lowbeta', 0.02, 0.0)):
    done = json.loads((copy / name / 'DONE').read_text())
    assert (done['kl_coef'], done['ptx_coef']) == (kl, ptx), done
    records = [r for r in read_metrics(copy / name / 'metrics.jsonl') if r['split'] == 'train']
    assert all(r['beta'] == pytest.approx(kl) for r in records)
    assert all(('ptx_loss' in r) == (ptx > 0) for r in records)
  results = json.loads((copy / 'eval' / 'results.json').read_text())
  assert list(results['models']) == ['sft', 'ppo', 'ppo_lowbeta', 'ppo_ptx']
  assert set(results['overoptimisation']) == {'ppo', 'ppo_lowbeta', 'ppo_ptx'}
  md = (copy / 'eval' / 'report.md').read_text()
  check_results_table(md_tables(md)['Results'], results)
  timed = [json.loads(line)['stage'] for line in (copy / 'wall_times.jsonl').read_text().splitlines()]
  assert timed[-3:] == ['ppo_lowbeta', 'ppo_ptx', 'eval']

  # The README's results section, regenerated from this workdir.
  readme = tmp_path / 'README.md'
  readme.write_text('intro\n<!-- results:begin -->\nold\n<!-- results:end -->\nrest\n')
  proc = subprocess.run([sys.executable, 'scripts/readme_results.py', '--workdir', str(copy), '--readme',
                         str(readme), '--docs', str(tmp_path / 'docs')], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, explain(proc)
  text = readme.read_text()
  assert text.startswith('intro\n<!-- results:begin -->\n') and text.endswith('<!-- results:end -->\nrest\n')
  assert '\nold\n' not in text and 'Wall time' in text
  check_results_table(md_tables('## Results\n' + text)['Results'], results)
  for name in ('overoptimisation', 'alignment_tax'):
    assert (tmp_path / 'docs' / f'{name}.png').read_bytes().startswith(PNG_MAGIC)
    assert f'](docs/{name}.png)' in text


def test_eval_without_snapshot_curve_or_best_of_n(workdir, tmp_path):
  """eval.n_snapshot_prompts=0 and best_of_n=() skip the curve and the best-of-n table (they crashed once)."""
  copy = tmp_path / 'W'
  shutil.copytree(workdir, copy, symlinks=True)
  shutil.rmtree(copy / 'eval')
  proc = main('configs/eval.py:quick', copy, '--config.eval.n_snapshot_prompts=0', '--config.eval.best_of_n=()')
  assert proc.returncode == 0, explain(proc)
  results = json.loads((copy / 'eval' / 'results.json').read_text())
  assert results['overoptimisation'] == {} and 'best_of_n' not in results
  assert 0.0 <= results['models']['ppo']['win_rate_vs_sft'] <= 1.0
  assert (copy / 'eval' / 'report.md').is_file()
