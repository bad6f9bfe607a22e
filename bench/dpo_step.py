"""DPO train step: 16 pairs, prompt 64 tokens, chosen and rejected 64 tokens + EOS each, fp32 AdamW, the reference
run every step (the peer's peer_dpo_trl.py: TRL DPOTrainer, sigmoid loss, beta 0.1, precompute_ref_log_probs off).

The batch is 16 rankings of K = 2 ([16, 2, 129]: prompt 64 + response 65, the layout of `scoring`), mode pairwise
(= sigmoid DPO for K = 2). One step = the reference's forward over the 32 rows (no gradient) + the policy's forward
and backward over them + AdamW, as `dpo.jit_train_step` (state donated) on a (1, 1, 1) mesh. Optimizer as TRL's
defaults (transformers TrainingArguments): AdamW lr 1e-6 (the peer's), betas (0.9, 0.999), eps 1e-8, no weight
decay, gradient clipping at global norm 1, linear decay. 3 warm-up steps, then the median of 20; 4 different
batches in rotation.

FLOP count (stated, so that MFU can be checked by hand), with R = 32 rows, T = 128 positions through the model
(the 129 tokens less the last, which predicts nothing), N = 65 response positions that need the LM head:
  policy = 6 * N_body * R*T + 6 * V*d * R*N + 12 * L * T * d * R*T     (forward + backward)
  ref    = 2 * N_body * R*T + 2 * V*d * R*N +  4 * L * T * d * R*T     (forward)
N_body = the parameters of the layers that take part in a matmul (all but the token and position tables);
the tied LM head V*d runs on the response positions only (the prompt's logits are never needed; TRL computes
them all, so the peer does more work than this count). Attention counts the full T x T, as lm_step.
MFU = (policy + ref) / step time / matmul peak, the peak measured here (`common.matmul_peak_flops`).

  /work/venv/bin/python -m bench.dpo_step [--peer]
"""
from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from bench import common
from jax_rlhf import sharding as shd
from jax_rlhf.models.transformer import Transformer
from jax_rlhf.models.transformer_config import preset
from jax_rlhf.train import dpo
from jax_rlhf.train import state as state_lib

PAIRS, P, R, STEPS, WARMUP = 16, 64, 64, 20, 3
N = R + 1  # response + EOS
OPT = ml_collections.ConfigDict(dict(lr=1e-6, schedule='linear', end_lr_frac=0.0, warmup_steps=0, b1=0.9,
                                     b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0))
DPO = ml_collections.ConfigDict(dict(beta=0.1, loss_type='sigmoid', label_smoothing=0.0, mode='pairwise'))
PEER_LABEL = 'DPO step (excluding 1st as warm-up)'


def step_flops(cfg, rows: int) -> tuple[float, float]:
  """(policy, reference) FLOP of one step over `rows` sequences (see the module docstring)."""
  t, d, v = P + N - 1, cfg.embed_dim, cfg.vocab_size
  n_body = cfg.num_params() - cfg.max_len * d - v * d
  attn = 4.0 * cfg.num_layers * t * d * rows * t  # one forward
  fwd = 2.0 * n_body * rows * t + 2.0 * v * d * rows * N + attn
  return 3 * fwd, fwd


def make_batch(seed: int, eos: int) -> dict[str, np.ndarray]:
  """16 rankings of two responses: random prompt ids (no pads) + 64 random ids + EOS; chosen first."""
  tokens = common.random_tokens((PAIRS, 2, P + N), seed)
  tokens[:, :, -1] = eos
  return {'tokens': tokens, 'attention_mask': np.ones_like(tokens),
          'ranking': np.tile([0, 1], (PAIRS, 1)).astype(np.int32),
          'valid': np.ones((PAIRS, 2), bool), 'lengths': np.full((PAIRS, 2), N, np.int32)}


def main():
  args = common.parser(__doc__).parse_args()
  cfg = preset('yardstick')
  mesh = shd.make_mesh((1, 1, 1))
  tx = state_lib.make_optimizer(OPT, STEPS + WARMUP + 1)
  graphdef, state, shardings = state_lib.place_state(Transformer(cfg, rngs=nnx.Rngs(0)), tx, mesh)
  _, ref, ref_shardings = state_lib.place_state(Transformer(cfg, rngs=nnx.Rngs(1)), None, mesh)
  step = dpo.jit_train_step(graphdef, tx, DPO, P, shardings, ref_shardings, mesh)
  batches = [shd.put_batch(make_batch(i, cfg.eos_token_id), mesh) for i in range(4)]

  xla = common.xla_flops(step, state, ref, batches[0])
  peak_before = common.matmul_peak_flops()
  holder = {'state': state}

  def run(i):
    holder['state'], metrics = step(holder['state'], ref, batches[i % 4])
    jax.block_until_ready((holder['state'], metrics))

  t = time.perf_counter()
  run(0)
  compile_s = time.perf_counter() - t
  common.wait_quiet(args.quiet, args.quiet_wait)
  load_before = common.load1()
  ts = common.time_runs(run, STEPS, warmup=WARMUP - 1)
  m_last = step(holder['state'], ref, batches[0])[1]
  peak = max(peak_before, common.matmul_peak_flops())  # best of both sides of the timing

  s = common.stats(ts)
  m = common.machine()
  fl_policy, fl_ref = step_flops(cfg, 2 * PAIRS)
  flops = fl_policy + fl_ref
  achieved = flops / s['median']
  print(f'jax_rlhf DPO step fp32 {PAIRS} pairs, prompt {P}, responses {R}+EOS, reference every step, '
        f'params={cfg.num_params()} jax {jax.__version__} ({m["backend"]}, load {m["load"]}): '
        + common.fmt(s, PAIRS, 'pairs/s'))
  print(f'  first call (compile + run) {compile_s:.2f}s; after {STEPS + WARMUP} steps: '
        f'loss {float(m_last["loss"]):.4f}, rewards/margins {float(m_last["rewards/margins"]):.4f}')
  print(f'  FLOP/step: policy fwd+bwd {fl_policy / 1e9:.2f} G + reference fwd {fl_ref / 1e9:.2f} G = '
        f'{flops / 1e9:.2f} G; XLA cost_analysis: {xla / 1e9 if xla else float("nan"):.2f} G')
  print(f'  achieved {achieved / 1e9:.1f} GFLOP/s; matmul peak (2048^3 fp32, best of 10 before + 10 after) '
        f'{peak / 1e9:.1f} GFLOP/s; MFU {achieved / peak:.1%}'
        + (f' (by XLA count {xla / s["median"] / peak:.1%})' if xla else '')
        + f'  (target >= 50%: {"met" if achieved / peak >= 0.5 else "MISSED"})')

  result = {'bench': 'dpo_step', 'step_s': s['median'], 'pairs_per_s': PAIRS / s['median'], 'mfu': achieved / peak,
            'matmul_peak_flops': peak, 'min_s': s['min'], 'max_s': s['max'], 'runs': STEPS,
            'achieved_flops': achieved, 'flops_per_step': flops, 'xla_flops_per_step': xla,
            'mfu_xla_count': (xla / s['median'] / peak) if xla else None, 'compile_s': compile_s,
            'load': m['load'], 'load_before': load_before, 'date': m['date']}
  if args.peer:
    common.wait_quiet(args.quiet, args.quiet_wait)
    result['peer_load_before'] = common.load1()
    _, peer = common.run_peer('dpo')
    p = peer[PEER_LABEL]
    result['peer_step_s'] = p['median']
    result['peer_pairs_per_s'] = PAIRS / p['median']  # its printed rate is rounded to whole pairs/s
    result['ratio'] = result['pairs_per_s'] / result['peer_pairs_per_s']
    result['ratio_best'] = p['min'] / s['min']
    result['load_after_peer'] = common.load_avg()
    print(f'ours/theirs (pairs/s, fp32 vs fp32, TRL {p["median"]:.3f} s/step): {result["ratio"]:.2f}x  '
          f'(target >= 1.2x: {"met" if result["ratio"] >= 1.2 else "MISSED"}); '
          f'best vs best {result["ratio_best"]:.2f}x')
    common.flag_contention(result, s, p, max(load_before, result['peer_load_before']))
  common.emit(result)


if __name__ == '__main__':
  main()
