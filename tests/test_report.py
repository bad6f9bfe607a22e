"""The plan of runs (default, ablation), per-run configs and overrides, misspelt fields, and the report's tables
(no training: fast).

The report and plots of a real quick run, and the ablation run end to end, are checked in test_pipeline.py.
"""

import os
import sys

import pytest

from jax_rlhf import config as config_lib
from jax_rlhf import pipeline
from jax_rlhf import report
from jax_rlhf import variants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATION_RUNS = ('pretrain', 'sft', 'label', 'rm', 'ppo', 'ppo_lowbeta', 'ppo_ptx', 'eval')


def plan(c):
  c.lock()  # as main.py's config flag holds it
  return pipeline.plan_of(c)


def test_default_plan_has_the_six_runs_with_their_inputs():
  c = config_lib.stage_config('pipeline')
  runs = plan(c)
  assert [r.name for r, _ in runs] == ['pretrain', 'sft', 'label', 'rm', 'ppo', 'eval']
  assert [r.kind for r, _ in runs] == ['pretrain', 'sft', 'label', 'rm', 'ppo', 'eval']
  inputs = {r.name: dict(r.inputs) for r, _ in runs}
  assert inputs['rm'] == {'init': 'sft', 'rankings': 'label'}
  assert inputs['ppo'] == {'policy': 'sft', 'reference': 'sft', 'reward': 'rm'}
  assert tuple(c.eval.models) == ('sft', 'ppo')


def test_runs_nobody_reads_are_left_out():
  c = config_lib.stage_config('pipeline')
  c.sft.init = 'scratch'
  c.rm.data = 'rankings.jsonl'
  assert [r.name for r, _ in plan(c)] == ['sft', 'rm', 'ppo', 'eval']


@pytest.mark.parametrize('arg', ['ablation', 'quick,ablation', 'ablation,quick'])
def test_ablation_plan_and_eval_models(arg):
  c = config_lib.stage_config('pipeline', arg)
  assert [r.name for r, _ in plan(c)] == list(ABLATION_RUNS)
  assert tuple(c.eval.models) == ('sft', 'ppo', 'ppo_lowbeta', 'ppo_ptx')  # the order of the results table
  if 'quick' in arg:  # composes: quick's sizes are kept
    assert c.ppo.iterations == config_lib.stage_config('pipeline', 'quick').ppo.iterations


def test_run_configs_apply_their_overrides_and_leave_the_rest():
  c = config_lib.stage_config('pipeline', 'quick,ablation')
  configs = {r.name: rc for r, rc in plan(c)}
  ptx, low = configs['ppo_ptx'], configs['ppo_lowbeta']
  assert ptx.ppo.ptx.coef == 1.0 and ptx.ppo.kl.coef == c.ppo.kl.coef
  assert low.ppo.kl.coef == 0.02 and low.ppo.ptx.coef == 0.0
  assert ptx.ppo.ptx.batch_size == c.ppo.ptx.batch_size  # a nested override keeps its siblings
  assert c.ppo.ptx.coef == 0.0 and c.ppo.kl.coef == 0.2  # the base config is untouched
  assert low.sft == c.sft and low.rm == c.rm  # the same SFT and RM
  assert configs['ppo'].ppo == c.ppo


def test_single_stage_is_the_plans_run_of_that_name():
  c = config_lib.stage_config('ppo', 'quick')
  ((run, rc),) = plan(c)
  assert (run.name, run.kind, dict(run.inputs)) == ('ppo', 'ppo', {'policy': 'sft', 'reference': 'sft', 'reward': 'rm'})
  assert rc.ppo == c.ppo


def test_bad_override_kind_and_input_fail_naming_them():
  c = config_lib.stage_config('pipeline', 'quick')
  c.plan = (*c.plan, variants.plan_run('bad', 'ppo', {'policy': 'sft'}, {'ppo': {'kl': {'cof': 1.0}}}))
  with pytest.raises(pipeline.PlanError, match=r'^plan run bad: ppo.kl has no field cof; did you mean ppo.kl.coef\?$'):
    plan(c)
  c = config_lib.stage_config('pipeline', 'quick')
  c.plan = (*c.plan, variants.plan_run('x', 'ppoo'))
  with pytest.raises(pipeline.PlanError, match=r"plan run x: unknown kind 'ppoo'; did you mean ppo\?"):
    plan(c)
  c = config_lib.stage_config('pipeline', 'quick')
  c.plan = (*c.plan, variants.plan_run('y', 'ppo', {'reward': 'rm2'}))
  with pytest.raises(pipeline.PlanError, match=r"plan run y: its reward input 'rm2' is no earlier run"):
    plan(c)
  c = config_lib.stage_config('pipeline', 'quick')
  c.plan = (*c.plan, variants.plan_run('rm', 'rm'))
  with pytest.raises(pipeline.PlanError, match='plan run rm appears twice'):
    plan(c)


@pytest.mark.parametrize('path, message', [
    ('ppo.kl_coef', 'ppo has no field kl_coef; did you mean ppo.kl.coef?'),
    ('ppo.cilp', 'ppo has no field cilp; did you mean ppo.clip?'),
    ('ppoo.clip', 'config has no field ppoo; did you mean ppo.clip?'),
    ('ppoo', 'config has no field ppoo; did you mean ppo?'),
    ('rm.num_prompts', 'rm has no field num_prompts; did you mean label.num_prompts?'),
    ('ppo.kl.coef', None), ('seed', None)])
def test_a_misspelt_field_names_the_nearest_one(path, message):
  assert pipeline.unknown_field(config_lib.base_config(), path) == message


def test_misspelt_override_on_the_command_line_is_one_line_and_exit_2(tmp_path):
  import subprocess
  proc = subprocess.run([sys.executable, '-m', 'jax_rlhf.main', '--config', 'configs/ppo.py', '--workdir',
                         str(tmp_path / 'W'), '--config.ppo.kl_coef=0.05'], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 2
  assert proc.stderr == 'error: ppo has no field kl_coef; did you mean ppo.kl.coef?\n', proc.stderr
  assert not (tmp_path / 'W').exists()


def test_the_printed_table_is_the_reports_cells():
  results = {'categories': ['a'], 'models': {
      'sft': {'gold_score': 0.5, 'per_category': {'a': 0.25}, 'rm_score': -0.1, 'kl_to_ref': 0.0,
              'lm_loss_pretrain': 5.0},
      'ppo': {'gold_score': 0.75, 'per_category': {'a': 0.5}, 'rm_score': 1.0, 'kl_to_ref': 1.5,
              'lm_loss_pretrain': None, 'win_rate_vs_sft': 0.6, 'win_rate_vs_sft_ci95': [0.5, 0.7]}}}
  header, rows = report.results_table(results)
  assert rows[1] == ['ppo', '0.750', '0.500', '0.600 [0.500, 0.700]', '+1.000', '1.500', '-']
  text = report.text_table(header, rows).splitlines()
  assert len(text) == 4 and text[0].startswith('| model | gold  | a     | win vs SFT (95% CI)')
  assert [c.strip() for c in text[3].strip('| ').split(' | ')] == rows[1]


def test_markdown_table_escapes_pipes_and_keeps_one_row_per_line():
  md = report.md_table(['a', 'b'], [['x | y', ''], ['1', 'line\nbreak']])
  lines = md.splitlines()
  assert len(lines) == 4
  assert lines[2] == '| x \\| y |   |'
  assert lines[3] == '| 1 | line break |'


def test_readme_section_is_replaced_and_nothing_else():
  sys.path.insert(0, os.path.join(ROOT, 'scripts'))
  try:
    import readme_results  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  begin, end = readme_results.markers('results')
  cb, ce = readme_results.markers('compare')
  text = f'top\n{begin}\nold table\n{end}\nmiddle\n{cb}\nold compare\n{ce}\nbottom\n'
  assert readme_results.replace_section(text, 'new') == text.replace('old table', 'new')
  assert readme_results.replace_section(text, 'new', 'compare') == text.replace('old compare', 'new')
  with pytest.raises(ValueError, match='results:begin'):
    readme_results.replace_section('no markers', 'new')
  with pytest.raises(ValueError, match='rounds:begin'):
    readme_results.replace_section(text, 'new', 'rounds')


def test_report_and_readme_script_without_results_exit_2_with_one_line(tmp_path, capsys):
  sys.path.insert(0, os.path.join(ROOT, 'scripts'))
  try:
    import readme_results  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  assert report.main(['--workdir', str(tmp_path)]) == 2
  assert readme_results.main(['--workdir', str(tmp_path), '--readme', str(tmp_path / 'README.md')]) == 2
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 2 and all(line.startswith('error: no ') and 'results.json' in line for line in lines)


def test_stage_names_any_run_of_the_plan_and_a_typo_gets_the_nearest():
  c = config_lib.stage_config('pipeline', 'compare')
  c.stage = 'dpo_online'
  [(run, rc)] = plan(c)
  assert run.name == 'dpo_online' and run.kind == 'dpo' and rc.dpo.online and rc.dpo.beta == 1.0
  c = config_lib.stage_config('pipeline', 'compare')
  c.stage = 'grpo_verifer'
  with pytest.raises(pipeline.PlanError, match="did you mean 'grpo_verifier'"):
    plan(c)


def test_a_flag_that_a_plan_run_overrides_gets_a_note():
  from jax_rlhf.main import flag_fields
  fields = flag_fields(['--config', 'configs/pipeline.py:compare', '--config.dpo.beta=0.5', '--workdir=W',
                        '--config.ppo.kl.coef', '0.05'])
  assert fields == {'dpo.beta', 'ppo.kl.coef'}
  c = config_lib.stage_config('pipeline', 'compare')
  c.dpo.beta = 0.5  # as the flag set it
  runs = {r.name: r for r, _ in plan(c)}
  [note] = pipeline.flag_notes(c, runs['dpo_online'], fields)  # compare's dpo_online sets beta 1.0 itself
  assert note.startswith('[dpo_online] note:') and 'dpo.beta=1.0' in note and '--config.dpo.beta=0.5' in note
  assert pipeline.flag_notes(c, runs['dpo'], fields) == []  # no override of beta there: the flag holds
  assert pipeline.flag_notes(c, runs['dpo_online'], {'ppo.kl.coef'}) == []  # a field the run does not override
  c.dpo.beta = 1.0
  assert pipeline.flag_notes(c, runs['dpo_online'], fields) == []  # the same value: nothing replaced
