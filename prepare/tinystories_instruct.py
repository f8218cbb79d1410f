"""
Instruction data for the post-training task (see task.py) -> data/tinystories_instruct/

$ python prepare/tinystories_instruct.py                      # Hugging Face roneneldan/TinyStoriesInstruct
$ python prepare/tinystories_instruct.py --source=TinyStoriesInstruct-valid.txt   # local Instruct files
$ python prepare/tinystories_instruct.py --source=../shared/data/tinystories/valid_sample.txt  # plain stories
$ python prepare/tinystories_instruct.py --source=input.txt --paragraphs=True   # tiny-shakespeare speeches

Records in the TinyStories-Instruct format ('Words: ...', 'Features: ...', 'Story: ...') keep their
words (and the dialogue feature); plain stories get words chosen from their own text and features
they satisfy (task.make_task). Writes, as JSONL:
  sft_train.jsonl, sft_val.jsonl        {"prompt", "response", "words", "features"}
  prompts_train.jsonl, prompts_val.jsonl  {"prompt", "words", "features", "reference"}
The prompt files hold held-out prompts for RL and evaluation: their stories are in no SFT file.
With a source that has its own validation split, every *_val file comes from it.
"""

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import configure  # noqa: E402
from data import (local_copy, offline_if_unreachable, read_documents, records_of_lines, train_and_val,  # noqa: E402
                  start_prepared, write_json, write_jsonl)
from task import make_prompt, make_task, parse_instruct  # noqa: E402

# -----------------------------------------------------------------------------
source = 'roneneldan/TinyStoriesInstruct'  # a Hugging Face dataset name, or a local file / folder
HUB_SOURCE = source                  # the one name whose failure falls back to the local sample
out_dir = 'data/tinystories_instruct'
n_prompts_val = 256          # held-out prompts for evaluation
n_prompts_train = 2000       # held-out prompts for RL (PPO, GRPO) and preference sampling
val_fraction = 0.1           # for a source without its own validation split
max_docs = 0                 # use only the first N records of each split (0: all)
paragraphs = False           # split on blank lines (e.g. tiny-shakespeare's speeches); a source
                             # without a val split then keeps its last val_fraction of text for val,
                             # as prepare/shakespeare_char.py does
seed = 1337
# -----------------------------------------------------------------------------
configure(globals())
if not 0 < val_fraction < 1:
    sys.exit(f'error: val_fraction={val_fraction} must be between 0 and 1')
if n_prompts_val < 1 or n_prompts_train < 0:
    sys.exit(f'error: n_prompts_val={n_prompts_val} must be at least 1 (the held-out prompts every stage scores) '
             f'and n_prompts_train={n_prompts_train} at least 0')


def load_hf(name):
    offline_if_unreachable()             # offline: fail at once, not after the library's retries
    try:
        from datasets import load_dataset
    except ImportError:
        sys.exit('error: the Hugging Face source needs `pip install datasets`, or pass --source=PATH')
    try:
        ds = load_dataset(name)
    except Exception as e:
        sample = local_copy('tinystories', 'train_sample_2mb.txt')
        if name == HUB_SOURCE and sample:    # plain stories: each gets a task made from its own text
            print(f"could not load '{name}' from the Hugging Face hub ({type(e).__name__}); using the local "
                  f"TinyStories sample {sample} instead (its stories, with tasks made from their text)",
                  file=sys.stderr)
            global source
            source = sample                  # what meta.json records
            return read_documents(sample)
        sys.exit(f"error: could not load '{name}' from the Hugging Face hub ({type(e).__name__}: "
                 f"{str(e)[:200]}); offline, pass --source=PATH to local TinyStories(-Instruct) files"
                 + ('' if name == HUB_SOURCE else '; if it is a local file or folder, it does not exist'))
    # the hub serves the original files line by line: a record is the lines up to an <|endoftext|> row
    return {'train': records_of_lines(ds['train']['text']), 'val': records_of_lines(ds['validation']['text'])}


def to_examples(docs, offset):
    """Each document -> {'prompt', 'response', 'words', 'features'} (None-free)."""
    out = []
    for i, doc in enumerate(docs):
        rng = random.Random(seed * 1_000_003 + offset + i)      # per document: order-independent
        rec = parse_instruct(doc)
        if rec is not None and rec['words']:
            story, words = rec['story'], rec['words']
            features = dict(rec['features'])
        else:                          # a plain story, or a record's Story without a Words line
            story = rec['story'] if rec is not None else doc.strip()
            task = make_task(story, rng)
            if task is None:
                continue
            words, features = task['words'], task['features']
        out.append({'prompt': make_prompt(words, features), 'response': story,
                    'words': words, 'features': features})
    return out


local = os.path.exists(source) or source.startswith(('.', '/', '~')) or \
    source.endswith(('.txt', '.jsonl', '.json', '.parquet'))
splits = read_documents(os.path.expanduser(source)) if local else load_hf(source)
if paragraphs and not {'train', 'val'} <= set(splits):   # contiguous: the end of the text is val
    text = '\n\n'.join(d for docs in splits.values() for d in docs)
    cut = text.rfind('\n\n', 0, int(len(text) * (1 - val_fraction)))
    splits = {'train': [text[:cut]], 'val': [text[cut:]]}
splits = train_and_val(splits, val_fraction, seed)
if paragraphs:
    splits = {k: [p.strip() for d in v for p in d.split('\n\n') if p.strip()] for k, v in splits.items()}
if max_docs:
    splits = {k: v[:max_docs] for k, v in splits.items()}
train = to_examples(splits['train'], 0)
val = to_examples(splits['val'], 10 ** 9)
random.Random(seed).shuffle(train)
random.Random(seed + 1).shuffle(val)
# held-out prompts first; each split keeps at least half its stories for SFT
n_val = min(n_prompts_val, len(val) // 2)
n_train = min(n_prompts_train, len(train) // 2)
if n_val < 1 or len(train) - n_train < 1:
    sys.exit(f'error: {len(train)} train and {len(val)} val stories are too few to split into SFT '
             f'data and held-out prompts')


def as_prompt(r):
    return {'prompt': r['prompt'], 'words': r['words'], 'features': r['features'], 'reference': r['response']}


meta_path = start_prepared(out_dir)             # the folder is invalid until meta.json lands
files = {'prompts_val': [as_prompt(r) for r in val[:n_val]], 'sft_val': val[n_val:],
         'prompts_train': [as_prompt(r) for r in train[:n_train]], 'sft_train': train[n_train:]}
for name, rows in files.items():
    write_jsonl(os.path.join(out_dir, f'{name}.jsonl'), rows)
    asked = {'prompts_val': n_prompts_val, 'prompts_train': n_prompts_train}.get(name)
    fewer = (f' (of {asked:,} asked for: each split keeps at least half its stories for SFT)'
             if asked and len(rows) < asked else '')
    print(f'{name}: {len(rows):,} records{fewer}')
meta = {'source': source, 'seed': seed, **{f'{k}_records': len(v) for k, v in files.items()},
        'instruct_format': sum(parse_instruct(d) is not None for d in splits['train'][:100]) > 0}
write_json(meta_path, meta)
print(f'wrote {out_dir}; example prompt: {files["sft_train"][0]["prompt"]}')
