r"""Regenerate the shipped instruct_world tokenizer: python scripts/train_tokenizer.py [out_dir].

A word-level tokenizer (the `tokenizers` library) trained on text the world writes: one token per word,
per operand item (letter, number, short word) and per punctuation mark, so a ~1M-parameter model sees each
operand as one symbol. Pre-tokenisation: cut after each '\n'; Metaspace (a space becomes '▁' and starts a
new piece, and every line starts with '▁'); then '?.,:!' and '\n' split off as pieces of their own. So
't a c' is ['▁t', '▁a', '▁c'] on its own, inside a prompt, or after the prompt's '\n':
encode(prompt + response) == encode(prompt) + encode(response). The decoder undoes it (the '▁' that starts
a decoded text or a line is dropped), so decode(encode(x)) == x for every string the world writes, for a
prompt, a response, or both together.

Special tokens: <|endoftext|> (id 0; EOS and BOS), <|pad|> (id 1), <|unk|> (id 2). Nothing is added
around encoded text (no BOS): the pipeline adds what it wants. The output is deterministic: the same
files byte for byte on every run (the vocabulary is ordered by frequency, then alphabetically).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jax_rlhf.tasks import instruct_world, instruct_world_language  # noqa: E402

EOS, PAD, UNK = '<|endoftext|>', '<|pad|>', '<|unk|>'


# The demonstrations' error rate of the training text, fixed: the shipped vocabulary (word-level, ids by
# frequency) does not change when the world's `demo_error_rate` default is tuned (it went 0.5 -> 0.6).
# Every word any world may write is in the lexicon, so every world's text round-trips (tested).
TEXT_ERROR_RATE = 0.5


def world_texts(n: int = 2000) -> list[str]:
  """Text the default world writes: the lexicon (every word any world may use), corpus lines, prompts,
  reference answers and demonstrations (mistakes included, at TEXT_ERROR_RATE)."""
  world = instruct_world.World(instruct_world.WorldConfig(demo_error_rate=TEXT_ERROR_RATE))
  rng = np.random.default_rng(0)
  texts = instruct_world_language.lexicon()
  for split in instruct_world.SPLITS:
    texts += world.pretrain_texts(n, split)
    for rec in world.prompts(n, split):
      texts += [rec['prompt'], world.reference_answer(rec['prompt']), world.demonstration(rec['prompt'], rng)]
  return texts


def train(texts: list[str]) -> Tokenizer:
  tok = Tokenizer(models.WordLevel(unk_token=UNK))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r'\n'), behavior='merged_with_previous'),  # lines
      pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='always', split=True),  # words, '▁' first
      pre_tokenizers.Split(Regex(r'[?.,:!]|\n'), behavior='isolated'),  # punctuation, newline
  ])
  tok.decoder = decoders.Sequence([
      decoders.Metaspace(replacement='▁', prepend_scheme='always', split=True),  # '▁w' -> ' w', first: 'w'
      decoders.Fuse(),  # one string, so that the next step sees across tokens
      decoders.Replace('\n ', '\n'),  # a line's leading '▁'
  ])
  trainer = trainers.WordLevelTrainer(vocab_size=1000, min_frequency=1, special_tokens=[EOS, PAD, UNK],
                                      show_progress=False)
  tok.train_from_iterator(texts, trainer)
  return tok


def save(tok: Tokenizer, out_dir: str) -> None:
  from transformers import PreTrainedTokenizerFast
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=UNK,
                               clean_up_tokenization_spaces=False)
  hf.save_pretrained(out_dir)
  # transformers 5 writes its own class name; the generic one also loads in transformers 4.
  config_path = os.path.join(out_dir, 'tokenizer_config.json')
  with open(config_path) as f:
    config = json.load(f)
  config['tokenizer_class'] = 'PreTrainedTokenizerFast'
  with open(config_path, 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write('\n')


def main(argv: list[str]) -> None:
  out_dir = argv[1] if len(argv) > 1 else instruct_world.tokenizer_path()
  tok = train(world_texts())
  save(tok, out_dir)
  print(f'{out_dir}: vocab {tok.get_vocab_size()}')


if __name__ == '__main__':
  main(sys.argv)
