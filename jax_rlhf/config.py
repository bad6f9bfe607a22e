"""The one config tree every stage reads; `stage_config(stage, arg)` is it with the variants `arg` names.

`configs/<stage>.py` call `stage_config(stage, arg)`. Each field says its unit and, where one exists, the
paper's value (InstructGPT = Ouyang et al. 2022; N+ = Huang et al. 2024; Ziegler = Ziegler et al. 2019).
Defaults are sized for the embedded task on a 2-core CPU (`make demo` in minutes); the variants
(jax_rlhf/variants.py, with the plan's runs) change them: `instructgpt` sets the paper's hyperparameters;
`quick` shrinks everything for tests.
"""
from __future__ import annotations

import ml_collections

from jax_rlhf import variants
from jax_rlhf.variants import apply_variants, default_plan

# `from jax_rlhf.config import plan_run, stage_config`: the README's plan of your own.
plan_run = variants.plan_run

# The kinds of run a plan holds (jax_rlhf/pipeline.py); `stage` is one of them or 'pipeline' (the whole plan).
KINDS = ('pretrain', 'sft', 'label', 'rm', 'ppo', 'eval', 'dpo', 'grpo')
STAGES = (*KINDS, 'pipeline')


def _optimizer(lr, schedule='cosine', warmup=0, eps=1e-8):
  return ml_collections.ConfigDict(dict(
      lr=lr,                 # peak learning rate
      schedule=schedule,     # cosine (to end_lr_frac) | linear (to 0) | constant (after warm-up)
      end_lr_frac=0.1,       # cosine floor as a fraction of peak (InstructGPT SFT/RM: 10%)
      warmup_steps=warmup,   # linear warm-up steps
      b1=0.9,                # Adam beta1 (InstructGPT 0.9)
      b2=0.95,               # Adam beta2 (InstructGPT 0.95)
      eps=eps,               # Adam eps (PPO: 1e-5, TF-style, Ziegler/N+)
      weight_decay=0.0,      # decoupled weight decay
      grad_clip=1.0,         # global-norm clip; 0 disables
  ))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = 'pipeline'          # pretrain | sft | label | rm | ppo | eval: that run of the plan alone | pipeline: all
  c.seed = 0                    # every random choice of a run derives from it
  c.log_every = 25              # steps between metric writes
  c.progress = True             # tqdm bar on stderr

  c.model = ml_collections.ConfigDict(dict(
      preset='demo',            # tiny | demo | yardstick | gpt2 | gpt2-medium (used when path is empty)
      path='',                  # a Hugging Face folder to start pretraining/SFT from instead of a random init
      dtype='float32',          # compute dtype (bfloat16 on TPU/GPU)
      param_dtype='float32',    # parameter dtype
      frozen_dtype='float32',   # PPO's frozen reference and reward models may be held in bfloat16
      cpu_bf16=False,           # CPU with AMX-BF16 + MKL: compute in bfloat16 on the matrix unit, fp32 weights
      remat='none',             # activation checkpointing per block in training: none | full (keep each block's input,
                                # recompute the rest) | dots_saveable (keep the matmul outputs); pair with scan_layers
      scan_layers=False,        # blocks stacked on a 'layers' axis and run by one lax.scan: one compile per block
  ))
  # LoRA (models/lora.py) on every model a post-training stage trains (SFT, RM, PPO policy + value, DPO, GRPO):
  # only the adapters (and a scalar head) train; the reference is the policy's base with the adapters off.
  c.model.lora = ml_collections.ConfigDict(dict(
      rank=0,                   # 0: off (full fine-tuning)
      alpha=16.0,               # scale alpha / rank
      dropout=0.0,              # on the adapters' input (SFT, where a dropout key reaches the model)
      targets='all',            # comma-separated subset of q,k,v,o,gate,up,down (gpt2: up = c_fc, down = c_proj)
      export='merged',          # merged: W/<run>/hf holds W0 + scale A B | peft: also W/<run>/peft, a PEFT adapter
  ))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))  # device mesh; -1 = the remaining devices

  # The embedded task (jax_rlhf/tasks) and its knobs, which the task validates; '' = none (sources from data.*).
  # instruct_world's knobs are `WorldConfig` fields (these are its defaults) and the sizes of its files.
  c.task = ml_collections.ConfigDict(dict(
      name='instruct_world',    # the embedded task; its files are written to W/data
      seed=0,                   # the world's seed (entities, facts, prompts)
      demo_error_rate=0.6,      # fraction of wrong demonstrations, so SFT is imperfect
      rank_noise=0.515,         # labeler noise (Gumbel scale), calibrated to 73% inter-labeler agreement
      refusal_of_safe_score=0.0,  # gold score of refusing a safe request or declining a task
      decline_fraction=0.8,     # share of wrong task / known-fact demonstrations that decline
      min_items=2, max_items=4,  # operand lengths of the helpful tasks (items)
      n_pretrain=40000,         # pretraining lines
      n_sft_train=51200,        # demonstrations for SFT (1,200 steps x 64 see each 1.5 times)
      n_sft_eval=256,           # held-out demonstrations (SFT's held-out loss)
      n_prompts_train=4000,     # prompts for labelling and PPO
      n_prompts_eval=1000,      # held-out prompts for the eval stage
  ))

  c.data = ml_collections.ConfigDict(dict(
      tokenizer='',             # tokenizer folder; empty: the task's
      pad_token='',             # added when the tokenizer has no pad distinct from EOS (GPT-2, Qwen2.5 base); the
                                # model's embedding grows to fit it (N+ #3: '[PAD]')
      max_prompt_len=18,        # prompt tokens; longer prompts are cut from the left (counted). instruct_world: <= 18
      max_response_len=7,       # response tokens incl. EOS; longer ones are cut from the right (counted). world: <= 7
      seq_len=64,               # pretraining sequence length
      on_error='raise',         # raise: a bad record stops the run (file:line: what) | skip: skipped and counted
      # Sources (jax_rlhf/data/sources.py), one string each, the same for every stage: jsonl:PATH,
      # tfds:NAME[:SPLIT], hh_rlhf:DIR, tldr_sft:DIR, tldr_comparisons:DIR, rankings:DIR. Empty: the task's files.
      demonstrations='',        # SFT demonstrations (a ranking source gives its best response)
      rankings='',              # RM rankings; empty: the rankings of the RM's `rankings` input run (or rm.data)
      prompts='',               # PPO and eval prompts (any source with prompts)
      pretrain='',              # text for pretraining, PPO-ptx and the eval's alignment tax
      tfds_dir='',              # where builders write array_record and tfds: datasets live; '' = ~/tensorflow_datasets
      eval_fraction=0.05,       # held out (the first records) of a source without a held-out split
      chat_template='auto',     # auto: prompts through the tokenizer's chat template when it has one | off
      cut_prompts=True,         # True: long prompts cut from the left (DESIGN); False: a bad record (file:line)
      pack_sft=False,           # SFT: pack demonstrations into full rows of max_prompt_len + max_response_len
  ))

  c.checkpoint = ml_collections.ConfigDict(dict(
      every=200,                # steps between checkpoints (and one at the end)
      keep=2,                   # checkpoints kept per stage
      async_save=True,          # orbax writes in the background while training goes on
  ))
  c.guards = ml_collections.ConfigDict(dict(
      max_nonfinite_in_row=10,  # a NaN/Inf gradient skips its update (counted); this many in a row stop the run
                                # (checked at log and checkpoint steps), leaving the last good checkpoint
  ))

  c.pretrain = ml_collections.ConfigDict(dict(
      steps=300,                # train steps (~3.6 epochs of the demo corpus)
      batch_size=64,            # sequences per step
      eval_every=150,           # steps between evaluations of held-out LM loss
      dropout=0.0,              # residual dropout
      optimizer=_optimizer(3e-3, warmup=50),
  ))

  c.sft = ml_collections.ConfigDict(dict(
      init='pretrain',          # pretrain: start from W/pretrain; hf: from model.path; scratch: random init
      steps=1200,               # train steps, 1.5 epochs of the demo's 51,200 (InstructGPT: 16 epochs of ~13k)
      batch_size=64,            # demonstrations per step (InstructGPT: 32)
      eval_every=400,           # steps between evaluations of held-out demonstration loss
      dropout=0.0,              # residual dropout (InstructGPT SFT: 0.2)
      optimizer=_optimizer(1e-3, warmup=20),
  ))

  c.label = ml_collections.ConfigDict(dict(
      judge='task',             # who ranks the samples (jax_rlhf/judges.py): task (the task's noisy labeler) |
                                # rm:RUN (the reward model of that run of the workdir ranks: self-labelling) |
                                # lm:PATH (a causal LM folder judges every pair under a constitution principle)
      num_prompts=4000,         # prompts whose samples get ranked (InstructGPT: ~33k)
      prompts='',               # their source (as data.prompts: jsonl:PATH, hh_rlhf:DIR, ...); '' = data.prompts,
                                # else the task's training prompts
      prompt_offset=0,          # the first training prompt labelled: a later round's label run takes fresh ones
      k_min=4, k_max=9,         # responses per prompt, K uniform in [k_min, k_max] (InstructGPT: 4-9)
      temperature=1.0,          # sampling temperature of the ranked responses
      batch_size=256,           # responses per sampling call
      # ---- the lm: judge (jax_rlhf/judges.py; Constitutional AI, Bai et al. 2022b; RLAIF, Lee et al. 2023)
      constitution='',          # principles, one per line, one drawn at random per comparison; '' = the packaged
                                # jax_rlhf/constitution.txt
      judge_template=('Consider a request and two responses to it.\n{principle}\n\nRequest: {prompt}\n'
                      'Response (A): {a}\nResponse (B): {b}\n\nWhich response is better? Answer A or B.'),
                                # the judge's question ({principle}, {prompt}, {a}, {b}); it goes through the judge
                                # tokenizer's chat template (as the user turn) when it has one and data.chat_template
                                # is auto, then judge_answer_prefix follows
      judge_answer_prefix='\nAnswer: (',  # text after the question (after the assistant turn's start with a chat
                                # template); the next token is read
      judge_options=('A', 'B'),  # the two option tokens (each one token of the judge's tokenizer)
      judge_rank='bt',          # K-way ranking from all pairs: bt (Bradley-Terry fit to the soft preferences) |
                                # wins (expected win counts)
      judge_max_len=512,        # judge prompt tokens (longer ones are cut from the left, counted)
      judge_batch_size=64,      # judge prompts per forward pass
  ))

  c.rm = ml_collections.ConfigDict(dict(
      data='',                  # a ranking JSONL to train on instead of the `rankings` input run's
      eval_fraction=0.1,        # held-out rankings for pairwise accuracy
      epochs=2,                 # passes over the rankings (InstructGPT: 1, more overfits on 33k prompts)
      batch_size=32,            # prompts per step; all K responses of a prompt in one step (InstructGPT: 64)
      margin=0.0,               # loss -log sigmoid(r_w - r_l - margin)
      centering_coef=0.0,       # c * mean((r_w + r_l)^2) (TRL's 0.01)
      normalize=True,           # bias so that reference demonstrations score mean 0 (InstructGPT)
      normalize_gain=True,      # also a gain so SFT samples score std 1 (Ziegler, N+ #15; RLHF_DETAILS: off)
      soft_labels=True,         # rankings that carry a judge's soft preferences ('prefs', P(i beats j)) train on the
                                # soft Bradley-Terry target (losses.soft_ranking_loss); False: on the ranking alone
      optimizer=_optimizer(1e-3, warmup=5),
  ))

  c.ppo = ml_collections.ConfigDict(dict(
      iterations=120,           # experience batches (InstructGPT: 256k episodes / 512)
      batch_size=64,            # prompts (episodes) per iteration (InstructGPT: 512)
      ppo_epochs=4,             # passes over each batch (N+/TRL: 4; InstructGPT: 1)
      num_minibatches=1,        # minibatches per epoch (N+/TRL: 1; InstructGPT: 8)
      clip=0.2,                 # policy ratio clip
      vf_clip=0.2,              # value clip
      vf_coef=0.1,              # value loss coefficient
      gamma=1.0,                # GAE discount
      lam=0.95,                 # GAE lambda
      temperature=1.0,          # sampling temperature; log-probs use logits / T (InstructGPT 1; N+ 0.7)
      top_k=0, top_p=1.0,       # no filtering (InstructGPT, N+)
      max_new_tokens=7,         # response tokens sampled (a response without EOS by then gets the penalty)
      apply_missing_eos_penalty=True,  # a response without EOS gets missing_eos_penalty instead of its RM score
      missing_eos_penalty=-1.0, # score of a response without EOS (N+: -1)
      whiten_rewards=False,     # whiten rewards without shifting the mean (N+ #24)
      whiten_advantages=True,   # advantages mean 0, var 1 over valid tokens
      ratio_threshold=10.0,     # skip a minibatch whose mean ratio pi/pi_old exceeds this (TRL's ratio_threshold)
      value_from='rm',          # rm: separate value model from the RM (InstructGPT, N+); sft: from the SFT body
      kl=ml_collections.ConfigDict(dict(
          coef=0.2,             # beta, the KL penalty's coefficient (InstructGPT 0.02; N+ 0.05)
          adaptive=False,       # Ziegler's adaptive controller
          init=0.15,            # adaptive: initial beta
          target=6.0,           # adaptive: target KL per episode (nats)
          horizon=10000,        # adaptive: horizon in episodes
          estimator='k1',       # k1 (logp - logp_ref) | k3
      )),
      ptx=ml_collections.ConfigDict(dict(
          coef=0.0,             # gamma_ptx; 0 = plain PPO (InstructGPT PPO-ptx: 27.8)
          batch_size=32,        # pretraining sequences per update
      )),
      policy_optimizer=_optimizer(3e-4, schedule='linear', eps=1e-5),
      value_optimizer=_optimizer(1e-3, schedule='linear', eps=1e-5),
      snapshot_every=15,        # iterations between policy snapshots in W/<run>/snapshots/<iteration> (HF folders,
                                # ~4 MB each on the demo) that eval scores for the over-optimisation curve; 0: none
  ))

  # GRPO and its critic-free family (jax_rlhf/train/grpo.py; ../shared/POSTTRAINING_DETAILS.md section 2).
  c.grpo = ml_collections.ConfigDict(dict(
      iterations=120,           # rollouts (each followed by num_iterations x num_minibatches updates)
      prompts_per_step=16,      # prompts (groups) per rollout that the update sees
      num_generations=8,        # G samples per prompt, one shared prefill (TRL 8; DeepSeekMath 64; DAPO 16)
      rewards=('rm',),          # reward functions, each 'name[:weight]' (weight > 0, default 1): rm (the reward model)
                                # | task:verify (the task's exact checker; None = no opinion) | task:gold (the labeler's
                                # own score: an oracle, for bounds) | module.path:function
                                # (a user's (prompts, responses) -> list[float], on the host). Mixed per response
                                # as sum w_k s_k / sum w_k over the functions that spoke (0 where none did)
      reward_mix='mean',        # mean: the weight-normalised mean of the functions that spoke | first: the first listed
                                # function that spoke decides alone (a verifier where it can check, the RM elsewhere)
      estimator='grpo',         # grpo (group-normalised) | dr_grpo (no std) | rloo (leave-one-out) | reinforce_pp
      scale_rewards='group',    # grpo: divide by the group's std | batch (the batch's std) | none (= dr_grpo)
      adv_eps=1e-4,             # grpo: added to the std (TRL 1e-4)
      reinforce_pp_baseline=True,  # reinforce_pp: subtract the group's mean return first (verl REINFORCE++-baseline)
      num_iterations=1,         # updates per rollout, ratio against the rollout's frozen log-probs (TRL mu 1)
      num_minibatches=1,        # minibatches per update pass over the rollout
      clip_low=0.2,             # ratio clip below 1 (TRL/DeepSeekMath 0.2; GSPO 3e-4)
      clip_high=0.2,            # ratio clip above 1 (TRL: = clip_low; DAPO 0.28; GSPO 4e-4)
      aggregation='token',      # token (token mean: DAPO, TRL default) | sequence (DeepSeekMath eq. 3) | constant
                                # (sum / (rows x max_new_tokens): Dr. GRPO)
      ratio_level='token',      # token | sequence (GSPO: exp of the mean token log-ratio)
      temperature=1.0,          # sampling temperature; log-probs use logits / T (TRL 1.0)
      top_k=0, top_p=1.0,       # no filtering (the ratio assumes the unfiltered distribution)
      max_new_tokens=7,         # response tokens sampled; a response without EOS by then is "overlong"
      overlong='none',          # none | mask (drop overlong responses from the loss: DAPO) | penalty
      overlong_penalty=-1.0,    # overlong='penalty': the reward of a response without EOS
      drop_equal_groups=False,  # DAPO dynamic sampling: groups whose rewards are all equal (no gradient) are
                                # replaced by groups of extra prompts, inside a fixed compiled batch
      oversample=2,             # drop_equal_groups: prompts sampled per rollout = prompts_per_step x oversample
      kl=ml_collections.ConfigDict(dict(
          coef=0.04,            # beta (DeepSeekMath 0.04; TRL 0.0 since v0.18; DAPO/GSPO 0); 0 skips the reference
          where='loss',         # loss (beta x kl per token in the loss: GRPO) | reward (r - beta sum_t kl: RLOO);
                                # reinforce_pp always puts a per-token KL in the reward
          estimator='k3',       # k1 | k2 | k3 per token (DeepSeekMath eq. 4 and TRL: k3; reward side: k1 or k3)
          adaptive=False,       # beta follows Ziegler's rule toward `target` (rl.adaptive_loss_beta_update)
          target=0.05,          # adaptive: target KL in nats per token (the loss-side token mean)
          horizon=10000,        # adaptive: horizon in responses (Ziegler 10000)
      )),
      optimizer=_optimizer(3e-4, schedule='constant', eps=1e-5),  # demo-sized lr; TRL/DeepSeekMath 1e-6 on real LMs
  ))

  c.eval = ml_collections.ConfigDict(dict(
      temperature=1.0,          # sampling temperature of the compared models
      batch_size=100,           # prompts per sampling call
      max_new_tokens=7,
      n_pretrain_eval=512,      # held-out pretraining lines for the alignment tax
      models=('sft', 'ppo'),    # runs compared (each a workdir subfolder with an HF export)
      best_of_n=(1, 2, 4, 8, 16),  # best-of-n of SFT samples picked by the RM (the RM's ceiling, Gao et al.);
                                # () skips it. Costs max(n) samples per eval prompt
      n_snapshot_prompts=100,   # held-out prompts scoring each PPO snapshot (over-optimisation curve); 0: none
      report_samples=20,        # held-out prompts shown in W/eval/report.{md,html} with SFT and PPO responses
      max_prompts=0,            # held-out prompts evaluated; 0 = all
      rounds=(),                # iterated RLHF (variant rounds=N): per round 'policy:rm:label' runs; each round's
                                # policy is compared as model round<r>, and per round the new and the old RM's
                                # agreement with the gold labeler on the previous policy's samples is measured
      round_samples=4,          # samples per held-out prompt of each round's sampling policy for those agreements
      # ---- public benchmarks per compared model (jax_rlhf/benchmarks/); each '' / () / 0 = off
      truthfulqa='',            # TruthfulQA mc_task.json or TruthfulQA.csv: MC1/MC2 as lm-eval (0-shot, QA primer)
      toxicity_prompts='',      # RealToxicityPrompts prompts.jsonl: expected max toxicity, toxicity probability
      toxicity_scorer='',       # HF sequence-classification folder (P(toxic) per text) or module:function
      toxicity_n=100,           # prompts used (the first n of the file, after the challenging filter)
      toxicity_challenging=False,  # only prompts marked challenging (RTP's hard subset)
      toxicity_respectful=False,   # prefix InstructGPT's "polite, respectful, and unbiased" instruction
      toxicity_samples=25,      # samples per prompt (RTP: 25)
      toxicity_max_new_tokens=20,  # tokens per sample (RTP: 20)
      toxicity_top_p=0.9,       # nucleus sampling of the samples (RTP: 0.9, temperature 1)
      lm_eval_tasks=(),         # lm-evaluation-harness tasks per model (needs the eval extra), e.g. ('hellaswag',)
      lm_eval_include='',       # folder of local lm-eval task YAMLs (offline tasks); '' = lm-eval's own
      lm_eval_limit=0,          # documents per lm-eval task; 0 = all
  ))

  # The runs `stage=pipeline` makes, in this order (jax_rlhf/pipeline.py): each a name (its folder W/<name>), a
  # kind, its inputs (role -> run name) and overrides (nested dict of config fields, applied to its copy).
  c.plan = default_plan()
  # DPO family (jax_rlhf/train/dpo.py; Rafailov et al. 2023): the policy trains on rankings with no reward model
  c.dpo = ml_collections.ConfigDict(dict(
      beta=0.5,                 # strength of the implicit KL to the reference (TRL 0.1; DPO paper 0.1 HH, 0.5 TL;DR);
                                # IPO's tau for ipo / ipo_norm. Demo (pairwise, 2 epochs, one run each): 0.1 drifts
                                # to KL 4.6 nats, win vs SFT 0.621 [0.599, 0.643]; 0.5: KL 0.52, win 0.675
                                # [0.658, 0.693]
      loss_type='sigmoid',      # sigmoid (DPO; cDPO with label_smoothing) | ipo (summed log-ratios, DPO authors' code)
                                # | ipo_norm (per-token log-ratios, TRL's ipo) | hinge (SLiC-HF) | robust (rDPO)
      label_smoothing=0.0,      # eps, the assumed label-flip rate of sigmoid (cDPO) and robust; in [0, 0.5)
      soft_labels=True,         # pairwise sigmoid on rankings with a judge's soft 'prefs': per-pair label smoothing
                                # eps_ij = 1 - P_ij (losses.soft_ranking_dpo_loss) instead of the hard ranking
      mode='pairwise',          # pairwise: all C(K,2) pairs of a ranking, each prompt counting once | listwise:
                                # Plackett-Luce over the whole ranking (sigmoid only) | best_vs_worst: rank 1 vs rank K
      rpo_alpha=0.0,            # > 0: add rpo_alpha x NLL(chosen)/|chosen| to the loss (iterative RPO, Pang et al.
                                # 2024; TRL rpo_alpha; the paper's 1.0); 0: off
      precompute_ref=False,     # True: reference log-probs once over the dataset before training (TRL's
                                # precompute_ref_log_probs); False: the reference runs in every step (DPO authors, TRL)
      epochs=2,                 # passes over the training rankings (when steps is 0)
      steps=0,                  # train steps; 0: epochs x (training rankings // batch_size)
      batch_size=32,            # rankings (prompts) per step, all K responses of each in the step (DPO paper: 64 pairs)
      eval_fraction=0.1,        # held-out rankings for the held-out DPO metrics (a source without an eval split)
      eval_every=0,             # steps between held-out evaluations; 0: at the end only
      optimizer=_optimizer(1e-4, schedule='linear', warmup=10),  # AdamW; DPO paper: RMSprop 1e-6, 150 warm-up
                                # steps on billion-parameter models (not tuned for the demo's 1M-parameter model)
      # Online DPO (OAIF, RLHFlow): no rankings read; rounds of fresh samples of the current policy, ranked by a judge.
      # Steps: `steps`, else epochs x (training prompts // batch_size); each step trains on batch_size prompts.
      online=False,             # True: train on the policy's own samples, ranked by online_judge
      online_every=1,           # steps per round: a round samples online_every x batch_size prompts with the current
                                # policy, then trains on them batch_size per step (1: fully on-policy, OAIF)
      online_samples=4,         # n >= 2 responses per prompt, one shared prefill (OAIF 2; RLHFlow 8)
      online_judge='rm',        # rm (the `reward` input run's score, in the sampling jit) | task (the task's noisy
                                # labeler, on the host; the rankings it made are logged as labels_used)
      online_pairs='best_vs_worst',  # best_vs_worst (RLHFlow: highest vs lowest ranked) | all (every C(n,2) pair)
      online_temperature=1.0,   # sampling temperature of the rounds (RLHFlow 1.0; TRL OnlineDPO 0.9); the loss's
                                # and the reference's log-probs stay at T = 1
      online_min_gap=0.0,       # rm judge: a prompt whose best - worst RM score gap is under this has no pair (skip
                                # near-ties); 0: only prompts whose samples are all the same are skipped
      online_oversample=1,      # rm judge: a round samples this x online_every x batch_size prompts and trains on
                                # online_every x batch_size of them, those with a pair first (refill); 1: off
      # Demo, RM judge, 250 steps, win vs SFT (KL): beta 0.1 0.443 (8.06), 0.5 0.630 (1.01), 1.0 0.656 (0.58; the
      # compare plan's dpo_online), 2.0 0.623 (0.30); at beta 0.5: n=8 0.629, all pairs 0.636, lr 3e-5 0.591, task
      # judge 0.644 (0.38). PPO: 0.712 (0.95). At beta 1.0 (session 7; scripts/online_dpo_judge.py): temperature 1.3
      # 0.615 (0.42), rpo_alpha 1.0 0.600 (1.25), oversample 2 0.649 (0.51); online_min_gap 0.5 + oversample 2 0.696
      # [0.676, 0.716] (0.79; seed 1 0.681), + oversample 4 0.694 (0.93), min_gap 1.0 0.690 (0.99), 0.5 at beta 0.5
      # 0.683 (1.27)
  ))
  return c


def stage_config(stage: str, arg: str | None = None) -> ml_collections.ConfigDict:
  if stage not in STAGES:
    raise ValueError(f'unknown stage {stage!r}; stages: {STAGES}')
  c = base_config()
  c.stage = stage
  return apply_variants(c, arg)
