"""Config for the `grpo` stage: `python -m jax_rlhf.main --config configs/grpo.py[:variants] --workdir W`.

Variants (comma list): quick (tests), instructgpt (the paper's hyperparameters), model=<preset>, ptx=<coef>.
Every field is documented in jax_rlhf/config.py.
"""
from jax_rlhf.config import stage_config


def get_config(arg=None):
  return stage_config('grpo', arg)
