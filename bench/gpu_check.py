"""The parts of bench/gpu_check.sh that run in Python, one per `--part`, each printing one JSON line last.

  parity    our model vs transformers (fp32, torch on the CPU) on tiny random GPT-2, Llama 3.x (rope llama3),
            Qwen2, Qwen3 and Mistral configs, ours on the default device in float32 (matmul precision highest) and
            in bfloat16: max |logit difference| on a padded batch (fp32 must be <= 1e-4; bf16 <= 2% of the
            largest logit), and the share of positions where the greedy token agrees; then the sampler: greedy
            decoding with the KV cache against the argmax of the cache-free forward over the same tokens.
  lm        the LM train step (`lm.jit_lm_step`: forward + backward + AdamW, fp32 parameters, bf16 compute,
            scanned blocks) at a 350M Llama layout (d 1024, 24 layers, 16 heads, MLP 2816, V 32000) and at
            Llama-3.2-1B's shape (`preset('llama-3.2-1b')`); MFU = (6 N_mm D + 12 L T d D) / step time / the
            chip's dense bf16 peak (`PEAK_BF16`, the vendor's figure).
  ppo       one PPO iteration (`ppo.PPOTrainer.step`: rollout, 4 models scored, 4 epochs x 1 minibatch of policy +
            value updates) at Qwen2.5-0.5B's shape (its config.json: V 151,936, 24 layers, d 896, 14/2 heads,
            MLP 4864, qkv bias, tied), bf16 compute, 64 prompts x 128 tokens, 128 new tokens.
  grpo      one GRPO iteration at the same shape: 16 prompts x 8 samples, 128 + 128 tokens.
  generate  `sampling.generate` at the same shape, bf16: 64 prompts x 128 tokens, 256 new tokens; tokens/s.

  python -m bench.gpu_check --part parity|lm|ppo|grpo|generate [--part ...] [--small]

`--small` runs every part at tiny shapes (a CPU check of the code paths, tests/test_bench_scripts.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import common

# Dense bf16 peak per chip (no sparsity), FLOP/s, from the vendors' datasheets.
PEAK_BF16 = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L4': 121e12, 'TPU v5p': 459e12, 'TPU v5 lite': 197e12,
             'TPU v4': 275e12, 'TPU v6 lite': 918e12}
QWEN25_05B = dict(vocab_size=151936, num_layers=24, num_heads=14, num_kv_heads=2, embed_dim=896, mlp_dim=4864,
                  max_len=32768, layout='llama', activation='silu', norm_eps=1e-6, rope_theta=1000000.0,
                  qkv_bias=True, tie_embeddings=True, eos_token_id=0, pad_token_id=1, bos_token_id=0)
SMALL = dict(vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, mlp_dim=128, max_len=256,
             layout='llama', activation='silu', qkv_bias=True, eos_token_id=0, pad_token_id=1, bos_token_id=0)
SIZES = {'lm': (16, 2048), 'ppo': (64, 128, 128), 'grpo': (16, 128, 128), 'generate': (64, 128, 256)}
SMALL_SIZES = {'lm': (4, 32), 'ppo': (4, 8, 8), 'grpo': (2, 8, 8), 'generate': (4, 8, 8)}
LLAMA_350M = dict(vocab_size=32000, num_layers=24, num_heads=16, embed_dim=1024, mlp_dim=2816, max_len=4096,
                  layout='llama', activation='silu', tie_embeddings=False, eos_token_id=0, pad_token_id=1)


def peak_flops() -> tuple[str, float | None]:
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_BF16.items():
    if name.lower() in kind.lower():
      return kind, flops
  return kind, None


def _timed(fn, runs: int, warmup: int = 1) -> tuple[float, float]:
  """(first call s, median of `runs` later calls s, after `warmup` - 1 more); fn blocks on its results."""
  t = time.perf_counter()
  fn()
  first = time.perf_counter() - t
  return first, statistics.median(common.time_runs(lambda i: fn(), runs, warmup=warmup - 1))


# ---------------------------------------------------------------------------------------------------- parity

def _hf_models(tmp: str) -> dict[str, str]:
  """Tiny random transformers models saved as HF folders: {family: path}."""
  import torch
  import transformers as tr
  torch.manual_seed(0)
  common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
  models = {
      'gpt2': tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                               bos_token_id=0, eos_token_id=0)),
      'llama3': tr.LlamaForCausalLM(tr.LlamaConfig(**common, rope_theta=500000.0, rope_scaling=dict(
          rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=32))),
      'qwen2': tr.Qwen2ForCausalLM(tr.Qwen2Config(**common, tie_word_embeddings=True)),
      'qwen3': tr.Qwen3ForCausalLM(tr.Qwen3Config(**common, head_dim=32)),
      'mistral': tr.MistralForCausalLM(tr.MistralConfig(**common, sliding_window=8)),
  }
  out = {}
  for name, m in models.items():
    with torch.no_grad():  # random weights of a visible scale (the default init gives near-flat logits)
      for p in m.parameters():
        if p.ndim > 1:
          p.normal_(0.0, 0.08)
    out[name] = os.path.join(tmp, name)
    m.eval().save_pretrained(out[name])
  return out


def part_parity(small: bool) -> dict:
  del small  # tiny models either way
  import tempfile

  import torch
  import transformers as tr
  from flax import nnx

  from jax_rlhf import sampling
  from jax_rlhf.models import hf
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 256, (3, 24)).astype(np.int64)
  mask = np.ones_like(ids)
  mask[0, :7] = 0  # left padding
  mask[1, 20:] = 0  # right padding
  results, ok = {}, True
  with tempfile.TemporaryDirectory() as tmp:
    for name, path in _hf_models(tmp).items():
      ref = tr.AutoModelForCausalLM.from_pretrained(path).eval()
      positions = np.maximum(np.cumsum(mask, -1) - 1, 0)  # ours come from the mask; GPT-2's default is arange
      with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   position_ids=torch.tensor(positions)).logits.float().numpy()
      real = mask.astype(bool)
      row = {}
      for dtype in ('float32', 'bfloat16'):
        with jax.default_matmul_precision('highest' if dtype == 'float32' else 'default'):
          model = hf.load_pretrained(path, dtype=dtype, param_dtype=dtype)
          got = np.asarray(jax.jit(lambda m, i, a: m(i, a))(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))
          diff = float(np.abs(got - want)[real].max())
          agree = float((got.argmax(-1) == want.argmax(-1))[real].mean())
          tol = 1e-4 if dtype == 'float32' else 0.02 * float(np.abs(want[real]).max())
          # the sampler: greedy decode with the KV cache vs argmax of the cache-free forward on its own tokens
          prompt, pmask = jnp.asarray(ids[:, :12], jnp.int32), jnp.asarray(np.ones((3, 12), np.int32))
          out = sampling.generate(nnx.split(model), prompt, pmask, jax.random.key(0), max_new_tokens=8,
                                  temperature=0.0, top_k=0, top_p=1.0, eos_token_id=-1, pad_token_id=1)
          seq = jnp.concatenate([prompt, out.tokens], 1)
          full = np.asarray(model(seq, jnp.ones_like(seq)))[:, 11:-1].argmax(-1)
          sampler_agree = float((np.asarray(out.tokens) == full).mean())
        passed = diff <= tol and sampler_agree >= (1.0 if dtype == 'float32' else 0.9)
        ok &= passed
        row[dtype] = dict(max_abs_diff=diff, tol=tol, greedy_agree=agree, sampler_agree=sampler_agree, ok=passed)
      results[name] = row
  return {'part': 'parity', 'ok': bool(ok), 'device': jax.devices()[0].device_kind, 'families': results}


# ---------------------------------------------------------------------------------------------------- timings

def _lm_step(cfg, b: int, t: int, steps: int) -> dict:
  import ml_collections
  from flax import nnx

  from jax_rlhf import sharding as shd
  from jax_rlhf.models.transformer import Transformer
  from jax_rlhf.train import lm
  from jax_rlhf.train import state as state_lib
  opt = ml_collections.ConfigDict(dict(lr=1e-4, schedule='constant', end_lr_frac=1.0, warmup_steps=0, b1=0.9,
                                       b2=0.95, eps=1e-8, weight_decay=0.01, grad_clip=1.0))
  mesh = shd.make_mesh((1, 1, 1))
  tx = state_lib.make_optimizer(opt, steps + 5)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  params = jax.jit(lambda: nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))[1])()
  graphdef, state, shardings = state_lib.place_state(nnx.merge(graphdef, params), tx, mesh)
  step = lm.jit_lm_step(graphdef, tx, shardings, mesh)
  tokens = np.random.default_rng(0).integers(2, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  batch = shd.put_batch({'tokens': tokens, 'attention_mask': np.ones_like(tokens), 'loss_mask': np.ones_like(tokens)},
                        mesh)
  holder = {'state': state}

  def run():
    holder['state'], m = step(holder['state'], batch, jax.random.key(0))
    jax.block_until_ready(m)
    holder['loss'] = float(m['loss'])

  first, median = _timed(run, steps, warmup=2)
  # parameters in a matmul: all of them (a tied embedding is the head), less an untied model's input lookup
  n_mm = cfg.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.embed_dim)
  flops = 6.0 * n_mm * b * t + 12.0 * cfg.num_layers * t * cfg.embed_dim * b * t
  kind, peak = peak_flops()
  return dict(params=cfg.num_params(), batch=b, seq_len=t, remat=cfg.remat, first_step_s=first, step_s=median,
              tokens_per_s=b * t / median, tflops=flops / median / 1e12,
              mfu=(flops / median / peak) if peak else None, loss=holder['loss'], device=kind)


def part_lm(small: bool) -> dict:
  from jax_rlhf.models.transformer_config import TransformerConfig, preset
  common = dict(dtype='bfloat16', param_dtype='float32', scan_layers=True)
  b, t = (SMALL_SIZES if small else SIZES)['lm']
  big = TransformerConfig(**SMALL, **common) if small else preset('llama-3.2-1b', **common)
  out = {'350m': _lm_step(TransformerConfig(**(SMALL if small else LLAMA_350M), **common, remat='none'), b, t,
                          2 if small else 10),
         '1b': _lm_step(big.replace(remat='dots_saveable'), b, t, 2 if small else 10)}
  return {'part': 'lm', 'peak_bf16_flops': peak_flops()[1], **out}


def _rl_config(kind: str, b: int, p: int, new: int):
  from jax_rlhf.config import stage_config
  c = stage_config(kind)
  c.model.update(dtype='bfloat16', param_dtype='float32', frozen_dtype='bfloat16', scan_layers=True)
  c.data.max_prompt_len = p
  if kind == 'ppo':
    c.ppo.update(batch_size=b, max_new_tokens=new, ppo_epochs=4, num_minibatches=1, temperature=1.0)
    c.ppo.ptx.coef = 0.0
  else:
    c.grpo.update(prompts_per_step=b, num_generations=8, max_new_tokens=new, temperature=1.0)
  return c


def part_ppo(small: bool) -> dict:
  from flax import nnx

  from jax_rlhf import sharding as shd
  from jax_rlhf.models.heads import ScalarModel
  from jax_rlhf.models.transformer import Transformer
  from jax_rlhf.models.transformer_config import TransformerConfig
  from jax_rlhf.train import ppo
  b, p, new = (SMALL_SIZES if small else SIZES)['ppo']
  c = _rl_config('ppo', b, p, new)
  cfg = TransformerConfig(**(SMALL if small else QWEN25_05B), dtype='bfloat16', param_dtype='float32', scan_layers=True)
  mesh = shd.make_mesh((1, 1, 1))
  models = {'policy': Transformer(cfg, rngs=nnx.Rngs(0)), 'reference': Transformer(cfg, rngs=nnx.Rngs(0)),
            'value': ScalarModel(cfg, rngs=nnx.Rngs(1)), 'reward': ScalarModel(cfg, rngs=nnx.Rngs(2))}
  trainer = ppo.PPOTrainer(c, mesh, models, (0, 1))
  prompts_np = np.random.default_rng(0).integers(2, cfg.vocab_size, (b, p)).astype(np.int32)
  prompts = shd.put_batch({'prompt': prompts_np, 'prompt_mask': np.ones_like(prompts_np)}, mesh)
  beta, key, i = jnp.float32(0.05), jax.random.key(0), [0]

  def run():
    i[0] += 1
    m = trainer.step(prompts, None, jax.random.fold_in(key, i[0]), beta)
    jax.block_until_ready((m, trainer.states['policy']))

  first, median = _timed(run, 3)
  return {'part': 'ppo', 'params': cfg.num_params(), 'prompts': b, 'prompt_len': p, 'new_tokens': new,
          'first_iteration_s': first, 'iteration_s': median, 'episodes_per_s': b / median,
          'device': jax.devices()[0].device_kind}


def part_grpo(small: bool) -> dict:
  from flax import nnx

  from jax_rlhf import sharding as shd
  from jax_rlhf.models.heads import ScalarModel
  from jax_rlhf.models.transformer import Transformer
  from jax_rlhf.models.transformer_config import TransformerConfig
  from jax_rlhf.train import grpo
  b, p, new = (SMALL_SIZES if small else SIZES)['grpo']
  c = _rl_config('grpo', b, p, new)
  cfg = TransformerConfig(**(SMALL if small else QWEN25_05B), dtype='bfloat16', param_dtype='float32', scan_layers=True)
  mesh = shd.make_mesh((1, 1, 1))
  trainer = grpo.GRPOTrainer(c, mesh, Transformer(cfg, rngs=nnx.Rngs(0)), Transformer(cfg, rngs=nnx.Rngs(0)),
                             ScalarModel(cfg, rngs=nnx.Rngs(2)), (0, 1))
  prompts_np = np.random.default_rng(0).integers(2, cfg.vocab_size, (b, p)).astype(np.int32)
  prompts = shd.put_batch({'prompt': prompts_np, 'prompt_mask': np.ones_like(prompts_np)}, mesh)
  beta, key, i = jnp.float32(c.grpo.kl.coef), jax.random.key(0), [0]

  def run():
    i[0] += 1
    m = trainer.step(prompts, jax.random.fold_in(key, i[0]), beta)
    jax.block_until_ready((m, trainer.states['policy']))

  first, median = _timed(run, 3)
  return {'part': 'grpo', 'params': cfg.num_params(), 'prompts': b, 'generations': 8, 'prompt_len': p,
          'new_tokens': new, 'first_iteration_s': first, 'iteration_s': median,
          'samples_per_s': b * 8 / median, 'device': jax.devices()[0].device_kind}


def part_generate(small: bool) -> dict:
  from flax import nnx

  from jax_rlhf import sampling
  from jax_rlhf.models.transformer import Transformer
  from jax_rlhf.models.transformer_config import TransformerConfig
  b, p, new = (SMALL_SIZES if small else SIZES)['generate']
  cfg = TransformerConfig(**(SMALL if small else QWEN25_05B), dtype='bfloat16', param_dtype='bfloat16',
                          scan_layers=True)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  state = jax.jit(lambda: nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))[1])()
  ids = jnp.asarray(np.random.default_rng(0).integers(2, cfg.vocab_size, (b, p)), jnp.int32)
  kw = dict(max_new_tokens=new, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=-1, pad_token_id=1)

  def run():
    jax.block_until_ready(sampling.generate((graphdef, state), ids, jnp.ones_like(ids), jax.random.key(0), **kw))

  first, median = _timed(run, 3)
  return {'part': 'generate', 'params': cfg.num_params(), 'batch': b, 'prompt_len': p, 'new_tokens': new,
          'first_call_s': first, 'call_s': median, 'new_tokens_per_s': b * new / median,
          'device': jax.devices()[0].device_kind}


PARTS = {'parity': part_parity, 'lm': part_lm, 'ppo': part_ppo, 'grpo': part_grpo, 'generate': part_generate}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--part', required=True, choices=sorted(PARTS), action='append',
                 help='repeat it to run several parts in this one process, one JSON line each, in order')
  p.add_argument('--small', action='store_true', help='tiny shapes: check the code path (CPU)')
  args = p.parse_args()
  for part in args.part:
    common.emit({**PARTS[part](args.small), 'small': args.small})


if __name__ == '__main__':
  main()
