"""
TinyStories (Eldan & Li 2023) -> data/tinystories/{train,val}.bin + meta.json

$ python prepare/tinystories.py                      # Hugging Face roneneldan/TinyStories, GPT-2 BPE
$ python prepare/tinystories.py --source=PATH        # a local .txt / .jsonl / .json / .parquet or folder
$ python prepare/tinystories.py --tokenizer=bpe --vocab_size=4096 --out_dir=data/tinystories_bpe4k
$ python prepare/tinystories.py --source=../shared/data/tinystories/train_sample_2mb.txt \
      --tokenizer_file=../shared/data/gpt2.tiktoken  # fully offline

Offline (the hub unreachable), the default source falls back to the local TinyStories sample
under $SHARED_DATA (default: shared/data beside the checkout), if there is one, and says so:
tinystories/train_sample_2mb.txt (2,316 stories) for train, valid_sample_800kb.txt for val; the
GPT-2 ranks likewise come from its gpt2.tiktoken when tiktoken cannot download them. (The val
set is then the 888 stories of prepare/stories.py's val_tinystories; --source= the whole folder
reads its 24-story valid_sample.txt into val as well: 912.)

With the official files, a folder holding TinyStoriesV2-GPT4-train.txt and -valid.txt keeps their
split; a source with one split is divided, val_fraction of the stories going to val.
Every story is followed by the end-of-text token.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import configure, last_given  # noqa: E402
from data import (local_copy, offline_if_unreachable, read_documents, train_and_val,  # noqa: E402
                  write_token_dataset)
from tokenizer import build_tokenizer, tokenizer_settings_problem  # noqa: E402

# -----------------------------------------------------------------------------
source = 'roneneldan/TinyStories'   # a Hugging Face dataset name, or a local file / folder
HUB_SOURCE = source                  # the one name whose failure falls back to the local sample
out_dir = 'data/tinystories'
tokenizer = 'gpt2'                   # 'gpt2' | 'bpe' | 'byte' | 'char' | 'word'
tokenizer_file = ''                  # gpt2: a local tiktoken rank file instead of the download
vocab_size = 4096                    # bpe / word: vocabulary size, EOT included
tokenizer_train_docs = 200_000       # bpe / word / char: stories the vocabulary is learned from
val_fraction = 0.05                  # for a source without its own validation split
max_docs = 0                         # use only the first N stories of each split (0: all)
num_proc = 0                         # tokenizer processes (0: every core)
# -----------------------------------------------------------------------------
configure(globals())
if not 0 < val_fraction < 1:
    sys.exit(f'error: val_fraction={val_fraction} must be between 0 and 1')
if problem := tokenizer_settings_problem(tokenizer, tokenizer_file, 'vocab_size' in last_given):
    sys.exit(f'error: {problem}')      # (a setting that would do nothing is refused, not ignored)


def load_hf(name):
    offline_if_unreachable()             # offline: fail at once, not after the library's retries
    try:
        from datasets import load_dataset
    except ImportError:
        sys.exit('error: the Hugging Face source needs `pip install datasets`, or pass --source=PATH')
    try:
        ds = load_dataset(name)
    except Exception as e:
        if name != HUB_SOURCE:           # another name (or a mistyped local path): the sample is not it
            sys.exit(f"error: could not load '{name}' from the Hugging Face hub ({type(e).__name__}: "
                     f"{str(e)[:200]}); if it is a local file or folder, it does not exist")
        train, val = local_copy('tinystories', 'train_sample_2mb.txt'), local_copy('tinystories', 'valid_sample_800kb.txt')
        if train and val:
            print(f"could not load '{name}' from the Hugging Face hub ({type(e).__name__}); using the "
                  f"local sample {train} (train) and {val} (val) instead: 2,316 stories, about 0.5M "
                  f"tokens, enough to try the scripts; a GPU-sized run reads it hundreds of times over "
                  f"(the story corpus, python prepare/stories.py, is the larger offline data)", file=sys.stderr)
            global source
            source = f'{train} + {val}'           # what meta.json records
            return {'train': read_documents(train)['train'], 'val': read_documents(val)['val']}
        sys.exit(f"error: could not load '{name}' from the Hugging Face hub ({type(e).__name__}: "
                 f"{str(e)[:200]}); offline, pass --source=PATH to local TinyStories files, or set SHARED_DATA "
                 "to a folder holding tinystories/train_sample_2mb.txt and valid_sample_800kb.txt")
    splits = {'train': ds['train']['text'], 'val': ds['validation']['text']}
    return {k: [t.strip() for t in v if t and t.strip()] for k, v in splits.items()}


local = os.path.exists(source) or source.startswith(('.', '/', '~')) or \
    source.endswith(('.txt', '.jsonl', '.json', '.parquet'))
from_hub = not local and source == HUB_SOURCE          # (before load_hf's offline fallback renames it)
splits = train_and_val(read_documents(os.path.expanduser(source)) if local else load_hf(source), val_fraction)
if max_docs:
    splits = {k: v[:max_docs] for k, v in splits.items()}
print(f"{source}: {len(splits['train']):,} train and {len(splits['val']):,} val documents")

# char: every character of every split (a character set says nothing of the held-out text, and a
# character the vocabulary lacked could not be encoded); the others learn from train only
tok = build_tokenizer(tokenizer, texts=[d for docs in splits.values() for d in docs] if tokenizer == 'char'
                      else splits['train'][:tokenizer_train_docs],
                      vocab_size=vocab_size, tokenizer_file=tokenizer_file or None,
                      fallback_file=local_copy('gpt2.tiktoken'))
print(f'tokenizer: {tok}')
# the dataset's name: TinyStories from the hub (or its local sample), else the folder's (text of one's own)
name = 'tinystories' if from_hub else os.path.basename(os.path.normpath(out_dir))
write_token_dataset(out_dir, splits, tok, source=source, num_proc=num_proc or None, extra_meta={'dataset': name})
