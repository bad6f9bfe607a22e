"""GPT-2 (124M) on Anthropic HH-RLHF.

  python -m jax_rlhf.main --config configs/presets/gpt2_hh.py[:variants] --workdir W

Variants (comma list): stage=<stage>, model_dir=<HF folder>, data_dir=<downloaded files>, quick; see
jax_rlhf/presets.py for the hyperparameters and where they come from.
"""
from jax_rlhf.presets import preset_config


def get_config(arg=None):
  return preset_config('gpt2', 'hh', arg)
