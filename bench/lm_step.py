"""LM train step: batch 16 x 128 tokens, forward + backward + AdamW, fp32 (the peer's peer_sft.py).

`--dtype bfloat16`: bf16 compute over fp32 master weights (`model.dtype='bfloat16'`), the projections and the
tied head on the CPU's AMX unit through MKL (`jax_rlhf.kernels`), against the peer's `peer_sft.py bf16` (torch
CPU autocast, bf16 on oneDNN's AMX path); MFU is then against the measured bf16 peak (MKL 2048^3, bf16 in,
fp32 out), and the step is also timed with the GEMM forced off (`JAX_RLHF_BF16_GEMM=xla`: XLA's bf16 dot).

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

  .venv/bin/python -m bench.lm_step [--peer] [--dtype bfloat16]
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from bench import common
from jax_rlhf import sharding as shd
from jax_rlhf.models.transformer import Transformer
from jax_rlhf.models.transformer_config import preset
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


def time_step(cfg, label: str) -> tuple[list[float], float, float, object, object]:
  """(step wall times, compile s, loss after, the jitted step, its first batch's args) for `cfg`."""
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
  args = (state, batches[0], key)
  holder = {'state': state}

  def run(i):
    holder['state'], metrics = step(holder['state'], batches[i % 4], key)
    jax.block_until_ready((holder['state'], metrics))

  t = time.perf_counter()
  run(0)
  compile_s = time.perf_counter() - t
  ts = common.time_runs(run, STEPS, warmup=WARMUP - 1)
  loss = float(step(holder['state'], batches[0], key)[1]['loss'])
  print(f'  [{label}] {common.fmt(common.stats(ts), B * T, "tok/s")}', flush=True)
  return ts, compile_s, loss, step, args


def main():
  args = common.add_dtype_arg(common.parser(__doc__)).parse_args()
  bf16 = args.dtype == 'bfloat16'
  cfg = preset('yardstick', dtype=args.dtype, param_dtype='float32')
  pdt = jnp.bfloat16 if bf16 else jnp.float32
  peak_before = common.matmul_peak_flops(dtype=pdt)
  xla_bf16 = None
  if bf16:
    from jax_rlhf import kernels
    path = 'MKL (AMX)' if kernels.use_mkl(jnp.bfloat16, jnp.bfloat16) else 'XLA (no AMX here)'
    with kernels.mode('xla'):  # the same bf16 step on XLA's dot, timed first (interleaved: ours, xla, ours)
      xla_bf16 = time_step(cfg, 'bf16 on XLA dot')[0]
  common.wait_quiet(args.quiet, args.quiet_wait)
  load_before = common.load1()
  ts, compile_s, loss, step, step_args = time_step(cfg, f'bf16 on {path}' if bf16 else 'fp32')
  if bf16:
    with kernels.mode('xla'):
      xla_bf16 += time_step(cfg, 'bf16 on XLA dot')[0]
  xla = common.xla_flops(step, *step_args)
  peak = max(peak_before, common.matmul_peak_flops(dtype=pdt))  # best of both sides of the timing

  s = common.stats(ts)
  m = common.machine()
  fl_model, fl_attn = step_flops(cfg, B, T)
  flops = fl_model + fl_attn
  achieved = flops / s['median']
  tokens = B * T
  tag = 'bf16 (fp32 master weights)' if bf16 else 'fp32'
  peak_name = f'bf16 {path}' if bf16 else 'fp32'
  print(f'jax_rlhf LM step {tag} B={B} T={T} params={cfg.num_params()} jax {jax.__version__} '
        f'({m["backend"]}, load {m["load"]}): {common.fmt(s, tokens, "tok/s")}')
  print(f'  first call (compile + run) {compile_s:.2f}s; loss after {STEPS + WARMUP + 1} steps {loss:.3f}')
  print(f'  FLOP/step: 6*N_mm*D {fl_model / 1e9:.2f} G + attention 12*L*T*d*D {fl_attn / 1e9:.2f} G = '
        f'{flops / 1e9:.2f} G; XLA cost_analysis: {xla / 1e9 if xla else float("nan"):.2f} G')
  print(f'  achieved {achieved / 1e9:.1f} GFLOP/s; matmul peak (2048^3 {peak_name}, best of 10 before + 10 after) '
        f'{peak / 1e9:.1f} GFLOP/s; MFU {achieved / peak:.1%}'
        + (f' (by XLA count {xla / s["median"] / peak:.1%})' if xla else '')
        + f'  (target >= 50%: {"met" if achieved / peak >= 0.5 else "MISSED"})')

  result = {'bench': 'lm_step', 'dtype': args.dtype, 'tokens_per_s': tokens / s['median'], 'mfu': achieved / peak,
            'matmul_peak_flops': peak, 'step_ms': s['median'] * 1e3, 'min_ms': s['min'] * 1e3,
            'max_ms': s['max'] * 1e3, 'runs': STEPS, 'achieved_flops': achieved, 'flops_per_step': flops,
            'xla_flops_per_step': xla, 'mfu_xla_count': (xla / s['median'] / peak) if xla else None,
            'compile_s': compile_s, 'load': m['load'], 'load_before': load_before, 'date': m['date']}
  if bf16:
    sx = common.stats(xla_bf16)
    result.update(gemm_path=path, xla_bf16_tokens_per_s=tokens / sx['median'], xla_bf16_step_ms=sx['median'] * 1e3,
                  speedup_vs_xla_bf16=sx['median'] / s['median'])
    print(f'  the same bf16 step on XLA\'s dot (GEMM forced off, {sx["runs"]} runs around ours): {common.fmt(sx, tokens)}'
          f'; ours {result["speedup_vs_xla_bf16"]:.2f}x that')
  if args.peer:
    label = 'SFT step bf16' if bf16 else 'SFT step fp32'
    peer, pp = common.compare_with_peer(args, result, s, 'sft', label)
    result['peer_step_ms'] = pp['median'] * 1e3
    other = 'SFT step fp32' if bf16 else 'SFT step bf16'
    if other in peer:
      key = 'fp32' if bf16 else 'bf16'
      result[f'peer_{key}_tokens_per_s'] = peer[other]['rate']
      result[f'ratio_vs_{key}'] = result['tokens_per_s'] / peer[other]['rate']
    result['load_after_peer'] = common.load_avg()
    kind = 'bf16 vs their bf16 autocast' if bf16 else 'fp32 vs fp32'
    goal = 1.5
    print(f'ours/theirs (tok/s, {kind}): {result["ratio"]:.2f}x  '
          f'(target >= {goal}x: {"met" if result["ratio"] >= goal else "MISSED"})'
          + f'; best vs best {result["ratio_best"]:.2f}x'
          + (f'; vs their fp32: {result["ratio_vs_fp32"]:.2f}x' if 'ratio_vs_fp32' in result else '')
          + (f'; vs their bf16 autocast: {result["ratio_vs_bf16"]:.2f}x' if 'ratio_vs_bf16' in result else ''))
    common.flag_contention(result, s, pp, max(load_before, result['peer_load_before']))
  common.emit(result)


if __name__ == '__main__':
  main()
