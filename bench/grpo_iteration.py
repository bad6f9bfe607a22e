"""One GRPO iteration on the yardstick workload (the peer's peer_grpo_trl.py: TRL 1.12 GRPOTrainer, fp32).

Yardstick-shaped models (GPT-2 layout, 4/4/256, vocab 4096), fp32, random init: policy and reference (same
weights) and a reward model (`ScalarModel`, own seed). 4 prompts of 64 random tokens (no EOS, no padding) x
G = 4 samples of 64 new tokens each (T=1, no top-k/top-p; one prefill per prompt shared by its 4 rows),
RM score per response, group-normalised advantages (Bessel std + 1e-4), loss_type 'grpo' (per-sequence token
mean, then mean over responses), k3 KL in the loss with beta 0.04 (the reference is run), clip 0.2, one
AdamW update per rollout (num_iterations 1: the ratio is 1 and no extra forward is spent on old log-probs,
as TRL). EOS = 0 as the peer's; with random weights a row seldom samples it and every rollout runs all 64
steps (asserted), so the work matches the peer's `min_new_tokens=64`.

Phases, each timed with `jax.block_until_ready` (median of 5 after 1 warm-up = compile):
  iteration       `GRPOTrainer.step` (experience + update), the figure compared with TRL
  experience      `trainer.experience`: shared-prefill rollout + reference forward + RM + advantages, one jit
  update          `trainer.update`: one optimizer step (forward + backward of the policy)
  rollout         `sampling.generate(num_samples=4)` on the policy alone (the shared prefill)
  rollout_repeat  the same 16 rows with each prompt prefilled 4 times (jnp.repeat): what sharing saves

  /work/venv/bin/python -m bench.grpo_iteration [--peer]
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import common
from jax_rlhf import sampling
from jax_rlhf import sharding as shd
from jax_rlhf.config import base_config
from jax_rlhf.models.heads import ScalarModel
from jax_rlhf.models.transformer import Transformer
from jax_rlhf.models.transformer_config import preset
from jax_rlhf.train import grpo

PROMPTS, G, P, NEW, RUNS = 4, 4, 64, 64, 5
BETA = 0.04
EOS, PAD = 0, 1


def config():
  c = base_config()
  c.model.preset = 'yardstick'
  c.model.update(dtype='float32', param_dtype='float32', frozen_dtype='float32')
  c.grpo.update(iterations=100, prompts_per_step=PROMPTS, num_generations=G, max_new_tokens=NEW, estimator='grpo',
                scale_rewards='group', num_iterations=1, num_minibatches=1, clip_low=0.2, clip_high=0.2,
                aggregation='sequence', temperature=1.0, top_k=0, top_p=1.0, overlong='none',
                drop_equal_groups=False)
  c.grpo.kl.update(coef=BETA, where='loss', estimator='k3', adaptive=False)
  c.grpo.optimizer.update(lr=1e-6)  # as the peer's GRPOConfig
  return c


def main():
  args = common.parser(__doc__).parse_args()
  c = config()
  cfg = preset('yardstick')
  mesh = shd.make_mesh((1, 1, 1))
  policy = Transformer(cfg, rngs=nnx.Rngs(0))
  ref = Transformer(cfg, rngs=nnx.Rngs(0))  # the same weights as the policy
  reward = ScalarModel(cfg, rngs=nnx.Rngs(2))
  trainer = grpo.GRPOTrainer(c, mesh, policy, ref, reward, (EOS, PAD))
  st = trainer.states
  prompts_np = common.random_tokens((PROMPTS, P))
  prompts = shd.put_batch({'prompt': prompts_np, 'prompt_mask': np.ones_like(prompts_np)}, mesh)
  beta = jnp.float32(BETA)
  key = jax.random.key(0)
  rows = PROMPTS * G

  # ---------------------------------------------------------------- whole iteration: trainer.step
  compile_s = {}

  def iteration(i):
    m = trainer.step(prompts, jax.random.fold_in(key, 1000 + i), beta)
    jax.block_until_ready((m, st['policy']))
    return m

  t = time.perf_counter()
  m0 = iteration(-1)
  compile_s['step'] = time.perf_counter() - t
  common.wait_quiet(args.quiet, args.quiet_wait)
  load_before = common.load1()
  t_iter = common.time_runs(iteration, RUNS, warmup=0)

  # ---------------------------------------------------------------- the two jitted phases alone
  holder = {}

  def experience(i):
    exp, em = trainer.experience(st, prompts, jax.random.fold_in(key, 2000 + i),
                                 beta)
    jax.block_until_ready((exp, em))
    holder['exp'] = exp

  def update(i):
    st['policy'], um = trainer.update(st['policy'], holder['exp'], jax.random.fold_in(key, 3000 + i), beta)
    jax.block_until_ready((st['policy'], um))

  t_exp = common.time_runs(experience, RUNS, warmup=1)
  t_upd = common.time_runs(update, RUNS, warmup=1)
  assert holder['exp']['mask'].shape == (rows, NEW)

  # ---------------------------------------------------------------- rollout alone: shared vs repeated prefill
  gen_model = (trainer.graphdefs['policy'], nnx.merge_state(st['policy'].params, st['policy'].rest))
  kw = dict(max_new_tokens=NEW, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=EOS, pad_token_id=PAD)
  rep_prompt = jnp.repeat(prompts['prompt'], G, axis=0)
  rep_mask = jnp.repeat(prompts['prompt_mask'], G, axis=0)
  outs = []

  t_roll, t_roll_rep = [], []

  def rollouts(i):  # shared and repeated prefill alternate, so that both see the same moments of the machine
    t = time.perf_counter()
    out = sampling.generate(gen_model, prompts['prompt'], prompts['prompt_mask'], jax.random.fold_in(key, 4000 + i),
                            num_samples=G, **kw)
    jax.block_until_ready(out)
    t_roll.append(time.perf_counter() - t)
    outs.append(out)
    t = time.perf_counter()
    jax.block_until_ready(sampling.generate(gen_model, rep_prompt, rep_mask, jax.random.fold_in(key, 4000 + i), **kw))
    t_roll_rep.append(time.perf_counter() - t)

  common.time_runs(rollouts, RUNS, warmup=1)
  del t_roll[0], t_roll_rep[0], outs[0]  # the warm-up (compiles)
  assert all(int(o.num_steps) == NEW for o in outs), [int(o.num_steps) for o in outs]

  # ---------------------------------------------------------------- report
  mach = common.machine()
  S = {k: common.stats(v) for k, v in dict(iteration=t_iter, experience=t_exp, update=t_upd, rollout=t_roll,
                                           rollout_repeat=t_roll_rep).items()}
  print(f'jax_rlhf GRPO iteration fp32 prompts={PROMPTS} G={G} P={P} new={NEW} beta={BETA} loss=sequence-mean '
        f'num_iterations=1 params/model~{cfg.num_params()} jax {jax.__version__} ({mach["backend"]}, '
        f'load {mach["load"]})')
  work = {'iteration': rows * NEW, 'experience': rows * NEW, 'update': rows * NEW, 'rollout': rows * NEW,
          'rollout_repeat': rows * NEW}
  for k, s in S.items():
    print(f'  {k}: {common.fmt(s, work[k], "completion tok/s")}')
  print(f'  compile: step {compile_s["step"]:.1f}s; first iteration reward {float(m0["reward"]):.3f}, '
        f'kl {float(m0["kl"]):.2e}, response_length {float(m0["response_length"]):.1f}, '
        f'eos_fraction {float(m0["eos_fraction"]):.2f}, frac_reward_zero_std {float(m0["frac_reward_zero_std"]):.2f}')

  result = {'bench': 'grpo_iteration', 'iteration_s': S['iteration']['median'],
            'experience_s': S['experience']['median'], 'update_s': S['update']['median'],
            'rollout_s': S['rollout']['median'], 'rollout_repeat_prefill_s': S['rollout_repeat']['median'],
            'iteration_min_s': S['iteration']['min'], 'iteration_max_s': S['iteration']['max'], 'runs': RUNS,
            'compile_step_s': compile_s['step'], 'load': mach['load'], 'load_before': load_before,
            'date': mach['date']}
  if args.peer:
    common.wait_quiet(args.quiet, args.quiet_wait)
    peer_load = common.load1()
    _, peer = common.run_peer('grpo')
    trl = peer['GRPO iteration (excluding 1st as warm-up)']
    result.update({'peer_iteration_s': trl['median'], 'peer_iteration_min_s': trl['min'],
                   'ratio_vs_trl': trl['median'] / result['iteration_s'],
                   'ratio_vs_trl_best': trl['min'] / S['iteration']['min'], 'load_after_peer': common.load_avg()})
    r = result
    print(f'speed-up (theirs/ours time): vs TRL {r["ratio_vs_trl"]:.2f}x (target >= 2x: '
          f'{"met" if r["ratio_vs_trl"] >= 2 else "MISSED"}); best run vs best run {r["ratio_vs_trl_best"]:.2f}x')
    common.flag_contention(result, S['iteration'], trl, max(load_before, peer_load))
    result['peer_load_before'] = peer_load
  common.emit(result)


if __name__ == '__main__':
  main()
