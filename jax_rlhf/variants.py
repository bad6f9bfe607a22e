"""The plan of named runs and the variants of the config tree: `get_config(arg)`'s comma list.

`plan_run` makes one run of `config.plan` and `default_plan` is InstructGPT's recipe (pretrain, sft, label, rm,
ppo, eval). A variant is a function that edits the tree built by `jax_rlhf.config.base_config`: `quick` (tests),
`instructgpt` (the paper's hyperparameters), `ablation` and `compare` (plans with more runs), `cpu_bf16`, and
`rounds=N` (iterated RLHF); `apply_variants` reads the comma list `flag,key=value,...`.
"""
from __future__ import annotations

import ml_collections


def plan_run(name: str, kind: str, inputs: dict | None = None, overrides: dict | None = None
             ) -> ml_collections.ConfigDict:
  """One run of `config.plan`: its name, kind, inputs (role -> run name) and config overrides (nested dict)."""
  return ml_collections.ConfigDict(dict(name=name, kind=kind, inputs=dict(inputs or {}),
                                        overrides=dict(overrides or {})))


def default_plan() -> tuple[ml_collections.ConfigDict, ...]:
  """InstructGPT's recipe: pretrain, sft, label (SFT samples ranked by the judge), rm, ppo, eval."""
  return (plan_run('pretrain', 'pretrain'),
          plan_run('sft', 'sft', {'init': 'pretrain'}),
          plan_run('label', 'label', {'policy': 'sft'}),
          plan_run('rm', 'rm', {'init': 'sft', 'rankings': 'label'}),
          plan_run('ppo', 'ppo', {'policy': 'sft', 'reference': 'sft', 'reward': 'rm'}),
          plan_run('eval', 'eval', {'reference': 'sft', 'reward': 'rm'}))


# The run `stage=<kind>` makes for a kind the default plan does not hold, with its default inputs.
_SINGLE_RUNS = {'dpo': {'policy': 'sft', 'reference': 'sft', 'rankings': 'label'},
                'grpo': {'policy': 'sft', 'reference': 'sft', 'reward': 'rm'}}


def single_run(kind: str) -> ml_collections.ConfigDict:
  """The run named like `kind` that `stage=<kind>` makes when neither the plan nor the default plan has one."""
  return plan_run(kind, kind, _SINGLE_RUNS[kind])


def quick(c: ml_collections.ConfigDict) -> None:
  """Tiny everything: each stage in well under a minute on a CPU (tests)."""
  c.model.preset = 'tiny'
  c.log_every = 5
  c.progress = False
  c.checkpoint.every = 10
  c.task.update(n_pretrain=600, n_sft_train=300, n_sft_eval=32, n_prompts_train=128, n_prompts_eval=32)
  c.pretrain.update(steps=12, batch_size=16, eval_every=6)
  c.sft.update(steps=12, batch_size=16, eval_every=6)
  c.label.update(num_prompts=48, k_min=2, k_max=4)
  c.rm.update(batch_size=8)
  c.ppo.update(iterations=4, batch_size=8)
  c.ppo.ptx.batch_size = 8
  c.ppo.snapshot_every = 2
  c.eval.update(batch_size=32, n_pretrain_eval=32, n_snapshot_prompts=16, best_of_n=(1, 2))
  c.dpo.update(steps=4, batch_size=8)
  c.grpo.update(iterations=4, prompts_per_step=8, num_generations=4)


def instructgpt(c: ml_collections.ConfigDict) -> None:
  """InstructGPT's hyperparameters (Ouyang et al. 2022, appendix C); sizes for a real run."""
  c.sft.update(batch_size=32, dropout=0.2)
  c.sft.optimizer.update(lr=9.65e-6, schedule='cosine', end_lr_frac=0.1)
  c.rm.update(batch_size=64, epochs=1)
  c.rm.optimizer.update(lr=9e-6, schedule='cosine', end_lr_frac=0.1)
  c.ppo.update(batch_size=512, ppo_epochs=1, num_minibatches=8, temperature=1.0)
  c.ppo.kl.update(coef=0.02, adaptive=False)
  c.ppo.policy_optimizer.update(schedule='constant', warmup_steps=10)
  c.ppo.value_optimizer.update(lr=9e-6, schedule='constant', warmup_steps=10)
  c.ppo.ptx.coef = 27.8


def ablation(c: ml_collections.ConfigDict) -> None:
  """PPO, PPO-ptx and a low-beta PPO that over-optimises, from the same SFT and RM; eval compares all four.

  ptx coef 1.0 (not InstructGPT's 27.8, whose scale is that of their loss sums): on the demo the pretraining LM
  loss (~6 nats/token) already outweighs the whitened policy loss at 1. beta 0.02 is InstructGPT's value, ten
  times below the demo's default.
  """
  at = next(i for i, r in enumerate(c.plan) if r.name == 'ppo') + 1
  ppo = c.plan[at - 1].inputs.to_dict()
  c.plan = (*c.plan[:at], plan_run('ppo_lowbeta', 'ppo', ppo, {'ppo': {'kl': {'coef': 0.02}}}),
            plan_run('ppo_ptx', 'ppo', ppo, {'ppo': {'ptx': {'coef': 1.0}}}), *c.plan[at:])
  c.eval.models = policies(c.plan)


# The critic-free runs of `compare` on the demo's SFT and RM (measured there, 120 rollouts of 16 x 8):
#  * overlong 'penalty' (PPO's -1): the RM rewards a response cut at max_new_tokens, and with no penalty GRPO
#    learnt to drop the EOS (EOS fraction 1.0 -> 0.17, reverse/sort/uppercase exact 0.00);
#  * the KL as PPO's, beta 0.2 x k1 summed in the reward: in the loss (DeepSeekMath's 0.04 x k3) the KL
#    reached 8 nats per token and the gold fell to 0.15 (win vs SFT 0.30; 0.44 at beta 0.2, 0.63 at 0.5);
#  * grpo: the batch's std, not each group's (win vs SFT 0.71, as PPO's; 0.66 with the group's std, which
#    complied with unsafe requests: 0.16 refusals against 0.98);
#  * grpo_verifier: reward_mix 'first', the verifier alone where it can check: mixed half-half with the RM
#    (which cannot check lists, and decides every group with no right answer) reverse/sort/uppercase fell to 0.03.
#    With it, 40-60% of the groups had all-equal rewards (all right or all wrong): DAPO's dynamic sampling
#    (drop_equal_groups, 32 prompts sampled for 16 kept) raised gold 0.795 -> 0.821, win 0.706 -> 0.727.
#    Its win vs SFT stays below 0.80 whatever the setting (120 -> 240/480 iterations, G 16, T 1.2, lr 6e-4, KL 0.1:
#    0.722-0.739): known facts, judged by the RM alone, hold 5.3-6.0 of the 9.5-11 missing points in every run
#    (0.80 allows 3.35). The RM prefers the right value for 4 of 24 facts (SFT's own modal answer is right for 23),
#    so the policy keeps SFT's guesses (exact ~0.6); at 480 iterations the other rows together miss only 3.45.
GRPO_DEMO = {'overlong': 'penalty', 'kl': {'coef': 0.2, 'where': 'reward', 'estimator': 'k1'}}
# Online DPO as compare's dpo_online and rounds_policy=dpo_online run it: the RM judges; pairs it scores within 0.5
# are skipped and refilled from twice the prompts (its near ties are wrong by gold more often than right).
DPO_ONLINE_DEMO = {'online': True, 'beta': 1.0, 'online_min_gap': 0.5, 'online_oversample': 2}


def compare(c: ml_collections.ConfigDict) -> None:
  """After InstructGPT, side by side: from the default plan's pretrain, sft, label and rm (the same runs `make
  demo` makes), PPO and the methods that came after it, each a named run, all compared by one eval:
  dpo (offline pairwise DPO on the label run's rankings), dpo_listwise (Plackett-Luce over each whole ranking),
  dpo_online (DPO on the policy's own samples, best vs worst by the RM; pairs the RM scores within 0.5 of each
  other are skipped and refilled from twice the prompts), grpo (group-normalised advantages, the
  RM's reward), grpo_verifier (the task's checker alone where it speaks, the RM elsewhere) and rloo (leave-one-out
  baseline, the RM's reward); the three GRPO runs with `GRPO_DEMO`."""
  at = next(i for i, r in enumerate(c.plan) if r.kind == 'eval')
  sft_ref = {'policy': 'sft', 'reference': 'sft'}
  runs = (plan_run('dpo', 'dpo', {**sft_ref, 'rankings': 'label'}),
          plan_run('dpo_listwise', 'dpo', {**sft_ref, 'rankings': 'label'}, {'dpo': {'mode': 'listwise'}}),
          plan_run('dpo_online', 'dpo', {**sft_ref, 'reward': 'rm'}, {'dpo': DPO_ONLINE_DEMO}),
          plan_run('grpo', 'grpo', {**sft_ref, 'reward': 'rm'}, {'grpo': {**GRPO_DEMO, 'scale_rewards': 'batch'}}),
          plan_run('grpo_verifier', 'grpo', {**sft_ref, 'reward': 'rm'},
                   {'grpo': {**GRPO_DEMO, 'rewards': ('task:verify', 'rm'), 'reward_mix': 'first',
                             'drop_equal_groups': True}}),
          plan_run('rloo', 'grpo', {**sft_ref, 'reward': 'rm'}, {'grpo': {**GRPO_DEMO, 'estimator': 'rloo'}}))
  c.plan = (*c.plan[:at], *runs, *c.plan[at:])
  c.eval.models = policies(c.plan)


def policies(plan) -> tuple[str, ...]:
  """'sft' and every policy a plan trains (its ppo, dpo and grpo runs), in plan order: what eval compares."""
  return ('sft', *[r.name for r in plan if r.kind in ('ppo', 'dpo', 'grpo')])


def cpu_bf16(c: ml_collections.ConfigDict) -> None:
  """The CPU bf16 preset: `model.cpu_bf16=True` (see `apply_cpu_bf16`)."""
  c.model.cpu_bf16 = True


def apply_cpu_bf16(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`model.cpu_bf16`: where this process's bf16 matmuls run on the CPU's matrix unit (`jax_rlhf.kernels`: CPU
  backend, AMX-BF16, MKL built), set `model.dtype='bfloat16'` over `param_dtype='float32'`, as
  torch's CPU autocast; elsewhere (TPU, GPU, another CPU) the config is left as it is. One line says which."""
  if not c.model.get('cpu_bf16', False):
    return c
  import jax.numpy as jnp

  from jax_rlhf import kernels
  if kernels.use_mkl(jnp.bfloat16, jnp.bfloat16):
    c.model.dtype, c.model.param_dtype = 'bfloat16', 'float32'
    print('model.cpu_bf16: bfloat16 compute on the CPU matrix unit (MKL), float32 parameters', flush=True)
  else:
    print(f'model.cpu_bf16: no bf16 matrix unit reachable here; model.dtype stays {c.model.dtype}', flush=True)
  return c


ROUND_RMS = ('sft', 'last')
ROUND_POLICIES = ('ppo', 'grpo', 'dpo', 'dpo_online')


def rounds(c: ml_collections.ConfigDict, n: int, rm_init: str = 'sft', prompts: int = 0, policy_kind: str = 'ppo'
           ) -> None:
  """Iterated RLHF (InstructGPT section 3.5, HH-RLHF's weekly refresh): round 1 is the plan's own label, rm
  and ppo; each round r >= 2 adds
    label_r  samples of round r-1's policy on `prompts` fresh training prompts (default half of
             label.num_prompts: the demo's 2,000), past the earlier rounds' (label.prompt_offset), ranked by
             label.judge;
    rm_r     a reward model trained for one epoch on every ranking so far (label, label_2, ..., label_r), from the
             SFT body (rm_init='sft') or continued from rm_{r-1}, head and all (rm_init='last'); one pass over
             round 1's 4,000 and round 2's 2,000 prompts is 6,000 prompts' steps, about round 1's two epochs;
    ppo_r    the policy continued from round r-1's, with SFT as its reference (the KL anchor) and rm_r's reward
             (policy_kind='grpo': grpo_r, the same inputs; 'dpo': dpo_r, DPO on label_r's fresh rankings of
             the last policy's samples, iterative DPO; 'dpo_online': dpo_online_r, online DPO (DPO_ONLINE_DEMO)
             sampling the policy as it trains, rm_r its judge);
  and the eval compares each round's policy as model round<r> (eval.rounds). task.n_prompts_train grows to
  hold every round's prompts (the task's prompt stream is prefix-stable: round 1's prompts do not change)."""
  if n < 1:
    raise ValueError(f'rounds={n}: need at least one round')
  if rm_init not in ROUND_RMS:
    raise ValueError(f'rounds_rm={rm_init}: choose {" or ".join(ROUND_RMS)}')
  if policy_kind not in ROUND_POLICIES:
    raise ValueError(f'rounds_policy={policy_kind}: choose {", ".join(ROUND_POLICIES)}')
  names = {r.name for r in c.plan}
  if not {'sft', 'label', 'rm', 'ppo'} <= names:
    raise ValueError('rounds=N needs a plan with sft, label, rm and ppo runs')
  first = int(c.label.num_prompts)
  per = int(prompts) or max(1, first // 2)
  c.task.n_prompts_train = max(int(c.task.n_prompts_train), first + (n - 1) * per)
  at = next(i for i, r in enumerate(c.plan) if r.kind == 'eval')
  # online DPO's steps default to epochs over every training prompt, which the rounds grow: fixed at what dpo's
  # rule gives over round 1's prompts (compare's dpo_online budget), each round from an already trained policy
  steps = int(c.dpo.steps) or max(int(c.dpo.epochs) * (first // int(c.dpo.batch_size)), 1)
  online_steps = {**DPO_ONLINE_DEMO, 'steps': steps}
  runs, policy, rm, labels, rounds_ = [], 'ppo', 'rm', ['label'], ['ppo:rm:label']
  for r in range(2, n + 1):
    label = f'label_{r}'
    labels.append(label)
    runs += [plan_run(label, 'label', {'policy': policy},
                      {'label': {'prompt_offset': first + (r - 2) * per, 'num_prompts': per}}),
             plan_run(f'rm_{r}', 'rm', {'init': 'sft' if rm_init == 'sft' else rm, 'rankings': tuple(labels)},
                      {'rm': {'epochs': 1}}),
             plan_run(f'{policy_kind}_{r}', 'dpo' if policy_kind == 'dpo_online' else policy_kind,
                      {'policy': policy, 'reference': 'sft',
                       **({'rankings': label} if policy_kind == 'dpo' else {'reward': f'rm_{r}'})},
                      {'dpo': online_steps} if policy_kind == 'dpo_online' else None)]
    rounds_.append(f'{policy_kind}_{r}:rm_{r}:{label}')
    policy, rm = f'{policy_kind}_{r}', f'rm_{r}'
  c.plan = (*c.plan[:at], *runs, *c.plan[at:])
  c.eval.rounds = tuple(rounds_)
  c.eval.models = ('sft',)  # the rounds' policies join as round1 .. roundN


VARIANTS = {'quick': quick, 'instructgpt': instructgpt, 'ablation': ablation, 'compare': compare,
            'cpu_bf16': cpu_bf16}


def apply_variants(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """`arg` is a comma list: flags (`quick`) or `key=value` (`model=tiny` sets model.preset, `ptx=27.8`,
  `rounds=3` iterated RLHF with its options `rounds_rm=sft|last`, `round_prompts=M` and
  `rounds_policy=ppo|grpo|dpo|dpo_online`, applied after the rest whatever their place in the list)."""
  round_args = {}
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    if key in ('rounds', 'round_prompts') and value.isdigit():
      round_args[key] = int(value)
    elif value in {'rounds_rm': ROUND_RMS, 'rounds_policy': ROUND_POLICIES}.get(key, ()):
      round_args[key] = value
    elif not value and key in VARIANTS:
      VARIANTS[key](c)
    elif key == 'model' and value:
      c.model.preset = value
    elif key == 'ptx' and value:
      c.ppo.ptx.coef = float(value)
    else:
      known = sorted(VARIANTS) + ['model=<preset>', 'ptx=<coef>', 'rounds=<N>', 'rounds_rm=' + '|'.join(ROUND_RMS),
                                  'round_prompts=<M>', 'rounds_policy=' + '|'.join(ROUND_POLICIES)]
      raise ValueError(f'unknown config variant {item!r}; known: {", ".join(known)}')
  if round_args:
    if 'rounds' not in round_args:
      raise ValueError(f'{", ".join(sorted(round_args))} go with rounds=N')
    rounds(c, round_args['rounds'], round_args.get('rounds_rm', 'sft'), round_args.get('round_prompts', 0),
           round_args.get('rounds_policy', 'ppo'))
  return c
