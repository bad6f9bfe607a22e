"""The presets' AI judge (`ai_judge`, `judge_dir=`): Qwen2.5-Instruct ranks the policy's samples of HH-RLHF
prompts. Run on a tiny random Qwen2 saved by transformers in the Hugging Face cache layout with a tokenizer built
here in Qwen2.5-Instruct's shape (Qwen2's pre-tokenizer, ChatML specials, its chat template): the label stage
reads the preset's prompt source, the judge's question goes through the chat template, and every soft label and
ranking equals a float64 numpy computation over transformers' log-probs of the option tokens."""
import json
import os
import shutil

import numpy as np
import pytest

import fixtures
from jax_rlhf import judges
from jax_rlhf.presets import JUDGE, preset_config
from jax_rlhf.train import checkpoint, common

PRINCIPLE = 'Choose the response that is more helpful, honest and harmless.'


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  from transformers import AutoTokenizer
  root = tmp_path_factory.mktemp('ai_judge')
  hh = fixtures.write_hh(str(root / 'hh'), n_more=40)
  texts = [c + r for c, r in fixtures.HH_TRAIN + fixtures.hh_more(40)]
  policy = fixtures.write_tokenizer(str(root / 'policy'), texts, chat_template=fixtures.CHATML)
  fixtures.write_tiny_qwen2(policy, len(AutoTokenizer.from_pretrained(policy)))
  repo = fixtures.write_hf_cache_qwen_instruct(str(root / 'hub'), texts + [JUDGE['template'], PRINCIPLE])
  constitution = root / 'constitution.txt'
  constitution.write_text(PRINCIPLE + '\n')
  return {'root': root, 'hh': hh, 'policy': policy, 'repo': repo, 'constitution': str(constitution)}


def judge_config(files, extra=''):
  c = preset_config('qwen2.5-0.5b', 'hh', f'quick,model_dir={files["policy"]},data_dir={files["hh"]},'
                                          f'judge_dir={files["repo"]}{extra}')
  c.data.tfds_dir = str(files['root'] / 'tfds')
  c.label.constitution = files['constitution']
  return c


def workdir_with_sft(files, name):
  """A workdir whose finished sft run is the tiny policy (the preset's SFT starts from the model folder)."""
  w = files['root'] / name
  shutil.copytree(files['policy'], w / 'sft' / 'hf')
  checkpoint.mark_done(str(w / 'sft'), {'stage': 'sft'})
  return w


def test_ai_judge_variant_labels_with_qwen_and_trains_the_rm_on_its_rankings(files):
  from jax_rlhf import pipeline
  c = judge_config(files)
  assert c.label.judge == f'lm:{files["repo"]}' and c.data.rankings == ''
  assert (c.label.k_min, c.label.k_max, c.label.judge_answer_prefix) == (4, 4, '')
  assert tuple(c.label.judge_options) == ('A', 'B') and c.label.temperature == c.ppo.temperature
  runs = {r.name: r for r, _ in pipeline.plan_of(c)}
  assert list(runs) == ['sft', 'label', 'rm', 'ppo', 'eval']  # the RM reads the judge's rankings
  default = preset_config('qwen2.5-0.5b', 'hh', 'ai_judge')
  assert default.label.judge == 'lm:~/.cache/huggingface/hub/models--Qwen--Qwen2.5-7B-Instruct'
  assert preset_config('qwen2.5-0.5b', 'hh', '').data.rankings.startswith('hh_rlhf:')  # off by default
  rounds = {r.name: r for r, _ in pipeline.plan_of(judge_config(files, ',rounds=2'))}
  assert dict(rounds['label_2'].inputs) == {'policy': 'ppo'}
  assert rounds['label_2'].overrides.label.prompt_offset == c.label.num_prompts


def test_hf_cache_folders_resolve_to_their_snapshot_and_bad_folders_are_one_line(files, tmp_path):
  repo = files['repo']
  snap = judges.model_folder(repo, 'label.judge')
  assert snap == os.path.join(repo, 'snapshots', '0123abcd' * 5)
  assert judges.model_folder(snap, 'label.judge') == snap
  two = tmp_path / 'models--Qwen--Two'
  for rev in ('a1', 'b2'):
    (two / 'snapshots' / rev).mkdir(parents=True)
    (two / 'snapshots' / rev / 'config.json').write_text('{}')
  assert judges.model_folder(str(two / 'snapshots' / 'b2'), 'x') == str(two / 'snapshots' / 'b2')
  (two / 'refs').mkdir()
  (two / 'refs' / 'main').write_text('b2')
  assert judges.model_folder(str(two), 'x') == str(two / 'snapshots' / 'b2')
  (two / 'refs' / 'main').write_text('gone')
  for path, match in ((two, '2 snapshots and no refs/main'), (tmp_path, 'holds no config.json'),
                      (tmp_path / 'none', 'no such model folder')):
    with pytest.raises(common.UserError, match=match) as e:
      judges.model_folder(str(path), 'label.judge=lm:x')
    assert '\n' not in str(e.value)


def test_a_bad_label_prompt_record_is_one_line_with_its_file_and_line(files, tmp_path):
  from jax_rlhf.train import label
  good = tmp_path / 'prompts.jsonl'
  fixtures.write_jsonl(str(good), [{'prompt': f'Question {i}?'} for i in range(8)])
  c = judge_config(files)
  c.label.prompts = f'jsonl:{good}'
  got = label.prompt_records(c, str(tmp_path / 'W'))
  assert [r['prompt'] for r in got] == [f'Question {i}?' for i in range(2, 8)]  # the train split (25% held out)
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"prompt": "Fine?"}\n{"prompt": "Also fine?"}\n{"question": "no prompt field"}\n')
  c.label.prompts = f'jsonl:{bad}'
  w = workdir_with_sft(files, 'W_bad')
  with pytest.raises(common.UserError) as e:
    label.run(c, str(w), 'label', {'policy': 'sft'})
  msg = str(e.value)
  assert msg.startswith(f'{bad}:3: ') and '\n' not in msg, msg
  assert not (w / 'label' / 'DONE').exists()


def test_a_long_request_loses_its_oldest_tokens_not_the_question(files, tmp_path):
  """A judge text over label.judge_max_len tokens: the request is cut from the left (marked '...'), the
  instructions, both responses and the answer position stay whole."""
  c = judge_config(files)
  judge = judges.get_judge(c, str(tmp_path))
  short = judge.texts('Say hello.', 'Hello!', 'No.', PRINCIPLE)
  c.label.judge_max_len = len(judge._ids(short)) + 30  # pylint: disable=protected-access
  judge = judges.get_judge(c, str(tmp_path))
  turns = ''.join(f'\n\nHuman: Tell me about a cat number {i}.\n\nAssistant: Cats are fine.' for i in range(20))
  long = turns + '\n\nHuman: And the last question?\n\nAssistant:'
  text = judge.texts(long, 'Hello!', 'No.', PRINCIPLE)
  assert judge.shortened == 1 and len(judge._ids(text)) <= c.label.judge_max_len  # pylint: disable=protected-access
  head, _, rest = short.partition('[Request]\n')
  assert text.startswith(head + '[Request]\n...') and 'And the last question?\n\nAssistant:' in text
  assert text.endswith(rest.partition('\n\n[Response A]')[2]) and 'Tell me about a cat number 0.' not in text
  assert judge.texts('Say hello.', 'Hello!', 'No.', PRINCIPLE) == short and judge.shortened == 1


def torch_option_logprobs(model, tok, text):
  """log P(A), log P(B) (float64) of the next token after `text`, from transformers' forward."""
  import torch
  ids = tok(text, add_special_tokens=False)['input_ids']
  with torch.no_grad():
    logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double().numpy()
  logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
  return logp[tok.convert_tokens_to_ids('A')], logp[tok.convert_tokens_to_ids('B')]


def bt_ascent(prefs, l2=1e-2, steps=20000, lr=0.05):
  """Bradley-Terry strengths by plain gradient ascent on sum_{i != j} P_ij log sigmoid(s_i - s_j) - l2/2 |s|^2
  (float64), the objective judges.bradley_terry solves by Newton's method."""
  k = len(prefs)
  s = np.zeros(k)
  off = ~np.eye(k, dtype=bool)
  for _ in range(steps):
    q = 1 / (1 + np.exp(-(s[:, None] - s[None, :])))
    grad = np.where(off, prefs - q, 0).sum(1) - l2 * s
    s += lr * grad
    if np.abs(grad).max() < 1e-12:
      break
  return s


@pytest.mark.slow
def test_label_stage_on_hh_prompts_equals_numpy_over_the_judges_logprobs(files):
  """The preset's label run: HH-RLHF prompts through the policy's chat template, 4 samples each, every pair
  judged both ways round by the Qwen judge read from the HF cache; the soft labels equal swap-and-average in
  float64 over transformers' log-probs of the chat-templated question, the rankings a Bradley-Terry fit of them.
  The RM of the plan then trains on those soft labels."""
  import transformers
  from jax_rlhf.data import tokenizer as tok_lib
  from jax_rlhf.train import label, rm
  c = judge_config(files)
  c.label.num_prompts = 9
  w = workdir_with_sft(files, 'W')
  summary = label.run(c, str(w), 'label', {'policy': 'sft'})
  snap = judges.model_folder(files['repo'], 'x')
  assert summary['judge_folder'] == snap and summary['rankings'] == 9 and summary['pairs'] == 54
  assert summary['judge_texts_cut'] == 0
  recs = [json.loads(line) for line in (w / 'label' / 'rankings.jsonl').read_text().splitlines()]

  # the prompts: the HH train split's first nine, as the policy reads them (its ChatML template)
  tok = common.load_tokenizer(c)
  raw = [r['prompt'] for r in common.records_for(c, str(w), 'prompts', 'train')][:9]
  assert raw[0].startswith('\n\nHuman: ')
  assert [r['prompt'] for r in recs] == [tok_lib.format_prompt(tok, p) for p in raw]
  assert all(r['prompt'].startswith('<|im_start|>user\n') and 'gold' not in r for r in recs)

  # independent: transformers' Qwen2 on the judge's question rendered by its own chat template, float64 numpy
  jtok = transformers.AutoTokenizer.from_pretrained(snap)
  model = transformers.AutoModelForCausalLM.from_pretrained(snap, dtype='float32').eval()

  def question(prompt, a, b):
    return c.label.judge_template.format(principle=PRINCIPLE, prompt=prompt.strip(), a=a, b=b)

  def chat(prompt, a, b):
    return jtok.apply_chat_template([{'role': 'user', 'content': question(prompt, a, b)}], add_generation_prompt=True,
                                    tokenize=False)

  def d(text):  # logit(A) - logit(B) = log P(A) - log P(B)
    la, lb = torch_option_logprobs(model, jtok, text)
    return la - lb

  def sigmoid(x):
    return 1 / (1 + np.exp(-x))

  judge = judges.get_judge(c, str(w))
  plain_gap = 0.0
  for q, r in zip(raw, recs):
    g, k = r['responses'], len(r['responses'])
    assert k == 4 and len(set(g)) > 1
    expected = np.full((k, k), 0.5)
    for i in range(k):
      for j in range(k):
        if i != j and g[i] != g[j]:
          expected[i, j] = 0.5 * (sigmoid(d(chat(q, g[i], g[j]))) + sigmoid(-d(chat(q, g[j], g[i]))))
    np.testing.assert_allclose(np.asarray(r['prefs']), expected, rtol=0, atol=2e-5)
    s = bt_ascent(expected)
    order = [int(i) for i in np.argsort(-s, kind='stable')]
    gaps = np.diff(np.sort(s))
    assert np.all((gaps > 1e-3) | (gaps < 1e-9)), s  # clear of float noise (identical responses tie exactly)
    assert r['ranking'] == order, (r['ranking'], order, s)
    # the text the judge read is the chat-templated question; without the template its answer differs
    text = judge.texts(q, g[0], g[1], PRINCIPLE)
    assert text == chat(q, g[0], g[1]) + c.label.judge_answer_prefix
    assert text.startswith('<|im_start|>system\nYou are Qwen') and text.endswith('<|im_start|>assistant\n')
    plain_gap = max(plain_gap, abs(d(question(q, g[0], g[1])) - d(text)))
  assert plain_gap > 1e-2

  c.rm.update(epochs=1, batch_size=8)
  out = rm.run(c, str(w), 'rm', {'init': 'sft', 'rankings': 'label'})
  assert out['soft_labels'] is True and out['rankings_from'] == ['label'] and out['train_rankings'] == 8
