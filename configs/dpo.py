"""Config for the `dpo` stage: `python -m jax_rlhf.main --config configs/dpo.py[:variants] --workdir W`.

Variants (comma list): quick (tests), instructgpt (the paper's hyperparameters), model=<preset>, ptx=<coef>.
Offline (default): trains on the rankings of W/label (or data.rankings) by dpo.mode. Online:
`--config.dpo.online=True` trains on the policy's own samples ranked by W/rm (dpo.online_judge=rm) or by the
task's labeler (dpo.online_judge=task); the run is still named dpo. Every field is documented in
jax_rlhf/config.py.
"""
from jax_rlhf.config import stage_config


def get_config(arg=None):
  return stage_config('dpo', arg)
