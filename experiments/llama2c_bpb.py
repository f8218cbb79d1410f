"""
karpathy/llama2.c's published TinyStories validation losses in bits per byte, so they compare with
ours whatever the tokenizer.

$ pip install sentencepiece
$ python experiments/llama2c_bpb.py --tokenizer_model=PATH/llama2.c/tokenizer.model \
      --source=../shared/data/tinystories/valid_sample.txt

llama2.c reports the mean cross entropy per token (nats) of models trained on TinyStories with the
Llama 2 tokenizer (32,000 sentencepiece tokens), each story stripped and encoded with a BOS token
in front (its tinystories.py pretokenize). Bits per byte = loss / ln 2 * tokens / bytes, with
tokens and bytes counted that same way on the same stories: tokens include one BOS per story,
bytes are the UTF-8 bytes of the stripped story. The 260K model uses its own 512-token
vocabulary, which is not in the repository's root, so it is left out. Ours counts one EOT per
story in the same way (meta.json's val_tokens and val_bytes).
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import configure  # noqa: E402
from data import read_documents  # noqa: E402

# -----------------------------------------------------------------------------
tokenizer_model = ''         # llama2.c's tokenizer.model (the Llama 2 sentencepiece model)
source = '../shared/data/tinystories/valid_sample.txt'   # TinyStories text, official .txt layout
gpt2_file = ''               # optional: a gpt2.tiktoken rank file, to print GPT-2's bytes per token too
# -----------------------------------------------------------------------------
configure(globals(), verbose=False)
if not tokenizer_model or not os.path.isfile(tokenizer_model):
    sys.exit(f"error: tokenizer_model='{tokenizer_model}' is not a file; pass llama2.c's tokenizer.model")
try:
    import sentencepiece
except ImportError:
    sys.exit('error: this script needs sentencepiece (pip install sentencepiece)')

# the published table of llama2.c's README: (model, parameters, val loss in nats per token)
LLAMA2C = [('stories15M', '15M', 1.072), ('stories42M', '42M', 0.847), ('stories110M', '110M', 0.760)]

stories = [s.strip() for docs in read_documents(source).values() for s in docs]
sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
n_bytes = sum(len(s.encode('utf-8')) for s in stories)
n_tokens = sum(len(sp.encode(s)) + 1 for s in stories)            # + the BOS before each story
bpt = n_bytes / n_tokens
print(f'{len(stories)} stories from {source}: {n_bytes:,} bytes, {n_tokens:,} Llama 2 tokens '
      f'(BOS included): {bpt:.3f} bytes per token')
if gpt2_file:
    from tokenizer import gpt2_tokenizer
    tok = gpt2_tokenizer(gpt2_file)
    g = sum(len(tok.encode(s)) + 1 for s in stories)              # + the EOT after each story
    print(f'GPT-2 BPE on the same stories: {g:,} tokens (EOT included): {n_bytes / g:.3f} bytes per token')
print()
print('| llama2.c model | parameters | val loss (nats/token) | val bits/byte |')
print('| --- | --- | --- | --- |')
for name, params, loss in LLAMA2C:
    print(f'| {name} | {params} | {loss:.3f} | {loss / math.log(2) / bpt:.3f} |')
