"""Generation throughput: batch 16, prompt 64, 64 sampled new tokens (T=1, top_k=0, top_p=1), fp32.

The peer's `model.generate` (peer_generate.py) forces exactly 64 new tokens with `min_new_tokens=64`
(EOS masked out). Our sampler has no min-length option, so we keep EOS = 0 as the peer does and check
that the loop ran all 64 steps (`num_steps == 64`; it stops early only when EVERY row has emitted EOS,
which with random weights over 4096 tokens does not happen). Rows that emit EOS early keep being computed
until the loop ends (then emit pad), so the work per call is 16 x 64 decode positions either way; the
figure is 16 * 64 / time, like the peer's. The masked (real-response) token count is printed too.

Timed: one jitted `sampling.generate` call on a pre-split (graphdef, state), blocking on its output;
1 warm-up (compile) call, then median of 5.

  .venv/bin/python -m bench.generate [--peer]
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from bench import common
from jax_rlhf import sampling
from jax_rlhf.models.transformer import Transformer
from jax_rlhf.models.transformer_config import preset

B, P, NEW, RUNS = 16, 64, 64, 5
EOS, PAD = 0, 1  # the peer's ids


def main():
  args = common.parser(__doc__).parse_args()
  cfg = preset('yardstick')
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  ids = jnp.asarray(common.random_tokens((B, P)))
  mask = jnp.ones_like(ids)
  key = jax.random.key(0)
  kw = dict(max_new_tokens=NEW, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=EOS, pad_token_id=PAD)

  outs = []

  def run(i):
    out = sampling.generate((graphdef, state), ids, mask, jax.random.fold_in(key, i + 100), **kw)
    jax.block_until_ready(out)
    outs.append(out)

  t = time.perf_counter()
  run(-1)
  compile_s = time.perf_counter() - t
  common.wait_quiet(args.quiet, args.quiet_wait)
  load_before = common.load1()
  ts = common.time_runs(run, RUNS, warmup=0)
  for out in outs:
    assert int(out.num_steps) == NEW, f'the loop stopped after {int(out.num_steps)} steps, not {NEW}'
    assert out.tokens.shape == (B, NEW)
  real = sum(int(o.mask.sum()) for o in outs[1:]) / RUNS
  s = common.stats(ts)
  m = common.machine()
  print(f'jax_rlhf generate B={B} P={P} new={NEW} params={cfg.num_params()} jax {jax.__version__} '
        f'({m["backend"]}, load {m["load"]}): {common.fmt(s, B * NEW, "new tok/s")}')
  print(f'  first call (compile + run) {compile_s:.2f}s; real response tokens per call (up to EOS): {real:.0f} of {B * NEW}')

  result = {'bench': 'generate', 'tokens_per_s': B * NEW / s['median'], 'time_ms': s['median'] * 1e3,
            'min_ms': s['min'] * 1e3, 'max_ms': s['max'] * 1e3, 'runs': RUNS, 'compile_s': compile_s,
            'batch': B, 'prompt': P, 'new_tokens': NEW, 'load': m['load'], 'load_before': load_before,
            'date': m['date']}
  if args.peer:
    peer, g = common.compare_with_peer(args, result, s, 'generate', 'generate')
    result['peer_time_ms'] = g['median'] * 1e3
    print(f'ours/theirs (new tok/s): {result["ratio"]:.2f}x median, {result["ratio_best"]:.2f}x best run vs best run  '
          f'(target >= 3x: {"met" if result["ratio"] >= 3 else "MISSED"})')
    common.flag_contention(result, s, g, max(load_before, result['peer_load_before']))
  common.emit(result)


if __name__ == '__main__':
  main()
