"""
How long SFT's encoding of its examples takes (data.encode_chat_examples: the chat template and,
with word weights, the required words' token weights), in one process and in worker processes,
and that both give the same examples.

$ python experiments/encode_speed.py --task_dir=out/speedrun_cpu/task --repeat=13 --procs="(1, 2)"

(2026-12-06, 2 cores, torch 2.13, GPT-2's BPE from $SHARED_DATA: 60,450 records with word weights
20: 14.0 s in one process, 8.7 s in two, the same examples)
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import configure  # noqa: E402
from data import encode_chat_examples  # noqa: E402
from tokenizer import gpt2_tokenizer, with_chat_tokens  # noqa: E402

# -----------------------------------------------------------------------------
task_dir = 'out/speedrun_cpu/task'     # its sft_train.jsonl
repeat = 13                  # the records this many times over (the GPU card's SFT encodes 299k)
word_weight = 20.0           # the speedrun's word_loss_weight
block_size = 512
procs = (1, 2)               # worker processes to time (1: the one process)
tokenizer_file = os.path.join(os.environ.get('SHARED_DATA') or '../shared/data', 'gpt2.tiktoken')
# -----------------------------------------------------------------------------
configure(globals())
tok = with_chat_tokens(gpt2_tokenizer(tokenizer_file))
with open(os.path.join(task_dir, 'sft_train.jsonl')) as f:
    rows = [json.loads(line) for line in f] * repeat
first = None
for n in procs:
    t = time.perf_counter()
    result = encode_chat_examples(tok, rows, block_size, word_weight, num_proc=n)
    same = '' if first is None else f", the same as {procs[0]} process{'es' if procs[0] > 1 else ''}: {result == first}"
    print(f'{n} process{"es" if n > 1 else ""}: {len(rows):,} records in {time.perf_counter() - t:.1f} s{same}')
    first = first or result
