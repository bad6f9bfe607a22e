"""Qwen2.5-0.5B on Anthropic HH-RLHF.

  python -m jax_rlhf.main --config configs/presets/qwen2_5_0_5b_hh.py[:variants] --workdir W

Variants (comma list): stage=<stage>, model_dir=<HF folder>, data_dir=<downloaded files>, quick; see
jax_rlhf/presets.py for the hyperparameters and where they come from.
"""
from jax_rlhf.presets import preset_config


def get_config(arg=None):
  return preset_config('qwen2.5-0.5b', 'hh', arg)
