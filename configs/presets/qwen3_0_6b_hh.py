"""Qwen3-0.6B (base) on Anthropic HH-RLHF.

  python -m jax_rlhf.main --config configs/presets/qwen3_0_6b_hh.py[:variants] --workdir W

Variants (comma list): stage=<stage>, model_dir=<HF folder>, data_dir=<downloaded files>, quick; see
jax_rlhf/presets.py for the hyperparameters and where they come from.
"""
from jax_rlhf.presets import preset_config


def get_config(arg=None):
  return preset_config('qwen3-0.6b', 'hh', arg)
