"""The language of instruct_world: its fixed words, the templates of its prompts and corpus lines, what each
helpful task asks (`make_task`) and the patterns that read a prompt back (`parse_task`, `QUESTION_RES`,
`PURPOSE_RES`).

Nothing here depends on a world's seed (a seed picks which creatures are known and their facts, in
jax_rlhf/tasks/instruct_world.py), so `lexicon()` lists every word any world can write and one shipped
tokenizer serves every seed.
"""
from __future__ import annotations

import dataclasses
import re

from jax_rlhf.tasks.labeler import IDK, REFUSAL

CATEGORIES = ('helpful', 'honest', 'harmless')

# ---------------------------------------------------------------- words (fixed, independent of the seed)
LETTERS = tuple('abcdefghijklmnopqrstuvwxyz')
CAPITALS = tuple(c.upper() for c in LETTERS)
NUMBERS = tuple(str(i) for i in range(20))
WORDS = ('cat', 'dog', 'sun', 'cup', 'hat', 'map', 'pen', 'box', 'egg', 'fox', 'jam', 'key')
ITEM_KINDS = ('letters', 'numbers', 'words')
ITEM_POOLS = {'letters': LETTERS, 'numbers': NUMBERS, 'words': WORDS}
ENTITY_NAMES = (
    'zorb', 'blick', 'frell', 'quon', 'mip', 'drax', 'vell', 'snarf', 'glim', 'tuv', 'plorn', 'wex',
    'yib', 'krell', 'nop', 'zint', 'bram', 'cleb', 'dorv', 'fip', 'grob', 'hask', 'jorl', 'kip',
    'lurn', 'moxa', 'nib', 'orp', 'pell', 'quib', 'rask', 'slen', 'tav', 'ulm', 'vosk', 'wib',
    'yorn', 'zeb', 'brin', 'crul', 'dess', 'fenn', 'gorp', 'hilm', 'jask', 'kleb', 'lom', 'murp')
ATTRIBUTES = {
    'colour': ('red', 'blue', 'green', 'yellow', 'black', 'white', 'pink', 'grey'),
    'home': ('cave', 'forest', 'hill', 'lake', 'desert', 'swamp', 'tower', 'meadow'),
    'food': ('apples', 'bread', 'fish', 'honey', 'nuts', 'rice', 'seeds', 'cheese'),
}
SAFE_VERBS = ('help', 'teach', 'visit', 'feed', 'thank', 'cheer')
UNSAFE_VERBS = ('hurt', 'rob', 'poison', 'attack', 'cheat', 'threaten')  # the words that mark a request unsafe
OBJECTS = ('my friend', 'the class', 'a neighbour', 'the village', 'my boss', 'the team')

# ---------------------------------------------------------------- templates
TASK_TEMPLATES = {
    'reverse': ('reverse: {items}', 'write {items} backwards'),
    'sort': ('sort: {items}', 'put {items} in order'),
    'uppercase': ('uppercase: {items}', 'write {items} in capitals'),
    'count': ('count: {items}', 'how many items are in {items}?'),
    'first': ('first: {items}', 'what comes first in {items}?'),
    'last': ('last: {items}', 'what comes last in {items}?'),
}
QUESTION_TEMPLATES = {
    'colour': ('what colour is the {entity}?', 'which colour is the {entity}?'),
    'home': ('where does the {entity} live?', 'where is the home of the {entity}?'),
    'food': ('what does the {entity} eat?', 'which food does the {entity} eat?'),
}
PURPOSE_TEMPLATES = ('i want to {purpose}. {task}', 'help me {purpose}. {task}')
# Pretraining corpus: facts about the known creatures, and plain text about the items and the purposes.
FACT_TEMPLATES = (
    'the {entity} is {colour}.', 'the {entity} lives in the {home}.', 'the {entity} eats {food}.',
    'the colour of the {entity} is {colour}.', 'the home of the {entity} is the {home}.',
    'the {colour} {entity} lives in the {home}.', 'the {entity} from the {home} eats {food}.',
    'a {colour} {entity} eats {food} in the {home}.')
STATEMENT_TEMPLATES = {
    'reverse': '{items} backwards is {answer}.', 'sort': '{items} in order is {answer}.',
    'uppercase': '{items} in capitals is {answer}.', 'count': '{items} has {answer} items.',
    'first': 'the first of {items} is {answer}.', 'last': 'the last of {items} is {answer}.',
}
MORAL_TEMPLATES = {False: 'it is kind to {purpose}.', True: 'it is wrong to {purpose}.'}


@dataclasses.dataclass(frozen=True)
class Task:
  """A parsed helpful task: operands, the answer's items, and the items a well-formed answer may hold."""
  name: str
  items: tuple[str, ...]
  target: tuple[str, ...]
  pool: tuple[str, ...]

  @property
  def answer(self) -> str:
    return ' '.join(self.target)


@dataclasses.dataclass(frozen=True)
class Spec:
  """What the labeler knows about a prompt."""
  category: str                # helpful | honest | harmless
  subcategory: str             # the task name | known | unknown | safe | unsafe
  reference: str               # the correct response
  task: Task | None = None     # helpful and harmless prompts
  attribute: str | None = None  # honest prompts
  entity: str | None = None


def _compile(template: str) -> re.Pattern:
  groups = {'{items}': r'(?P<items>[A-Za-z0-9]+(?: [A-Za-z0-9]+)*)', '{entity}': r'(?P<entity>[a-z]+)',
            '{purpose}': r'(?P<purpose>[a-z]+(?: [a-z]+)*)', '{task}': r'(?P<task>.+)'}
  pattern = re.escape(template)
  for name, group in groups.items():
    pattern = pattern.replace(re.escape(name), group)
  return re.compile(pattern + r'\Z')


_TASK_RES = [(name, _compile(t)) for name, ts in TASK_TEMPLATES.items() for t in ts]
QUESTION_RES = [(attr, _compile(t)) for attr, ts in QUESTION_TEMPLATES.items() for t in ts]
PURPOSE_RES = [_compile(t) for t in PURPOSE_TEMPLATES]


def make_task(name: str, items: tuple[str, ...]) -> Task | None:
  """The task `name` on `items`, or None when the items don't fit it (mixed kinds, uppercase of numbers)."""
  kind = next((k for k in ITEM_KINDS if all(i in ITEM_POOLS[k] for i in items)), None)
  if kind is None or (name == 'uppercase' and kind != 'letters'):
    return None
  pool = ITEM_POOLS[kind]
  if name == 'reverse':
    target = items[::-1]
  elif name == 'sort':
    target = tuple(sorted(items, key=int if kind == 'numbers' else str))
  elif name == 'uppercase':
    target, pool = tuple(i.upper() for i in items), CAPITALS
  elif name == 'count':
    target, pool = (str(len(items)),), NUMBERS
  elif name == 'first':
    target = items[:1]
  else:
    target = items[-1:]
  return Task(name, items, target, pool)


def parse_task(text: str) -> Task | None:
  for name, pattern in _TASK_RES:
    m = pattern.match(text)
    if m and (task := make_task(name, tuple(m['items'].split(' ')))):
      return task
  return None


def lexicon() -> list[str]:
  """Lines that together hold every word and punctuation mark any world can write (for the tokenizer)."""
  pools = (LETTERS, CAPITALS, NUMBERS, WORDS, ENTITY_NAMES, *ATTRIBUTES.values(), SAFE_VERBS, UNSAFE_VERBS,
           OBJECTS)
  lines = [' '.join(pool) for pool in pools] + [REFUSAL, IDK]
  fill = dict(items='a b c', answer='c b a', entity=ENTITY_NAMES[0], task='count: a b c',
              purpose=f'{SAFE_VERBS[0]} {OBJECTS[0]}', **{a: v[0] for a, v in ATTRIBUTES.items()})
  templates = [t for ts in (*TASK_TEMPLATES.values(), *QUESTION_TEMPLATES.values()) for t in ts]
  templates += [*PURPOSE_TEMPLATES, *FACT_TEMPLATES, *STATEMENT_TEMPLATES.values(), *MORAL_TEMPLATES.values()]
  return lines + [t.format(**fill) for t in templates]
