"""Config for the `grpo` stage: `python -m jax_rlhf.main --config configs/grpo.py[:variants] --workdir W`.

Variants (comma list): quick (tests), model=<preset>, cpu_bf16.
Reward functions: `--config.grpo.rewards="('task:verify', 'rm')"`.
Every field is documented in jax_rlhf/config.py (the `grpo` block).
"""
from jax_rlhf.config import stage_config


def get_config(arg=None):
  return stage_config('grpo', arg)
