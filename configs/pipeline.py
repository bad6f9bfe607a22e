"""Config for the `pipeline` stage: `python -m jax_rlhf.main --config configs/pipeline.py[:variants] --workdir W`.

Variants (comma list): quick (tests), instructgpt (the paper's hyperparameters), cpu_bf16 (bf16 compute on
the CPU's AMX unit, fp32 weights; off by default), model=<preset>, ptx=<coef>, rounds=<N> (iterated RLHF: N
rounds of fresh rankings of the last policy's samples, RM retrained on all of them, PPO continued; options
rounds_rm=sft|last, round_prompts=<M> fresh prompts per round, rounds_policy=ppo|grpo|dpo|dpo_online).
Every field is documented in jax_rlhf/config.py.
"""
from jax_rlhf.config import stage_config


def get_config(arg=None):
  return stage_config('pipeline', arg)
