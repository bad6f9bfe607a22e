"""The memory plan (jax_rlhf/plan.py): exact per-device bytes from the config's model, and the CLI's JSON line."""
import json
import os
import subprocess
import sys

import pytest

from jax_rlhf import plan as plan_lib
from jax_rlhf.config import stage_config
from jax_rlhf.models import transformer_config
from jax_rlhf.train.common import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(stage, arg, **mesh):
  c = stage_config(stage, arg)
  c.mesh.update(mesh)
  return c


def test_gpt2_param_bytes_equal_the_config_count():
  """GPT-2 124M on 8 devices: replicated (data mesh), each device holds exactly num_params() fp32 values and Adam's
  two moments of each (+ the step counters); under fsdp=8 each holds between 1/8 and 1/4 of it (norms and biases
  stay replicated)."""
  cfg = transformer_config.preset('gpt2')
  p = plan_lib.make_plan(_config('sft', 'model=gpt2', data=-1, fsdp=1), 8, 'v5e', compile=False)['sft']
  assert p['param_count'] == cfg.num_params() == 124_439_808
  assert p['param_bytes'] == 4 * cfg.num_params()
  assert 0 <= p['optimizer_bytes'] - 2 * p['param_bytes'] < 64  # mu, nu + a few int32 counters
  assert p['temp_bytes'] is None and p['fits']
  f = plan_lib.make_plan(_config('sft', 'model=gpt2', data=1, fsdp=-1), 8, 'v5e', compile=False)['sft']
  assert f['param_count'] == cfg.num_params()
  assert p['param_bytes'] / 8 <= f['param_bytes'] < p['param_bytes'] / 4


def test_ppo_frozen_models_in_their_dtype():
  """PPO's reference (LM) and reward (scalar model) are frozen in model.frozen_dtype: 2 bytes a value in bf16."""
  c = _config('ppo', 'quick')
  c.model.frozen_dtype = 'bfloat16'
  p = plan_lib.make_plan(c, 8, 'h100', compile=False)['ppo']
  cfg = transformer_config.preset('tiny')
  scalar = cfg.num_params(lm_head=False) + cfg.embed_dim + 1  # body + head kernel and bias
  assert p['param_count'] == cfg.num_params() + scalar  # policy + value
  assert p['frozen_bytes'] == 2 * (cfg.num_params() + scalar + 2) + 2 * 4  # + the RM's norm gain/bias, two steps


def test_mistakes_are_one_line():
  with pytest.raises(UserError, match='--chip'):
    plan_lib.make_plan(_config('sft', 'quick'), 8, 'v9')
  with pytest.raises(UserError, match='sft.batch_size=12 must be divisible'):
    c = _config('sft', 'quick')
    c.sft.batch_size = 12
    plan_lib.make_plan(c, 8, 'v5e', compile=False)


def test_cli_compiles_and_ends_in_json():
  """`python -m jax_rlhf.plan` sets its own device count (4 here, though the test process has 8), compiles the
  SFT step and prints one JSON line last."""
  env = {**os.environ, 'PYTHONPATH': ROOT}
  out = subprocess.run([sys.executable, '-m', 'jax_rlhf.plan', '--config', 'configs/sft.py:quick', '--devices', '4',
                        '--chip', 'v5e'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert "'data': 4" in lines[0] and '| sft | sft |' in out.stdout and 'fits' in out.stdout
  sft = json.loads(lines[-1])['sft']
  assert sft['param_count'] == transformer_config.preset('tiny').num_params()
  assert sft['param_bytes'] == 4 * sft['param_count']
  assert sft['temp_bytes'] > 0 and sft['fits'] is True
  assert sft['total_bytes'] >= sft['param_bytes'] + sft['optimizer_bytes'] + sft['temp_bytes']
  bad = subprocess.run([sys.executable, '-m', 'jax_rlhf.plan', '--config', 'configs/sft.py:quick', '--devices', '3',
                        '--chip', 'v5e', '--compile=false'], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith('error: sft.batch_size=16')


def test_llama_3_8b_shape_and_model_path(tmp_path):
  """The llama-3-8b preset has Meta-Llama-3-8B's 8,030,261,248 parameters; a `model.path` plans its config.json."""
  assert transformer_config.preset('llama-3-8b').num_params() == 8_030_261_248
  from jax_rlhf.models import hf_config
  cfg = transformer_config.preset('demo')
  (tmp_path / 'config.json').write_text(json.dumps(hf_config.config_to_hf(cfg)))
  c = _config('sft', 'quick')
  c.model.path = str(tmp_path)
  p = plan_lib.make_plan(c, 8, 'v4', compile=False)['sft']
  assert p['param_count'] == cfg.num_params() and p['param_bytes'] == 4 * cfg.num_params()


def test_grpo_is_planned_with_its_frozen_models_and_compiles():
  """GRPO: the policy trained (param + Adam), the reference and the RM frozen (in frozen_dtype); without the KL
  and the RM reward, no frozen model. Both functions compile, activations pinned under fsdp."""
  c = _config('grpo', 'quick', data=1, fsdp=-1)
  c.model.frozen_dtype = 'bfloat16'
  p = plan_lib.make_plan(c, 8, 'h100')['grpo']
  cfg = transformer_config.preset('tiny')
  scalar = cfg.num_params(lm_head=False) + cfg.embed_dim + 1
  assert p['kind'] == 'grpo' and p['param_count'] == cfg.num_params()
  assert p['frozen_bytes'] >= 2 * (cfg.num_params() + scalar) / 8  # ref + RM, bf16, sharded at most 8 ways
  assert set(p['functions']) == {'experience', 'update'} and p['temp_bytes'] > 0 and p['fits']
  c.grpo.kl.coef = 0.0
  c.grpo.rewards = ('task:verify',)
  q = plan_lib.make_plan(c, 8, 'h100', compile=False)['grpo']
  assert q['frozen_bytes'] == 0 and q['param_count'] == p['param_count']


def test_config_remat_and_scan_reach_the_plan():
  """model.remat / model.scan_layers from the config tree: a scanned, rematerialised LM step needs less temporary
  memory than the plain one (the same parameters, exactly)."""
  c = _config('sft', 'quick', data=1, fsdp=-1)
  plain = plan_lib.make_plan(c, 8, 'v5e')['sft']
  c.model.update(remat='full', scan_layers=True)
  lean = plan_lib.make_plan(c, 8, 'v5e')['sft']
  assert lean['param_bytes'] == plain['param_bytes'] and lean['param_count'] == plain['param_count']
  assert lean['temp_bytes'] < plain['temp_bytes']


@pytest.mark.parametrize('stage', ['ppo', 'grpo', 'dpo'])
def test_lora_plan_trains_adapters_and_keeps_one_base(stage):
  """With model.lora the trained parameters are the adapters (and the value model's head), the base weights sit
  in the trained models' non-trained variables, and there is no reference copy: the frozen bytes drop by the
  reference's; the steps compile with the adapters-off reference."""
  c = _config(stage, 'quick', data=1, fsdp=-1)
  full = plan_lib.make_plan(c, 8, 'h100', compile=False)[stage]
  c.model.lora.rank = 4
  p = plan_lib.make_plan(c, 8, 'h100')[stage]
  cfg = transformer_config.preset('tiny')
  assert p['param_count'] < full['param_count'] / 10
  assert p['rest_bytes'] > 4 * cfg.num_params() / 8 * 0.99  # the policy's base, fp32, split at most 8 ways
  ref_bytes = 4 * cfg.num_params() // 8  # one fp32 LM split 8 ways (the tiny vocab divides)
  assert full['frozen_bytes'] - p['frozen_bytes'] >= ref_bytes * 0.99
  assert p['optimizer_bytes'] < full['optimizer_bytes'] / 2 and p['temp_bytes'] > 0  # small adapters: some replicated
