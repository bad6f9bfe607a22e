"""data/batches.py: layouts built by hand from the tokenizer's ids (the loader is data.sources.GrainLoader)."""

import pytest

from jax_rlhf.data import batches
from jax_rlhf.tasks import instruct_world


@pytest.fixture(scope='module')
def tok():
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(instruct_world.tokenizer_path())


def ids(tok, text):
  return tok(text, add_special_tokens=False)['input_ids']


# ---------------------------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------------------------


def test_demonstrations_cut_prompt_left_response_right_and_mask_response_plus_eos(tok):
  recs = [
      {'prompt': 'reverse: c a t\n', 'response': 't a c'},                       # fits
      {'prompt': 'i want to help my friend. sort: dog cat sun fox\n', 'response': 'cat'},  # long prompt
      {'prompt': 'count: a b\n', 'response': 'a b c d e f g h'},                 # long response
  ]
  max_p, max_r = 8, 5
  arr, cut = batches.demonstrations(tok, recs, max_p, max_r)
  eos, pad = tok.eos_token_id, tok.pad_token_id
  assert arr['tokens'].shape == (3, max_p + max_r)
  n_prompt_cut = n_resp_cut = 0
  for i, r in enumerate(recs):
    p, resp = ids(tok, r['prompt']), ids(tok, r['response'])
    if len(p) > max_p:
      n_prompt_cut += 1
      p = p[-max_p:]  # the instruction's end (and its newline) survives
    full = resp + [eos]
    if len(full) > max_r:
      n_resp_cut += 1
      full = full[:max_r]  # the response's start survives; its EOS is lost
    row = p + full
    expected = row + [pad] * (max_p + max_r - len(row))
    assert arr['tokens'][i].tolist() == expected, i
    assert arr['attention_mask'][i].tolist() == [1] * len(row) + [0] * (max_p + max_r - len(row))
    assert arr['loss_mask'][i].tolist() == [0] * len(p) + [1] * len(full) + [0] * (max_p + max_r - len(row))
  assert n_prompt_cut == 1 and n_resp_cut == 1  # the fixture exercises both cuts
  assert (cut.prompts_cut, cut.responses_cut, cut.total) == (n_prompt_cut, n_resp_cut, 3)
  assert cut.as_metrics('data') == {'data/prompts_truncated': 1, 'data/responses_truncated': 1}
  assert arr['tokens'][2, -1] != eos and eos in arr['tokens'][0].tolist()


def test_prompts_left_padded_and_cut_from_the_left(tok):
  recs = [{'prompt': 'first: a b\n'}, {'prompt': 'i want to hurt my friend. reverse: c a t\n'}]
  max_p = 9
  arr, cut = batches.prompts(tok, recs, max_p)
  pad = tok.pad_token_id
  for i, r in enumerate(recs):
    p = ids(tok, r['prompt'])[-max_p:]
    assert arr['prompt'][i].tolist() == [pad] * (max_p - len(p)) + p
    assert arr['prompt_mask'][i].tolist() == [0] * (max_p - len(p)) + [1] * len(p)
  newline = ids(tok, recs[0]['prompt'])[-1]
  assert arr['prompt'][:, -1].tolist() == [newline] * 2  # every row ends (with its newline) at the same slot
  assert arr['index'].tolist() == [0, 1]
  assert cut.prompts_cut == 1 and cut.responses_cut == 0


def test_rankings_layout(tok):
  recs = [{'prompt': 'count: a b\n', 'responses': ['2', '3', 'a b'], 'ranking': [2, 0, 1]},
          {'prompt': 'first: x y\n', 'responses': ['x', 'y'], 'ranking': [0, 1]}]
  max_p, max_r, k_max = 6, 3, 4
  arr, cut = batches.rankings(tok, recs, max_p, max_r, k_max)
  length = max_p + max_r
  assert arr['tokens'].shape == (2, k_max, length) and arr['attention_mask'].shape == (2, k_max, length)
  assert arr['valid'].tolist() == [[True, True, True, False], [True, True, False, False]]
  assert arr['ranking'][0, :3].tolist() == [2, 0, 1] and arr['ranking'][1, :2].tolist() == [0, 1]
  eos, pad = tok.eos_token_id, tok.pad_token_id
  for i, r in enumerate(recs):
    p = ids(tok, r['prompt'])[-max_p:]
    for k, resp in enumerate(r['responses']):
      row = p + (ids(tok, resp) + [eos])[:max_r]
      assert arr['tokens'][i, k].tolist() == row + [pad] * (length - len(row)), (i, k)
      assert arr['attention_mask'][i, k].sum() == len(row)
    for k in range(len(r['responses']), k_max):  # padding responses: all pad, no real token
      assert (arr['tokens'][i, k] == pad).all() and not arr['attention_mask'][i, k].any()
  assert cut.total == 2
  with pytest.raises(ValueError, match='k_max'):
    batches.rankings(tok, recs, max_p, max_r, 2)


def test_texts_are_packed_with_eos_between_documents(tok):
  lines = ['a b c', 'the zorb is blue.', '1 2 3 4 5']
  seq_len = 4
  arr = batches.texts(tok, lines, seq_len)
  stream = []
  for line in lines:
    stream += ids(tok, line) + [tok.eos_token_id]
  n = len(stream) // seq_len
  assert arr['tokens'].tolist() == [stream[i * seq_len:(i + 1) * seq_len] for i in range(n)]
  assert arr['attention_mask'].all() and arr['loss_mask'].all()
  with pytest.raises(ValueError, match='fewer than one sequence'):
    batches.texts(tok, ['a'], 64)
