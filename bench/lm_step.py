"""LM train step: batch 16 x 128 tokens, forward + backward + AdamW, fp32 (the peer's peer_sft.py).

The peer calls `model(input_ids=x, labels=x)` on x [16, 128]: 128 positions through the model, 127
shifted targets. Our `lm.lm_loss` feeds tokens[:, :-1] and predicts tokens[:, 1:], so we hand it 129
tokens per row: the model sees the same 16 x 128 positions and the figure counts 16 * 128 tokens.
Optimizer as the peer's `torch.optim.AdamW(lr=1e-4, weight_decay=0.01)`: betas (0.9, 0.999), eps 1e-8,
decay on every parameter, no gradient clipping, constant rate. Step = `lm.jit_lm_step` (state donated),
on a (1, 1, 1) mesh. 3 warm-up steps, then median of 20; 4 different batches in rotation, as the peer.

FLOP count (stated, so that MFU can be checked by hand), per step of D = 16 * 128 tokens:
  model  = 6 * N_mm * D                    N_mm = parameters that take part in a matmul: every layer's
                                           weights + the (tied) LM head V*d; the position table (a
                                           lookup) is left out; biases and norms are in N_mm (< 1%).
  attn   = 12 * L * T * d * D              QK^T and AV, 2 * 2 * T * d per token per layer forward, x3
                                           for forward + backward; the full T x T (XLA does not skip the
                                           causal half), as PaLM's appendix B.
MFU = (model + attn) / step time / matmul peak, the peak measured here (`common.matmul_peak_flops`:
jitted 2048^3 fp32 matmul, best of 10). XLA's own count (`cost_analysis()['flops']`) is printed alongside.

  .venv/bin/python -m bench.lm_step [--peer]
"""
from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from bench import common
from jax_rlhf import sharding as shd
from jax_rlhf.models.transformer import Transformer, preset
from jax_rlhf.train import lm
from jax_rlhf.train import state as state_lib

B, T, STEPS, WARMUP = 16, 128, 20, 3
OPT = ml_collections.ConfigDict(dict(lr=1e-4, schedule='constant', end_lr_frac=1.0, warmup_steps=0, b1=0.9,
                                     b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=0.0))


def step_flops(cfg, b: int, t: int) -> tuple[float, float]:
  """(model, attention) FLOP of one forward + backward over b x t tokens (see the module docstring)."""
  n_mm = cfg.num_params() - cfg.max_len * cfg.embed_dim  # all but the position lookup table
  d = b * t
  return 6.0 * n_mm * d, 12.0 * cfg.num_layers * t * cfg.embed_dim * d


def main():
  args = common.parser(__doc__).parse_args()
  cfg = preset('yardstick')
  mesh = shd.make_mesh((1, 1, 1))
  tx = state_lib.make_optimizer(OPT, STEPS + WARMUP)
  graphdef, state, shardings = state_lib.place_state(Transformer(cfg, rngs=nnx.Rngs(0)), tx, mesh)
  step = lm.jit_lm_step(graphdef, tx, shardings, mesh)
  batches = []
  for i in range(4):
    tokens = common.random_tokens((B, T + 1), seed=i)
    ones = np.ones_like(tokens)
    batches.append(shd.put_batch({'tokens': tokens, 'attention_mask': ones, 'loss_mask': ones}, mesh))
  key = jax.random.key(0)

  xla = common.xla_flops(step, state, batches[0], key)
  peak_before = common.matmul_peak_flops()
  holder = {'state': state}

  def run(i):
    holder['state'], metrics = step(holder['state'], batches[i % 4], key)
    jax.block_until_ready((holder['state'], metrics))

  t = time.perf_counter()
  run(0)
  compile_s = time.perf_counter() - t
  common.wait_quiet(args.quiet, args.quiet_wait)
  load_before = common.load1()
  ts = common.time_runs(run, STEPS, warmup=WARMUP - 1)
  loss = float(step(holder['state'], batches[0], key)[1]['loss'])
  peak = max(peak_before, common.matmul_peak_flops())  # best of both sides of the timing

  s = common.stats(ts)
  m = common.machine()
  fl_model, fl_attn = step_flops(cfg, B, T)
  flops = fl_model + fl_attn
  achieved = flops / s['median']
  tokens = B * T
  print(f'jax_rlhf LM step fp32 B={B} T={T} params={cfg.num_params()} jax {jax.__version__} '
        f'({m["backend"]}, load {m["load"]}): {common.fmt(s, tokens, "tok/s")}')
  print(f'  first call (compile + run) {compile_s:.2f}s; loss after {STEPS + WARMUP + 1} steps {loss:.3f}')
  print(f'  FLOP/step: 6*N_mm*D {fl_model / 1e9:.2f} G + attention 12*L*T*d*D {fl_attn / 1e9:.2f} G = '
        f'{flops / 1e9:.2f} G; XLA cost_analysis: {xla / 1e9 if xla else float("nan"):.2f} G')
  print(f'  achieved {achieved / 1e9:.1f} GFLOP/s; matmul peak (2048^3 fp32, best of 10 before + 10 after) {peak / 1e9:.1f} GFLOP/s; '
        f'MFU {achieved / peak:.1%}' + (f' (by XLA count {xla / s["median"] / peak:.1%})' if xla else '')
        + f'  (target >= 50%: {"met" if achieved / peak >= 0.5 else "MISSED"})')

  result = {'bench': 'lm_step', 'tokens_per_s': tokens / s['median'], 'mfu': achieved / peak,
            'matmul_peak_flops': peak, 'step_ms': s['median'] * 1e3, 'min_ms': s['min'] * 1e3,
            'max_ms': s['max'] * 1e3, 'runs': STEPS, 'achieved_flops': achieved, 'flops_per_step': flops,
            'xla_flops_per_step': xla, 'mfu_xla_count': (xla / s['median'] / peak) if xla else None,
            'compile_s': compile_s, 'load': m['load'], 'load_before': load_before, 'date': m['date']}
  if args.peer:
    peer, p32 = common.compare_with_peer(args, result, s, 'sft', 'SFT step fp32')
    result['peer_step_ms'] = p32['median'] * 1e3
    if 'SFT step bf16' in peer:
      result['peer_bf16_tokens_per_s'] = peer['SFT step bf16']['rate']
      result['ratio_vs_bf16'] = result['tokens_per_s'] / peer['SFT step bf16']['rate']
    result['load_after_peer'] = common.load_avg()
    print(f'ours/theirs (tok/s, fp32 vs fp32): {result["ratio"]:.2f}x  '
          f'(target >= 1.5x: {"met" if result["ratio"] >= 1.5 else "MISSED"})'
          + f'; best vs best {result["ratio_best"]:.2f}x'
          + (f'; vs their bf16 autocast: {result["ratio_vs_bf16"]:.2f}x (this CPU has no native bf16: torch '
             f'emulates it, so that figure is no yardstick)' if 'ratio_vs_bf16' in result else ''))
    common.flag_contention(result, s, p32, max(load_before, result['peer_load_before']))
  common.emit(result)


if __name__ == '__main__':
  main()
