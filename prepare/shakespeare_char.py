"""
tiny-shakespeare (Karpathy's char-rnn corpus, 1.1M characters) -> data/shakespeare_char/

$ python prepare/shakespeare_char.py                                  # downloads it
$ python prepare/shakespeare_char.py --source=../shared/data/shakespeare/input.txt

The first 90% of the text is train, the last 10% val, as in nanoGPT's shakespeare_char.
Character-level by default (65 characters + EOT); --tokenizer=gpt2|bpe|byte|word also work.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import configure, last_given  # noqa: E402
from data import local_copy, not_utf8, write_token_dataset  # noqa: E402
from tokenizer import build_tokenizer, tokenizer_settings_problem  # noqa: E402

# -----------------------------------------------------------------------------
source = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
out_dir = 'data/shakespeare_char'
tokenizer = 'char'
tokenizer_file = ''     # gpt2: a local tiktoken rank file
vocab_size = 1024       # bpe / word
train_fraction = 0.9
# -----------------------------------------------------------------------------
configure(globals())
if problem := tokenizer_settings_problem(tokenizer, tokenizer_file, 'vocab_size' in last_given):
    sys.exit(f'error: {problem}')      # (a setting that would do nothing is refused, not ignored)
if not 0 < train_fraction < 1:
    sys.exit(f'error: train_fraction={train_fraction} must be between 0 and 1')

if source.startswith(('http://', 'https://')):
    import requests
    try:
        r = requests.get(source, timeout=60)
        r.raise_for_status()
        text = r.text
    except requests.RequestException as e:
        local = local_copy('shakespeare', 'input.txt')
        if not local:
            sys.exit(f'error: could not download {source} ({type(e).__name__}); '
                     f'pass --source=PATH to a local copy of input.txt')
        print(f'could not download {source} ({type(e).__name__}); using the local copy {local}', file=sys.stderr)
        with open(local, encoding='utf-8') as f:
            text = f.read()
        source = local                   # what meta.json records
else:
    if os.path.isdir(source) or source.endswith(('.jsonl', '.json', '.parquet')):
        sys.exit(f"error: prepare/shakespeare_char.py reads one plain text file; for '{source}' use "
                 f"python prepare/tinystories.py --source={source} --tokenizer=char --out_dir={out_dir}")
    if not os.path.isfile(source):
        sys.exit(f"error: source '{source}' does not exist")
    try:
        with open(source, encoding='utf-8-sig') as f:
            text = f.read()
    except UnicodeDecodeError as e:
        sys.exit(not_utf8(source, e))
if len(text) < 1000:
    sys.exit(f"error: source '{source}' has only {len(text)} characters, too few to train on (tiny-shakespeare "
             f"has 1.1M)")

n = int(len(text) * train_fraction)
tok = build_tokenizer(tokenizer, texts=[text], vocab_size=vocab_size, tokenizer_file=tokenizer_file or None,
                      fallback_file=local_copy('gpt2.tiktoken'))
print(f'{len(text):,} characters; tokenizer: {tok}')
write_token_dataset(out_dir, {'train': [text[:n]], 'val': [text[n:]]}, tok, source=source,
                    extra_meta={'dataset': 'shakespeare_char'})
