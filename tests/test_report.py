"""The ablation variant's stage list and run configs, and the report's tables (no training: fast).

The report and plots of a real quick run, and the ablation run end to end, are checked in test_pipeline.py.
"""

import os
import sys

import pytest

from jax_rlhf import config as config_lib
from jax_rlhf import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATION_STAGES = ('pretrain', 'sft', 'rm', 'ppo', 'ppo_lowbeta', 'ppo_ptx', 'eval')


def test_default_pipeline_has_the_five_stages():
  c = config_lib.stage_config('pipeline')
  assert config_lib.pipeline_stages(c) == ('pretrain', 'sft', 'rm', 'ppo', 'eval')
  assert tuple(c.eval.models) == ('sft', 'ppo')


@pytest.mark.parametrize('arg', ['ablation', 'quick,ablation', 'ablation,quick'])
def test_ablation_stage_list_and_eval_models(arg):
  c = config_lib.stage_config('pipeline', arg)
  assert config_lib.pipeline_stages(c) == ABLATION_STAGES
  assert set(c.eval.models) == {'sft', 'ppo', 'ppo_ptx', 'ppo_lowbeta'}
  if 'quick' in arg:  # composes: quick's sizes are kept
    assert c.ppo.iterations == config_lib.stage_config('pipeline', 'quick').ppo.iterations


def test_ppo_run_configs_override_ppo_and_leave_the_rest():
  c = config_lib.stage_config('pipeline', 'quick,ablation')
  c.lock()  # as main.py's config flag holds it
  ptx = config_lib.ppo_run_config(c, 'ppo_ptx')
  low = config_lib.ppo_run_config(c, 'ppo_lowbeta')
  assert ptx.ppo.ptx.coef == 1.0 and ptx.ppo.kl.coef == c.ppo.kl.coef
  assert low.ppo.kl.coef == 0.02 and low.ppo.ptx.coef == 0.0
  assert ptx.ppo.ptx.batch_size == c.ppo.ptx.batch_size  # a nested override keeps its siblings
  assert c.ppo.ptx.coef == 0.0 and c.ppo.kl.coef == 0.2  # the base run is untouched
  assert low.sft == c.sft and low.rm == c.rm  # the same SFT and RM


def test_bad_ppo_run_override_and_name_fail_naming_them():
  c = config_lib.stage_config('pipeline', 'quick')
  c.ppo_runs.bad = dict(kll=dict(coef=1.0))
  with pytest.raises(ValueError, match=r'ppo_runs\.bad.*kll'):
    config_lib.ppo_run_config(c, 'bad')
  c = config_lib.stage_config('pipeline', 'quick')
  c.ppo_runs.rm = dict(kl=dict(coef=1.0))
  with pytest.raises(ValueError, match=r'ppo_runs\.rm.*stage'):
    config_lib.pipeline_stages(c)


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
  text = f'top\n{readme_results.BEGIN}\nold table\n{readme_results.END}\nbottom\n'
  assert readme_results.replace_section(text, 'new') == f'top\n{readme_results.BEGIN}\nnew\n{readme_results.END}\nbottom\n'
  with pytest.raises(ValueError, match='results:begin'):
    readme_results.replace_section('no markers', 'new')


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
