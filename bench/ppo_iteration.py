"""One PPO iteration on the yardstick workload (the peer's peer_ppo_trl.py fp32 and peer_ppo_manual.py).

Four yardstick-shaped models (GPT-2 layout, 4/4/256, vocab 4096), fp32, random init: policy and reference
(same weights), value and reward (`ScalarModel`, own seeds). Batch 16 prompts of 64 random tokens (no EOS,
no padding), 64 sampled new tokens (T=1, no top-k/top-p), k1 KL penalty beta=0.05, GAE (gamma 1, lam 0.95),
whitened advantages, then 4 epochs x 1 minibatch of clipped policy + value loss with AdamW on both.
EOS = 0 as the peer's; with random weights a row seldom samples it and the loop never stops early (checked:
every row is computed for all 64 steps either way), so the work matches the peer's `min_new_tokens=64`.

Phases, each timed with `jax.block_until_ready` (median of 5 after 1 warm-up = compile):
  iteration   `PPOTrainer.step` (experience + update), the figure compared with TRL
  experience  `trainer.experience`: rollout + scoring (policy, ref, value, reward forwards) + GAE, one jit
  update      `trainer.update`: 4 epochs x 1 minibatch in one `lax.scan` (policy and value states donated)
  rollout     `sampling.generate` on the policy alone (same sampler, own jit): compare with the peer's rollout
  scoring     the experience step's forwards + GAE alone, jitted here from the library's functions
              (`scoring.response_logprobs`, `scoring.response_values`, `scoring.reward_at_last`, `rl.*`) on a fixed
              rollout: compare with the peer's scoring

`--dtype bfloat16`: all four models compute in bf16 over fp32 weights (`model.dtype='bfloat16'`), their
projections and heads on the CPU's AMX unit through MKL (`jax_rlhf.kernels`); with `--peer` the TRL run is then
`peer_ppo_trl.py defaults` (TRL's PPOConfig defaults: bf16 autocast with gradient checkpointing), run by the
peer's venv right after `run.sh ppo`.

`--lora R` (R > 0): LoRA of rank R (alpha 2R, every projection) on the policy and the value model (`models.lora`):
only the adapters and the value head train, and the reference is the policy's own base with the adapters off (no
fourth model in memory). The JSON line then also carries the memory: trained-parameter, optimizer-state and
frozen bytes of the device states (exact, from the arrays), and the process's peak RSS. `--preset gpt2` with
`--batch/--prompt/--new/--epochs/--runs` times a smaller workload on GPT-2 124M (random init).

  .venv/bin/python -m bench.ppo_iteration [--peer] [--dtype bfloat16] [--lora R] [--preset gpt2 --batch 4 ...]
"""
from __future__ import annotations

import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import common
from jax_rlhf import rl, sampling
from jax_rlhf import sharding as shd
from jax_rlhf.config import stage_config
from jax_rlhf.models import lora, scoring
from jax_rlhf.models.heads import ScalarModel
from jax_rlhf.models.transformer import Transformer
from jax_rlhf.models.transformer_config import preset
from jax_rlhf.train import ppo, rollout

B, P, NEW, EPOCHS, RUNS = 16, 64, 64, 4, 5
EOS, PAD = 0, 1


def config(dtype: str = 'float32', preset_name: str = 'yardstick'):
  c = stage_config('ppo')
  c.model.preset = preset_name
  c.model.update(dtype=dtype, param_dtype='float32', frozen_dtype='float32')
  c.data.max_prompt_len = P
  c.ppo.update(batch_size=B, max_new_tokens=NEW, ppo_epochs=EPOCHS, num_minibatches=1, iterations=100,
               temperature=1.0, top_k=0, top_p=1.0)
  c.ppo.ptx.coef = 0.0
  c.ppo.kl.update(coef=0.05, adaptive=False)
  return c


def scoring_fn(trainer):
  """The experience step's scoring half (4 forwards, KL-shaped rewards, GAE, whitening) as its own jit."""
  graphdefs, ppo_config = trainer.graphdefs, trainer.ppo_config

  def score(states, seq, att, mask, beta):
    p = seq.shape[1] - mask.shape[1]
    model = {name: rollout.merge(graphdefs[name], states.get(name, states['policy'])) for name in graphdefs}
    logp, _ = scoring.response_logprobs(model['policy'], seq, att, p, 1.0)
    ref_logp, _ = scoring.response_logprobs(model['reference'], seq, att, p, 1.0)
    values = scoring.response_values(model['value'], seq, att, p)
    s = scoring.reward_at_last(model['reward'], seq, att)
    rewards, _ = rl.kl_shaped_rewards(logp, ref_logp, s, mask, beta, ppo_config.kl.estimator)
    adv, ret = rl.gae(rewards, values, mask, ppo_config.gamma, ppo_config.lam)
    return rl.masked_whiten(adv, mask), ret, logp

  return jax.jit(score)


def run_trl_defaults() -> dict:
  """`peer_ppo_trl.py defaults` (TRL's own defaults: bf16 autocast, gradient checkpointing) in the peer's venv
  (made by `run.sh ppo` just before); its 'PPO iteration' summary line."""
  import os
  import subprocess
  peer_dir = os.environ.get('PEER_DIR', '/tmp/peer')
  script = os.path.join(os.path.dirname(common.PEER_RUN), 'peer_ppo_trl.py')
  env = {**os.environ, 'PEER_DIR': peer_dir, 'TRL_EXPERIMENTAL_SILENCE': '1', 'ITERS': '6'}
  print('[peer] running peer_ppo_trl.py defaults ...', flush=True)
  proc = subprocess.run([os.path.join(peer_dir, 'venv', 'bin', 'python'), script, 'defaults'], capture_output=True,
                        text=True, env=env)
  for line in (proc.stdout + proc.stderr).splitlines():
    if 'PPO iteration' in line and common.parse_summary(line):
      print('[peer]   ' + line)
      return common.parse_summary(line)
  raise RuntimeError(f'peer_ppo_trl.py defaults printed no PPO iteration line:\n{(proc.stdout + proc.stderr)[-3000:]}')


def tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def memory(states: dict) -> dict:
  """Bytes of the device states: trained parameters, optimizer state, frozen (everything else)."""
  trained = sum(tree_bytes(states[n].params) for n in ppo.TRAINED)
  opt = sum(tree_bytes(states[n].opt_state) for n in ppo.TRAINED)
  total = sum(tree_bytes(s) for s in states.values())
  return {'trained_param_bytes': trained, 'optimizer_bytes': opt, 'frozen_bytes': total - trained - opt,
          'state_bytes': total, 'trained_params': sum(tree_bytes(states[n].params) // 4 for n in ppo.TRAINED)}


def main():
  global B, P, NEW, EPOCHS, RUNS
  p = common.add_dtype_arg(common.parser(__doc__))
  p.add_argument('--lora', type=int, default=0, metavar='R', help='LoRA rank on policy and value (0: full fine-tuning)')
  p.add_argument('--preset', default='yardstick', help='model preset (yardstick | gpt2 | ...), random init')
  p.add_argument('--batch', type=int, default=B)
  p.add_argument('--prompt', type=int, default=P)
  p.add_argument('--new', type=int, default=NEW)
  p.add_argument('--epochs', type=int, default=EPOCHS)
  p.add_argument('--runs', type=int, default=RUNS)
  args = p.parse_args()
  B, P, NEW, EPOCHS, RUNS = args.batch, args.prompt, args.new, args.epochs, args.runs
  c = config(args.dtype, args.preset)
  c.model.lora.update(rank=args.lora, alpha=2.0 * args.lora, targets='all')
  cfg = preset(args.preset, dtype=args.dtype, param_dtype='float32', eos_token_id=EOS, pad_token_id=PAD)
  mesh = shd.make_mesh((1, 1, 1))
  policy = Transformer(cfg, rngs=nnx.Rngs(0))
  value = ScalarModel(cfg, rngs=nnx.Rngs(1))
  reward = ScalarModel(cfg, rngs=nnx.Rngs(2))
  if args.lora:  # adapters on policy and value; the reference is the policy's base (no model of its own)
    lcfg = lora.LoRAConfig(rank=args.lora, alpha=2.0 * args.lora, targets=('all',))
    lora.add(policy, lcfg)
    lora.add(value, lcfg, seed=1)
    ref = None
  else:
    ref = Transformer(cfg, rngs=nnx.Rngs(0))  # the same weights as the policy
  trainer = ppo.PPOTrainer(c, mesh, {'policy': policy, 'value': value, 'reference': ref, 'reward': reward},
                           (EOS, PAD))
  del policy, value, ref, reward
  st = trainer.states
  mem = memory(trainer.states)
  prompts_np = common.random_tokens((B, P))
  prompts = shd.put_batch({'prompt': prompts_np, 'prompt_mask': np.ones_like(prompts_np)}, mesh)
  beta = jnp.float32(c.ppo.kl.coef)
  key = jax.random.key(0)
  n_params = cfg.num_params()

  # ---------------------------------------------------------------- whole iteration: trainer.step
  compile_s = {}

  def iteration(i):
    m = trainer.step(prompts, None, jax.random.fold_in(key, 1000 + i), beta)
    jax.block_until_ready((m, st['policy'], st['value']))
    return m

  t = time.perf_counter()
  m0 = iteration(-1)
  compile_s['step'] = time.perf_counter() - t
  common.wait_quiet(args.quiet, args.quiet_wait)
  load_before = common.load1()
  t_iter = common.time_runs(iteration, RUNS, warmup=0)

  # ---------------------------------------------------------------- the two jitted phases alone
  exp_holder = {}

  def experience(i):
    exp, em = trainer.experience(st, prompts, jax.random.fold_in(key, 2000 + i), beta)
    jax.block_until_ready((exp, em))
    exp_holder['exp'], exp_holder['metrics'] = exp, em

  def update(i):
    trained, um = trainer.update(trainer.trained(), exp_holder['exp'], None, jax.random.fold_in(key, 3000 + i))
    st.update(trained)
    jax.block_until_ready((st['policy'], st['value'], um))

  t_exp = common.time_runs(experience, RUNS, warmup=1)
  t_upd = common.time_runs(update, RUNS, warmup=1)
  exp = exp_holder['exp']
  assert exp['mask'].shape == (B, NEW)

  # ---------------------------------------------------------------- rollout alone, scoring alone
  gen_model = (trainer.graphdefs['policy'], nnx.merge_state(st['policy'].params, st['policy'].rest))
  outs = []

  def sample(i):
    out = sampling.generate(gen_model, prompts['prompt'], prompts['prompt_mask'], jax.random.fold_in(key, 4000 + i),
                            max_new_tokens=NEW, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=EOS,
                            pad_token_id=PAD)
    jax.block_until_ready(out)
    outs.append(out)

  t = time.perf_counter()
  sample(-1)
  compile_s['generate'] = time.perf_counter() - t
  t_roll = common.time_runs(sample, RUNS, warmup=0)
  assert all(int(o.num_steps) == NEW for o in outs), [int(o.num_steps) for o in outs]

  score = scoring_fn(trainer)

  def scoring(i):
    jax.block_until_ready(score(st, exp['seq'], exp['att'], exp['mask'], beta))

  t_score = common.time_runs(scoring, RUNS, warmup=1)

  # ---------------------------------------------------------------- report
  mach = common.machine()
  S = {k: common.stats(v) for k, v in dict(iteration=t_iter, experience=t_exp, update=t_upd, rollout=t_roll,
                                           scoring=t_score).items()}
  print(f'jax_rlhf PPO iteration {args.dtype} B={B} P={P} new={NEW} epochs={EPOCHS} minibatches=1 params/model~{n_params} '
        f'jax {jax.__version__} ({mach["backend"]}, load {mach["load"]})')
  work = {'iteration': B * (P + NEW), 'experience': B * (P + NEW), 'update': B * (P + NEW) * EPOCHS,
          'rollout': B * NEW, 'scoring': B * (P + NEW)}
  for k, s in S.items():
    print(f'  {k}: {common.fmt(s, work[k], "tok/s")}')
  print(f'  update per epoch (update / {EPOCHS}): {S["update"]["median"] / EPOCHS * 1e3:.1f} ms; experience '
        f'{S["experience"]["median"] * 1e3:.0f} ms vs rollout + scoring {(S["rollout"]["median"] + S["scoring"]["median"]) * 1e3:.0f} ms '
        f'(separate jits, timed at other moments: compare loosely)')
  print(f'  compile: step {compile_s["step"]:.1f}s, generate {compile_s["generate"]:.1f}s; '
        f'first iteration kl {float(m0["kl"]):.3f}, response_length {float(m0["response_length"]):.1f}, '
        f'eos_fraction {float(m0["eos_fraction"]):.2f}')

  result = {'bench': 'ppo_iteration', 'dtype': args.dtype, 'iteration_s': S['iteration']['median'],
            'experience_s': S['experience']['median'], 'update_s': S['update']['median'],
            'rollout_s': S['rollout']['median'], 'scoring_s': S['scoring']['median'],
            'update_epoch_s': S['update']['median'] / EPOCHS,
            'iteration_min_s': S['iteration']['min'], 'iteration_max_s': S['iteration']['max'], 'runs': RUNS,
            'compile_step_s': compile_s['step'], 'load': mach['load'], 'load_before': load_before,
            'date': mach['date'], 'preset': args.preset, 'lora_rank': args.lora, 'batch': B, 'prompt': P,
            'new': NEW, 'epochs': EPOCHS, **mem,
            'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
  print(f'  memory: trained params {mem["trained_param_bytes"] / 2**20:.1f} MiB, '
        f'optimizer {mem["optimizer_bytes"] / 2**20:.1f} MiB, frozen {mem["frozen_bytes"] / 2**20:.1f} MiB, all states {mem["state_bytes"] / 2**20:.1f} MiB; peak RSS '
        f'{result["peak_rss_bytes"] / 2**20:.0f} MiB')
  if args.peer:
    common.wait_quiet(args.quiet, args.quiet_wait)
    peer_load = common.load1()
    _, peer = common.run_peer('ppo')
    trl = peer['PPO iteration']
    manual = peer['iteration (rollout+scoring+4 updates)']
    result.update({
        'peer_iteration_s': trl['median'], 'peer_manual_iteration_s': manual['median'],
        'peer_rollout_s': peer['rollout']['median'], 'peer_scoring_s': peer['scoring']['median'],
        'peer_update_epoch_s': peer['update x1']['median'],
        'ratio_vs_trl': trl['median'] / result['iteration_s'],
        'ratio_vs_trl_best': trl['min'] / S['iteration']['min'],
        'ratio_vs_manual_best': manual['min'] / S['iteration']['min'],
        'ratio_vs_manual': manual['median'] / result['iteration_s'],
        'ratio_rollout': peer['rollout']['median'] / result['rollout_s'],
        'ratio_scoring': peer['scoring']['median'] / result['scoring_s'],
        'ratio_update_epoch': peer['update x1']['median'] / result['update_epoch_s'],
        'load_after_peer': common.load_avg()})
    r = result
    print(f'speed-up (theirs/ours time): vs TRL {r["ratio_vs_trl"]:.2f}x (target >= 2.5x: '
          f'{"met" if r["ratio_vs_trl"] >= 2.5 else "MISSED"}), vs hand-written torch {r["ratio_vs_manual"]:.2f}x; '
          f'rollout {r["ratio_rollout"]:.2f}x, scoring {r["ratio_scoring"]:.2f}x, one update epoch '
          f'{r["ratio_update_epoch"]:.2f}x; best run vs best run: vs TRL {r["ratio_vs_trl_best"]:.2f}x, '
          f'vs hand-written {r["ratio_vs_manual_best"]:.2f}x')
    common.flag_contention(result, S['iteration'], trl, max(load_before, peer_load))
    result['peer_load_before'] = peer_load
    if args.dtype == 'bfloat16':
      trl_bf16 = run_trl_defaults()
      result.update(peer_trl_defaults_iteration_s=trl_bf16['median'],
                    ratio_vs_trl_defaults=trl_bf16['median'] / result['iteration_s'],
                    ratio_vs_trl_defaults_best=trl_bf16['min'] / S['iteration']['min'])
      print(f'speed-up vs TRL defaults (bf16 autocast + gradient checkpointing): '
            f'{result["ratio_vs_trl_defaults"]:.2f}x (target >= 2.5x: '
            f'{"met" if result["ratio_vs_trl_defaults"] >= 2.5 else "MISSED"}); best vs best '
            f'{result["ratio_vs_trl_defaults_best"]:.2f}x')
  common.emit(result)


if __name__ == '__main__':
  main()
