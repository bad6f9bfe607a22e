"""Bad data never gets far: each case ends in one line `file:line: what is wrong` and exit status 2 (the checker
CLI, `python -m jax_rlhf.data`, and a stage through `jax_rlhf.main`), or with data.on_error=skip is skipped
and counted. The formatting and length checks that run after reading (chat template, prompt too long)."""

import gzip
import os
import subprocess
import sys

import pytest

import fixtures
from jax_rlhf.data import __main__ as cli
from jax_rlhf.data import records, sources
from jax_rlhf.data import tokenizer as tok_lib
from jax_rlhf.tasks import instruct_world
from jax_rlhf.train import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD_DEMO = b'{"prompt": "count: a b\\n", "response": "2"}\n'

# (kind, bad line, what the message must say)
JSONL_CASES = {
    'missing_field': ('demonstration', b'{"prompt": "count: a\\n"}', "missing field 'response'"),
    'wrong_type': ('demonstration', b'{"prompt": 3, "response": "b"}', "field 'prompt' must be a string, got int"),
    'empty_response': ('demonstration', b'{"prompt": "first: a\\n", "response": ""}', "empty 'response'"),
    'not_a_permutation': ('ranking', b'{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 0, 2]}',
                          "'ranking' [0, 0, 2] is not a permutation of range(3)"),
    'invalid_utf8': ('demonstration', b'{"prompt": "a\xff", "response": "b"}', 'invalid UTF-8 at byte 13'),
    'chosen_equals_rejected': ('ranking', b'{"prompt": "p", "chosen": "same", "rejected": "same"}',
                               '"chosen" and "rejected" are the same response'),
}


@pytest.fixture(scope='module')
def tok():
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(instruct_world.tokenizer_path())


def run_cli(argv, capsys):
  status = cli.main(argv)
  out = capsys.readouterr()
  return status, out.out, out.err


@pytest.mark.parametrize('case', sorted(JSONL_CASES))
def test_checker_names_file_and_line_and_exits_2(case, tmp_path, capsys):
  kind, bad, what = JSONL_CASES[case]
  path = tmp_path / 'data.jsonl'
  good = GOOD_DEMO if kind == 'demonstration' else b'{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
  path.write_bytes(good + good + bad + b'\n' + good)
  status, out, _ = run_cli([f'jsonl:{path}', '--kind', kind], capsys)
  assert status == 2
  assert f'  {path}:3: {what}' in out.splitlines(), out
  assert '3 records, 1 bad' in out
  # read by a stage: the first bad record raises with the same line; skip drops and counts it
  with pytest.raises(records.RecordError, match=f'^{path}:3: '):
    sources.load(str(path), kind, split='all')
  skipped = sources.load(str(path), kind, split='all', on_error='skip')
  assert len(skipped) == 3 and skipped.skipped == 1 and skipped.errors == [f'{path}:3: {what}']


def test_missing_file_is_one_line_and_exit_2(tmp_path, capsys):
  status, out, err = run_cli([f'jsonl:{tmp_path}/nope.jsonl', '--kind', 'prompt'], capsys)
  assert status == 2 and err.strip() == f'error: {tmp_path}/nope.jsonl:0: file does not exist'
  status, _, err = run_cli([f'hh_rlhf:{tmp_path}/nope', '--kind', 'ranking'], capsys)
  assert status == 2 and err.strip() == f'error: {tmp_path}/nope:0: folder does not exist'
  (tmp_path / 'empty').mkdir()
  status, _, err = run_cli([f'hh_rlhf:{tmp_path}/empty', '--kind', 'ranking', '--tfds_dir', str(tmp_path / 't')],
                           capsys)
  assert status == 2 and 'no hh_rlhf training files' in err


def test_bad_hh_lines_are_kept_with_their_line_and_skipped_or_raised(tmp_path, capsys):
  root = fixtures.write_hh(str(tmp_path / 'hh'))
  path = os.path.join(root, 'helpful-base', 'train.jsonl.gz')
  with gzip.open(path, 'rb') as f:
    lines = f.read().splitlines(keepends=True)
  q = '\\n\\nHuman: hi\\n\\nAssistant:'
  bad = [b'{"chosen": "no turns here", "rejected": "x"}\n',                                # no assistant turn
         f'{{"chosen": "{q} a", "rejected": "\\n\\nHuman: bye\\n\\nAssistant: b"}}\n'.encode(),  # prompts differ
         f'{{"chosen": "{q} same", "rejected": "{q} same"}}\n'.encode(),                   # chosen == rejected
         b'{"chosen": "\xfe"}\n',                                                         # invalid UTF-8
         f'{{"chosen": "{q}", "rejected": "{q} b"}}\n'.encode()]                          # empty response
  with gzip.open(path, 'wb') as f:
    f.write(b''.join(lines[:1] + bad + lines[1:]))
  status, out, _ = run_cli([f'hh_rlhf:{root}', '--kind', 'ranking', '--tfds_dir', str(tmp_path / 't')], capsys)
  assert status == 2
  errors = [line.strip() for line in out.splitlines() if line.startswith('  ')]
  assert errors == [f'{path}:2: transcript has no "\\n\\nAssistant:" turn',
                    f'{path}:3: "chosen" and "rejected" differ before their last assistant turn',
                    f'{path}:4: "chosen" and "rejected" are the same response',
                    f'{path}:5: invalid UTF-8 at byte 12',
                    f'{path}:6: empty response after the last "\\n\\nAssistant:"'], out
  with pytest.raises(records.RecordError, match=f'^{path}:2: transcript has no'):
    sources.load(f'hh_rlhf:{root}', 'ranking', data_dir=str(tmp_path / 't'))
  kept = sources.load(f'hh_rlhf:{root}', 'ranking', data_dir=str(tmp_path / 't'), on_error='skip')
  assert kept.skipped == 5 and kept.items == fixtures.hh_expected(fixtures.HH_TRAIN)


def test_prompt_longer_than_the_context_is_bad_when_prompts_are_not_cut(tok, tmp_path):
  recs = [{'prompt': 'count: a b\n'}, {'prompt': 'i want to help my friend. sort: dog cat sun fox\n'}]
  origins = ['p.jsonl:1', 'p.jsonl:2']
  n = tok_lib.prompt_lengths(tok, recs)
  with pytest.raises(records.RecordError, match=rf'^p.jsonl:2: prompt has {n[1]} tokens, more than '
                                                rf'data.max_prompt_len={n[0]}'):
    tok_lib.check_prompt_lengths(tok, recs, origins, n[0], 'raise')
  keep, errors = tok_lib.check_prompt_lengths(tok, recs, origins, n[0], 'skip')
  assert keep == [0] and len(errors) == 1 and errors[0].startswith('p.jsonl:2: ')


def test_checker_reports_lengths_against_the_context(tok, tmp_path, capsys):
  path = tmp_path / 'r.jsonl'
  records.write_jsonl(str(path), [{'prompt': 'count: a b c d e f\n', 'chosen': '6', 'rejected': '5'},
                                  {'prompt': 'first: a\n', 'responses': ['a', 'b', 'a b c d e'],
                                   'ranking': [0, 2, 1]}])
  status, out, _ = run_cli([str(path), '--kind', 'ranking', '--max_prompt_len', '4', '--max_response_len', '3'],
                           capsys)
  assert status == 0, out
  assert '2 records, 0 bad' in out
  n_prompt = tok_lib.prompt_lengths(tok, [{'prompt': 'count: a b c d e f\n'}, {'prompt': 'first: a\n'}])
  assert n_prompt[0] > 4 >= n_prompt[1]
  assert f'prompt tokens: p50={int(sum(n_prompt) / 2)} ' in out
  assert '| limit 4: 1 (50.0%) would be cut from the left' in out
  assert '| limit 3: 1 (20.0%) would be cut from the right' in out  # 'a b c d e' + EOS
  assert 'responses per prompt: min 2 max 3' in out


def test_stage_on_bad_data_exits_2_with_one_line_and_writes_no_checkpoint(tmp_path):
  bad = tmp_path / 'sft.jsonl'
  bad.write_bytes(GOOD_DEMO * 40 + b'{"prompt": "x"}\n')
  w = tmp_path / 'W'
  cmd = [sys.executable, '-m', 'jax_rlhf.main', '--config', 'configs/sft.py:quick', '--workdir', str(w),
         '--config.sft.init=scratch', f'--config.data.demonstrations=jsonl:{bad}']
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert lines == [f"error: {bad}:41: missing field 'response'"], proc.stderr[-3000:]
  assert not (w / 'sft' / 'checkpoints').exists() and not (w / 'sft' / 'DONE').exists()


def test_sequences_longer_than_the_models_positions_stop_the_stage(tmp_path):
  """A UserError (exit 2 through main, as above) before any checkpoint is written."""
  from jax_rlhf.config import stage_config
  from jax_rlhf.train import sft
  demos = tmp_path / 'sft.jsonl'
  demos.write_bytes(GOOD_DEMO * 40)
  c = stage_config('sft', 'quick')
  c.sft.init = 'scratch'
  c.data.update(demonstrations=f'jsonl:{demos}', max_prompt_len=100, max_response_len=29)
  with pytest.raises(common.UserError, match=r"^sft sequences of 129 tokens \(data.max_prompt_len \+ "
                                             r"data.max_response_len, or data.seq_len\) are longer than the "
                                             r"model's 128 positions$"):
    sft.run(c, str(tmp_path / 'W'), 'sft')
  assert not (tmp_path / 'W' / 'sft' / 'checkpoints').exists()
