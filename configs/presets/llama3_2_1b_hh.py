"""Llama-3.2-1B on Anthropic HH-RLHF.

  python -m jax_rlhf.main --config configs/presets/llama3_2_1b_hh.py[:variants] --workdir W

Variants (comma list): stage=<stage>, model_dir=<HF folder>, data_dir=<downloaded files>, quick; see
jax_rlhf/presets.py for the hyperparameters and where they come from.
"""
from jax_rlhf.presets import preset_config


def get_config(arg=None):
  return preset_config('llama-3.2-1b', 'hh', arg)
