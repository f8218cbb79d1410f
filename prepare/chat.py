"""
Instruction data of your own -> a task folder that sft.py (and distill.py) read with --task_dir=

$ python prepare/chat.py --source=my_chats.jsonl --out_dir=data/my_chats
$ python sft.py --init_from=out/tinystories_moe --task_dir=data/my_chats --out_dir=out/sft_mine

The source is a .jsonl file (one record per line), a .json file (a list of records) or a folder of
them; each record in one of the common formats, recognised by its fields:

  {"prompt": "...", "response": "..."}       or "completion" / "output" / "answer" for the response
  {"instruction": "...", "input": "...", "output": "..."}       Alpaca: the input, if any, follows
                                             the instruction after a blank line
  {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}       OpenAI
                                             ("developer" is a system turn; an assistant turn with
                                             "weight": 0 is context only, not trained, as in
                                             OpenAI's fine-tuning files)
  {"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}, ...]}          ShareGPT

A conversation gives one example per assistant turn: that turn is trained, with the turns before it
as the prompt (tokenizer.py's chat template; a system message leads the first user turn, as
serve.py puts it). Whole records are held out for validation (val_fraction, or a val_source of
their own). Writes
  sft_train.jsonl, sft_val.jsonl     {"prompt": the last user turn, "response", "messages": the
                                     turns before the response, where there are more than that turn}
  meta.json                          the source, the formats found, the counts
No prompts_val.jsonl: the story task's score (task.py: required words) means nothing for data of
one's own, so sft.py leaves it out (it reports the response loss on sft_val and a held-out answer),
and eval.py reports the pretraining data's loss alone.
"""

import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import configure  # noqa: E402
from data import read_records, start_prepared, write_json, write_jsonl  # noqa: E402

# -----------------------------------------------------------------------------
source = ''                  # a .jsonl / .json file or a folder of them (required)
val_source = ''              # held-out records of their own ('': val_fraction of source's)
out_dir = ''                 # the task folder to write ('': data/<the source's name>_chat)
val_fraction = 0.05          # of the records (whole conversations), at least one
seed = 1337
# -----------------------------------------------------------------------------
configure(globals())
if not source:
    sys.exit('error: name the data: python prepare/chat.py --source=FILE.jsonl (see --help for the formats)')
if not 0 < val_fraction < 1:
    sys.exit(f'error: val_fraction={val_fraction} must be between 0 and 1')
out_dir = out_dir or os.path.join('data', os.path.splitext(os.path.basename(os.path.normpath(source)))[0] + '_chat')
if os.path.exists(os.path.join(out_dir, 'train.bin')) or os.path.exists(os.path.join(out_dir, 'meta.json')) and \
        json.load(open(os.path.join(out_dir, 'meta.json'))).get('kind') != 'chat':
    sys.exit(f"error: {out_dir} holds other prepared data (a pretraining dataset or the story task); "
             f"write the instruction data to a folder of its own (--out_dir=)")

RESPONSE_KEYS = ('response', 'completion', 'output', 'answer')
ROLES = {'system': 'system', 'developer': 'system', 'user': 'user', 'human': 'user', 'assistant': 'assistant',
         'gpt': 'assistant'}
FORMATS = ('prompt/response: {"prompt", "response" (or "completion", "output", "answer")}; '
           'Alpaca: {"instruction", "input", "output"}; OpenAI: {"messages": [{"role", "content"}]}; '
           'ShareGPT: {"conversations": [{"from", "value"}]}')


def records_of(path):
    """[(where, record)] of a .jsonl / .json file or a folder of them; where names file and line."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(('.jsonl', '.json')))
        if not files:
            sys.exit(f"error: the folder '{path}' holds no .jsonl or .json file")
        return [r for f in files for r in read_records(f)]
    if not os.path.isfile(path):
        sys.exit(f"error: source '{path}' does not exist")
    if not path.endswith(('.jsonl', '.json')):
        sys.exit(f"error: {path}: instruction data is a .jsonl file (a record a line) or a .json file (a list)")
    return read_records(path)


def text(value, where, field):
    """A field's text: a non-empty string."""
    if not isinstance(value, str) or not value.strip():
        sys.exit(f'error: {where}: {field} must be a non-empty string, not {json.dumps(value)[:60]}')
    return value


def turns_of(where, r):
    """(the record's format, its conversation as [{'role', 'content'}])."""
    if not isinstance(r, dict):
        sys.exit(f'error: {where} is not a JSON object; the formats: {FORMATS}')
    if 'messages' in r or 'conversations' in r:
        kind, key, role_key, text_key = ('openai', 'messages', 'role', 'content') if 'messages' in r else \
            ('sharegpt', 'conversations', 'from', 'value')
        if not isinstance(r[key], list) or not r[key]:
            sys.exit(f'error: {where}: {key} must be a non-empty list of turns')
        turns = []
        for i, m in enumerate(r[key]):
            if not isinstance(m, dict) or m.get(role_key) not in ROLES:
                sys.exit(f"error: {where}: {key}[{i}] needs {role_key!r} one of {', '.join(ROLES)}")
            content = m.get(text_key)
            if isinstance(content, list):       # OpenAI's content parts: the text ones, joined
                content = ''.join(p.get('text', '') for p in content if isinstance(p, dict))
            turn = {'role': ROLES[m[role_key]], 'content': text(content, where, f'{key}[{i}].{text_key}')}
            if m.get('weight') == 0 and turn['role'] == 'assistant':
                turn['context_only'] = True     # OpenAI's weight 0: a turn not to learn from
            elif m.get('weight', 1) not in (0, 1):
                sys.exit(f"error: {where}: {key}[{i}].weight is {m['weight']!r}; OpenAI's weights are 0 or 1")
            turns.append(turn)
        return kind, turns
    if 'instruction' in r:
        prompt = text(r['instruction'], where, 'instruction')
        if isinstance(r.get('input'), str) and r['input'].strip():   # (an input of spaces is none)
            prompt += '\n\n' + r['input']
        elif r.get('input') and not isinstance(r['input'], str):
            text(r['input'], where, 'input')          # (not a string: says so)
        return 'alpaca', [{'role': 'user', 'content': prompt},
                          {'role': 'assistant', 'content': text(r.get('output'), where, 'output')}]
    key = next((k for k in RESPONSE_KEYS if k in r), None)
    if 'prompt' in r and key:
        turns = [{'role': 'system', 'content': text(r['system'], where, 'system')}] if r.get('system') else []
        return 'prompt/' + key, turns + [{'role': 'user', 'content': text(r['prompt'], where, 'prompt')},
                                         {'role': 'assistant', 'content': text(r[key], where, key)}]
    sys.exit(f"error: {where} has fields {sorted(r)}, none of the formats: {FORMATS}")


def examples(turns, where):
    """One example per assistant turn that follows a user turn (but one marked context_only):
    {'prompt', 'response'} and, where the turns before it are more than that user turn, 'messages'
    (them)."""
    out = []
    for i, t in enumerate(turns):
        if t['role'] != 'assistant' or t.get('context_only'):
            continue
        before = [{'role': b['role'], 'content': b['content']} for b in turns[:i]]
        if not before or before[-1]['role'] != 'user':
            sys.exit(f'error: {where}: the assistant turn {i} does not answer a user turn')
        ex = {'prompt': before[-1]['content'], 'response': t['content']}
        if len(before) > 1:
            ex['messages'] = before
        out.append(ex)
    if not out:
        sys.exit(f'error: {where} has no assistant turn to train on')
    return out


def convert(records):
    kinds, out = {}, []
    for where, r in records:
        kind, turns = turns_of(where, r)
        kinds[kind] = kinds.get(kind, 0) + 1
        out.append(examples(turns, where))
    return kinds, out


records = records_of(source)
if not records:
    sys.exit(f"error: {source} holds no records")
kinds, train = convert(records)
if val_source:
    val_kinds, val = convert(records_of(val_source))
    seen = {(e['prompt'], e['response']) for x in train for e in x}
    shared = sum((e['prompt'], e['response']) in seen for x in val for e in x)
    if shared:              # a held-out example that is also trained on measures memory, not learning
        sys.exit(f'error: {shared} of the {sum(map(len, val))} examples of val_source={val_source} are also in '
                 f'source={source} (the same prompt and response): hold out records of their own')
else:                                       # whole records held out, so no conversation is split
    if len(train) < 2:
        sys.exit(f'error: {source} holds one record: it cannot be split into train and val (add records, '
                 f'or give val_source=)')
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_val = min(len(train) - 1, max(1, round(val_fraction * len(train))))     # at least one of each
    val = [train[i] for i in sorted(order[:n_val])]
    train = [train[i] for i in sorted(order[n_val:])]
train, val = [e for x in train for e in x], [e for x in val for e in x]

meta_path = start_prepared(out_dir)         # the folder is invalid until meta.json lands
for name in os.listdir(out_dir):            # no files of an earlier preparation left beside the new ones
    if name.endswith('.jsonl'):
        os.remove(os.path.join(out_dir, name))
write_jsonl(os.path.join(out_dir, 'sft_train.jsonl'), train)
write_jsonl(os.path.join(out_dir, 'sft_val.jsonl'), val)
write_json(meta_path, {'kind': 'chat', 'source': source, 'val_source': val_source, 'seed': seed, 'formats': kinds,
                       **({'val_formats': val_kinds} if val_source else {}),
                       'sft_train_records': len(train), 'sft_val_records': len(val)})
found = ', '.join(f'{n} {k}' for k, n in kinds.items())     # (the source's records; val_source's in meta.json)
print(f'{len(records)} records ({found}) -> {len(train)} training and {len(val)} '
      f'validation examples in {out_dir}; next: python sft.py --init_from=out/... --task_dir={out_dir}')
