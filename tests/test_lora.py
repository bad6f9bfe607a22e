"""LoRA (jax_rlhf/models/lora.py): exactness at B = 0, only the adapters train, the merged export, the shared
reference of PPO / DPO / GRPO, the PEFT folder, the rank axis's sharding."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fixtures  # pylint: disable=g-bad-import-order
from flax import nnx

from jax_rlhf import sharding as shd
from jax_rlhf.config import stage_config
from jax_rlhf.data import batches
from jax_rlhf.models import hf, lora, scoring
from jax_rlhf.models.heads import ScalarModel
from jax_rlhf.models.transformer import Transformer
from jax_rlhf.models.transformer_config import preset
from jax_rlhf.train import dpo, grpo, lm, ppo, rollout
from jax_rlhf.train import state as state_lib

EOS, PAD = 0, 1
GPT2 = preset('tiny', vocab_size=32, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=EOS)
LLAMA = GPT2.replace(layout='llama', activation='silu', num_kv_heads=2, tie_embeddings=False)
ALL = lora.LoRAConfig(rank=4, alpha=8.0, targets=('all',))


def ids_and_mask(seed=0, b=3, t=10, vocab=32):
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, vocab, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  mask[1, :3] = 0  # a left-padded row
  mask[2, -4:] = 0  # a right-padded row
  return jnp.asarray(ids), jnp.asarray(mask)


def randomise_b(model, seed=0, std=0.05):
  """Non-zero B matrices (a trained adapter), so that the adapted model differs from its base."""
  for i, (_, ad) in enumerate(lora.adapters(model)):
    ad.b.set_value(std * jax.random.normal(jax.random.key(seed + i), ad.b.shape, ad.b.dtype))
  return model


@pytest.mark.parametrize('cfg,scalar', [(GPT2, False), (LLAMA, False), (LLAMA.replace(scan_layers=True), False),
                                        (GPT2, True)], ids=['gpt2', 'llama', 'llama-scan', 'gpt2-scalar'])
def test_zero_b_gives_base_exactly(cfg, scalar):
  make = (lambda: ScalarModel(cfg, rngs=nnx.Rngs(0))) if scalar else (lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  ids, mask = ids_and_mask()
  base = make()(ids, mask)
  model = lora.add(make(), ALL)
  n = len(lora.adapters(model))
  per_block = 6 if cfg.layout == 'gpt2' else 7
  assert n == (1 if cfg.scan_layers else cfg.num_layers) * per_block
  np.testing.assert_array_equal(np.asarray(model(ids, mask)), np.asarray(base))  # bitwise: x W0 + 0
  randomise_b(model)
  assert np.max(np.abs(np.asarray(model(ids, mask)) - np.asarray(base))) > 1e-3  # the adapters do act


def test_targets_and_config_errors():
  m = lora.add(Transformer(LLAMA, rngs=nnx.Rngs(0)), lora.LoRAConfig(rank=2, targets=('q', 'v')))
  assert sorted({lora.target_of(p) for p, _ in lora.adapters(m)}) == ['q', 'v']
  with pytest.raises(ValueError, match='gate'):
    lora.add(Transformer(GPT2, rngs=nnx.Rngs(0)), lora.LoRAConfig(rank=2, targets=('gate',)))
  with pytest.raises(ValueError, match='targets'):
    lora.LoRAConfig(rank=2, targets=('qkv',))
  c = stage_config('ppo', 'quick')
  c.model.lora.update(rank=8, targets='q, k,down')
  assert lora.LoRAConfig.from_config(c.model.lora).targets == ('q', 'k', 'down')
  assert lora.LoRAConfig.from_config(stage_config('ppo', 'quick').model.lora).rank == 0  # off by default


def test_lora_step_changes_only_adapters():
  """Two SFT steps of a LoRA model: the optimizer holds only adapter moments, every base weight is bitwise
  unchanged, every adapter matrix moved (A only from the second step: its gradient is 0 while B = 0)."""
  mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
  model = lora.add(Transformer(LLAMA, rngs=nnx.Rngs(0)), ALL)
  tx = optax.adamw(1e-2, weight_decay=0.0)
  graphdef, state, shardings = state_lib.place_state(model, tx, mesh)
  params = nnx.to_flat_state(state.params)
  assert params and all(isinstance(v, lora.LoRAParam) for _, v in params)
  assert state_lib.num_params(state.params) == lora.num_adapter_params(model)
  assert state_lib.num_params(state.opt_state) == 2 * lora.num_adapter_params(model) + 1  # mu, nu, count
  ids, mask = ids_and_mask()
  step = lm.jit_lm_step(graphdef, tx, shardings, mesh)
  before = jax.tree.map(np.asarray, (state.params, state.rest))
  for _ in range(2):
    state, _ = step(state, {'tokens': ids, 'attention_mask': mask, 'loss_mask': mask}, jax.random.key(0))
  for (path, old), (_, new) in zip(nnx.to_flat_state(before[1]), nnx.to_flat_state(state.rest)):
    np.testing.assert_array_equal(np.asarray(new.get_value()), old.get_value(), err_msg=str(path))
  for (path, old), (_, new) in zip(nnx.to_flat_state(before[0]), nnx.to_flat_state(state.params)):
    assert np.max(np.abs(np.asarray(new.get_value()) - old.get_value())) > 0, path


def test_scalar_model_trains_adapters_and_head():
  model = lora.add(ScalarModel(GPT2, rngs=nnx.Rngs(0)), ALL)
  _, params, rest = state_lib.split_model(model)
  heads = [p for p, v in nnx.to_flat_state(params) if not isinstance(v, lora.LoRAParam)]
  assert sorted(heads) == [('head', 'bias'), ('head', 'kernel')]
  assert all(p[0] != 'head' or p[1].startswith('norm') for p, _ in nnx.to_flat_state(rest))


@pytest.mark.parametrize('cfg,scalar', [(GPT2, False), (LLAMA.replace(scan_layers=True), False), (LLAMA, True)],
                         ids=['gpt2', 'llama-scan', 'llama-scalar'])
def test_merged_export_equals_adapted(tmp_path, cfg, scalar):
  """hf.save_pretrained of an adapted model writes W0 + scale A B: the folder, loaded back as a plain model,
  gives the adapted model's logits (values) within 1e-5."""
  model = ScalarModel(cfg, rngs=nnx.Rngs(0)) if scalar else Transformer(cfg, rngs=nnx.Rngs(0))
  randomise_b(lora.add(model, ALL))
  ids, mask = ids_and_mask()
  want = np.asarray(model(ids, mask))
  hf.save_pretrained(model, tmp_path / 'hf')
  assert lora.has_adapters(model)  # the export left the model as it was
  loaded = (hf.load_scalar_model if scalar else hf.load_pretrained)(tmp_path / 'hf')
  assert not lora.has_adapters(loaded)
  got = np.asarray(loaded(ids, mask))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_rank_axis_sharding():
  mesh = shd.make_mesh((2, 2, 2))
  model = lora.add(Transformer(LLAMA.replace(embed_dim=64, mlp_dim=128), rngs=nnx.Rngs(0)), ALL)
  _, state, shardings = state_lib.place_state(model, optax.adamw(1e-3), mesh)
  assert shd.unmatched_axes(state) == set()
  flat = dict(nnx.to_flat_state(shardings.params))
  attn = ('blocks', 0, 'attn')
  assert flat[attn + ('lora_q', 'a')].get_value().spec == shd.P('fsdp', None)           # [D, r]
  assert flat[attn + ('lora_q', 'b')].get_value().spec == shd.P(None, 'model', None)    # [r, H, Dh]
  assert flat[('blocks', 0, 'mlp', 'lora_down', 'a')].get_value().spec == shd.P('model', None)  # [F, r]


# ---------------------------------------------------------------------------------------------------- PPO
def ppo_config():
  c = stage_config('ppo', 'quick')
  c.data.max_prompt_len = 6
  c.ppo.update(batch_size=4, max_new_tokens=5, ppo_epochs=1, num_minibatches=1, temperature=1.0)
  c.ppo.policy_optimizer.lr = 3e-2
  c.ppo.value_optimizer.lr = 3e-2
  c.ppo.ptx.coef = 0.0
  return c


def test_ppo_reference_is_the_base_with_adapters_off():
  """A LoRA PPO trainer holds no reference state; after an update (adapters moved) its rollout's reference
  log-probs equal those of a separate frozen copy of the SFT model, and the policy's differ from them."""
  cfg = GPT2
  c = ppo_config()
  mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
  models = {'policy': lora.add(Transformer(cfg, rngs=nnx.Rngs(0)), ALL), 'reference': None,
            'value': lora.add(ScalarModel(cfg, rngs=nnx.Rngs(1)), ALL, seed=1),
            'reward': ScalarModel(cfg, rngs=nnx.Rngs(2))}
  trainer = ppo.PPOTrainer(c, mesh, models, (EOS, PAD))
  assert 'reference' not in trainer.states and 'reference' in trainer.graphdefs
  rng = np.random.default_rng(0)
  prompt, pmask = batches.pad_left([list(rng.integers(2, 32, size=n)) for n in (6, 3, 5, 4)], 6, PAD)
  prompts = shd.put_batch({'prompt': prompt, 'prompt_mask': pmask}, mesh)
  trainer.step(prompts, None, jax.random.key(0), 0.1)
  states = dict(trainer.states)
  ro = jax.jit(lambda s, b, k: rollout.generate(trainer.graphdefs, s, b, k, trainer.settings))(
      states, prompts, jax.random.key(1))
  sft = Transformer(cfg, rngs=nnx.Rngs(0))  # the frozen SFT model, a copy of its own
  want, _ = scoring.response_logprobs(sft, ro['seq'], ro['att'], 6, 1.0)
  m = np.asarray(ro['mask'])
  np.testing.assert_allclose(np.asarray(ro['ref_logp']) * m, np.asarray(want) * m, atol=1e-6, rtol=0)
  assert np.max(np.abs(np.asarray(ro['logp'] - ro['ref_logp'])) * m) > 1e-4  # the policy has moved


def test_dpo_lora_reference_first_loss_is_log2():
  """DPO on a LoRA policy with its own base as the reference: at B = 0 policy = reference, so the sigmoid
  loss of the first step is exactly log 2 (the margins are 0), and the step trains the adapters alone. The same
  with a reference run of its own (the base's weights, no adapters)."""
  mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
  model = lora.add(Transformer(GPT2, rngs=nnx.Rngs(0)), ALL)
  c = stage_config('dpo', 'quick')
  tx = optax.adamw(1e-2)
  ref_graphdef = lora.reference_graphdef(model)
  graphdef, state, shardings = state_lib.place_state(model, tx, mesh)
  rng = np.random.default_rng(0)
  recs = [{'prompt': [int(x) for x in rng.integers(2, 32, 4)],
           'responses': [[int(x) for x in rng.integers(2, 32, 3)] + [EOS] for _ in range(2)], 'ranking': [0, 1]}
          for _ in range(4)]
  tokens, att, ranking, valid = [], [], [], []
  for r in recs:
    rows = [r['prompt'] + resp for resp in r['responses']]
    tokens.append(rows)
    att.append([[1] * len(x) for x in rows])
    ranking.append(r['ranking'])
    valid.append([True, True])
  batch = {'tokens': jnp.asarray(tokens, jnp.int32), 'attention_mask': jnp.asarray(att, jnp.int32),
           'ranking': jnp.asarray(ranking, jnp.int32), 'valid': jnp.asarray(valid)}
  step = dpo.jit_train_step(graphdef, tx, c.dpo, 4, shardings, None, mesh, ref_graphdef)
  rest = jax.tree.map(np.asarray, state.rest)
  state, m = step(state, None, batch)
  np.testing.assert_allclose(float(m['loss']), np.log(2.0), rtol=1e-6)
  for (_, old), (_, new) in zip(nnx.to_flat_state(rest), nnx.to_flat_state(state.rest)):
    np.testing.assert_array_equal(np.asarray(new.get_value()), old.get_value())
  state, m = step(state, None, batch)
  assert float(m['loss']) < np.log(2.0)  # the adapters moved the policy away from its (fixed) reference
  # a reference run of its own (no adapters: another graph than the LoRA policy's), run in the step
  policy = lora.add(Transformer(GPT2, rngs=nnx.Rngs(0)), ALL)
  graphdef, state, shardings = state_lib.place_state(policy, tx, mesh)
  ref_graphdef, ref, ref_shardings = state_lib.place_state(Transformer(GPT2, rngs=nnx.Rngs(0)), None, mesh)
  step = dpo.jit_train_step(graphdef, tx, c.dpo, 4, shardings, ref_shardings, mesh, ref_graphdef)
  state, m = step(state, ref, batch)
  np.testing.assert_allclose(float(m['loss']), np.log(2.0), rtol=1e-6)


def test_grpo_shared_reference():
  """GRPO's rollout with no reference state runs the policy's graphdef with the adapters off: its ref_logp
  equals the frozen base's."""
  c = stage_config('grpo', 'quick')
  c.grpo.update(num_generations=2, max_new_tokens=4, prompts_per_step=2, num_minibatches=1)
  c.grpo.kl.coef = 0.1
  mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
  policy = randomise_b(lora.add(Transformer(GPT2, rngs=nnx.Rngs(0)), ALL))
  assert grpo.uses_ref(c.grpo)
  trainer = grpo.GRPOTrainer(c, mesh, policy, None, ScalarModel(GPT2, rngs=nnx.Rngs(2)), (EOS, PAD))
  assert 'reference' not in trainer.states and trainer.graphdefs['reference'] is not None
  prompt, pmask = batches.pad_left([[5, 6, 7], [8, 9]], 4, PAD)
  prompts = shd.put_batch({'prompt': prompt, 'prompt_mask': pmask}, mesh)
  st = trainer.states
  exp, _ = trainer.sample(st, prompts, jax.random.key(0))
  want, _ = scoring.response_logprobs(Transformer(GPT2, rngs=nnx.Rngs(0)), exp['seq'], exp['att'], 4,
                                      scoring.effective_temperature(c.grpo.temperature))
  m = np.asarray(exp['mask'])
  np.testing.assert_allclose(np.asarray(exp['ref_logp']) * m, np.asarray(want) * m, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------- PEFT
def peft_pair(tmp_path, cfg=LLAMA, targets=('q', 'v', 'o', 'gate', 'down')):
  """A base HF folder and, on it, a PEFT adapter folder of an adapted model (non-zero B)."""
  base = Transformer(cfg, rngs=nnx.Rngs(0))
  hf.save_pretrained(base, tmp_path / 'base')
  lcfg = lora.LoRAConfig(rank=4, alpha=8.0, targets=targets)
  model = randomise_b(lora.add(Transformer(cfg, rngs=nnx.Rngs(0)), lcfg))
  lora.save_peft(model, str(tmp_path / 'peft'), lcfg, str(tmp_path / 'base'))
  return model


def test_peft_folder_layout(tmp_path):
  """The adapter folder as PEFT writes it: adapter_config.json (LORA, r, lora_alpha, target_modules, the base
  path) and adapter_model.safetensors with base_model.model.model.layers.<i>.<module>.lora_{A,B}.weight of
  torch Linear shapes [r, in] / [out, r]."""
  import safetensors.numpy
  peft_pair(tmp_path)
  with open(tmp_path / 'peft' / 'adapter_config.json') as f:
    conf = json.load(f)
  assert conf['peft_type'] == 'LORA' and conf['r'] == 4 and conf['lora_alpha'] == 8.0
  assert conf['target_modules'] == ['mlp.down_proj', 'mlp.gate_proj', 'self_attn.o_proj', 'self_attn.q_proj',
                                    'self_attn.v_proj']
  assert conf['base_model_name_or_path'] == str(tmp_path / 'base')
  t = safetensors.numpy.load_file(tmp_path / 'peft' / 'adapter_model.safetensors')
  d, h, kv, dh, f = LLAMA.embed_dim, LLAMA.num_heads, LLAMA.kv_heads, LLAMA.hdim, LLAMA.ffn_dim
  pre = 'base_model.model.model.layers.1.'
  assert t[pre + 'self_attn.q_proj.lora_A.weight'].shape == (4, d)
  assert t[pre + 'self_attn.q_proj.lora_B.weight'].shape == (h * dh, 4)
  assert t[pre + 'self_attn.v_proj.lora_B.weight'].shape == (kv * dh, 4)
  assert t[pre + 'self_attn.o_proj.lora_A.weight'].shape == (4, h * dh)
  assert t[pre + 'mlp.down_proj.lora_A.weight'].shape == (4, f)
  assert len(t) == 2 * 5 * LLAMA.num_layers


@pytest.mark.parametrize('cfg,targets', [(LLAMA, ('q', 'v', 'o', 'gate', 'down')), (GPT2, ('q', 'v', 'o', 'up', 'down'))],
                         ids=['llama', 'gpt2'])
def test_peft_loads_and_matches(tmp_path, cfg, targets):
  """peft.PeftModel.from_pretrained on the base folder + our adapter folder computes our adapted logits."""
  peft = pytest.importorskip('peft', reason='peft is not installed (pip install peft)')
  import torch
  import transformers
  model = peft_pair(tmp_path, cfg, targets)
  base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'base', torch_dtype=torch.float32)
  pm = peft.PeftModel.from_pretrained(base, tmp_path / 'peft').eval()
  ids, mask = ids_and_mask()
  ids_np, mask_np = np.asarray(ids), np.asarray(mask)
  mask_np = np.ones_like(mask_np)  # full rows: HF's positions from the mask differ from ours only when padded
  with torch.no_grad():
    got = pm(input_ids=torch.tensor(ids_np, dtype=torch.long), attention_mask=torch.tensor(mask_np)).logits.numpy()
  want = np.asarray(model(ids, jnp.asarray(mask_np)))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  assert np.max(np.abs(want - np.asarray(Transformer(cfg, rngs=nnx.Rngs(0))(ids, jnp.asarray(mask_np))))) > 1e-3


def test_peft_gpt2_fused_qkv(tmp_path):
  """GPT-2: q and v share c_attn's adapter of rank 2r (A stacked, B block-diagonal with k's third zero), its
  alpha doubled so that the scale stays alpha / r; c_proj of attention and of the MLP are told apart."""
  import safetensors.numpy
  peft_pair(tmp_path, GPT2, ('q', 'v', 'o'))
  with open(tmp_path / 'peft' / 'adapter_config.json') as f:
    conf = json.load(f)
  assert conf['target_modules'] == ['attn.c_attn', 'attn.c_proj'] and conf['fan_in_fan_out']
  assert conf['rank_pattern'] == {'attn.c_attn': 8} and conf['alpha_pattern'] == {'attn.c_attn': 16.0}
  t = safetensors.numpy.load_file(tmp_path / 'peft' / 'adapter_model.safetensors')
  d = GPT2.embed_dim
  b = t['base_model.model.transformer.h.0.attn.c_attn.lora_B.weight']
  assert t['base_model.model.transformer.h.0.attn.c_attn.lora_A.weight'].shape == (8, d) and b.shape == (3 * d, 8)
  assert not b[d:2 * d].any() and not b[:d, 4:].any() and not b[2 * d:, :4].any() and b[:d, :4].any()


def test_peft_export_refuses_scalar_models(tmp_path):
  with pytest.raises(ValueError, match='export=merged'):
    lora.save_peft(lora.add(ScalarModel(LLAMA, rngs=nnx.Rngs(0)), ALL), str(tmp_path / 'x'), ALL, str(tmp_path))
  assert not os.path.exists(tmp_path / 'x')


# ---------------------------------------------------------------------------------------------------- stage
@pytest.mark.slow
def test_ppo_stage_with_lora_exports_merged_and_peft_and_resumes_bitwise(quick_pipeline, tmp_path, monkeypatch):
  """The ppo stage with model.lora (rank 4, every projection, export=peft) from the quick pipeline's SFT and RM:
  W/ppo/hf differs from SFT only in the targeted weights, each by a matrix of rank <= 3 x 4 (c_attn holds q, k,
  v); W/ppo/peft loaded by peft on W/sft/hf gives the merged folder's logits; a run preempted (SIGTERM) at
  iteration 2 and rerun exports bitwise the same weights."""
  from safetensors.numpy import load_file
  from jax_rlhf.config import stage_config as base
  src, proc = quick_pipeline
  assert proc.returncode == 0, proc.stderr[-3000:]
  w = tmp_path / 'W'
  fixtures.copy_runs(src, w)
  config = base('ppo', 'quick')
  config.model.lora.update(rank=4, alpha=8.0, export='peft')
  config.checkpoint.every = 2
  ppo.run(config, str(w), 'ppo')
  a = load_file(str(w / 'ppo' / 'hf' / 'model.safetensors'))
  sft = load_file(str(w / 'sft' / 'hf' / 'model.safetensors'))
  changed = {k for k in a if np.abs(a[k] - sft[k]).max() > 0}
  assert changed == {k for k in a if k.endswith(('c_attn.weight', 'c_proj.weight', 'c_fc.weight'))}
  for k in changed:
    d = a[k].astype(np.float64) - sft[k]
    sv = np.linalg.svd(d, compute_uv=False)
    assert int(np.sum(sv > 1e-4 * sv[0])) <= (12 if 'c_attn' in k else 4), k

  try:
    import peft
    import torch
    import transformers
  except ImportError:
    peft = None
  if peft is not None:
    merged = transformers.AutoModelForCausalLM.from_pretrained(w / 'ppo' / 'hf').eval()
    pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(w / 'sft' / 'hf'),
                                        w / 'ppo' / 'peft').eval()
    ids = torch.tensor(np.random.default_rng(0).integers(2, 100, (2, 12)))
    with torch.no_grad():
      np.testing.assert_allclose(pm(input_ids=ids).logits.numpy(), merged(input_ids=ids).logits.numpy(), atol=1e-4)

  fixtures.preempt_then_resume(lambda n: ppo.run(config, str(w), n), str(w), 'ppo_b', 2, monkeypatch)
  fixtures.assert_same_export(w / 'ppo', w / 'ppo_b')
