"""
Speculative decoding with a checkpoint's own MTP modules, measured at batch 1: the share of drafted
tokens the main model accepts, tokens per forward pass of the main model, and tokens/s against
plain greedy decoding through the same KV cache (eager, and with each step replayed as a CUDA graph).

$ python experiments/speculative_bench.py --out_dir=out/speedrun_gpu/base
$ python experiments/speculative_bench.py --out_dir=out/run --max_new_tokens=128 --device=cpu

The checkpoint must have been trained with mtp_depth >= 1. Prompts are story openings (raw text, or
the user's turn for a chat checkpoint). Prints one row per method and whether its tokens equal eager
greedy decoding's (in bf16 a verify pass over several tokens can round differently from one-token
steps, so a near-tie may go the other way: the row says how many answers matched exactly).
"""

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import load_model  # noqa: E402
from config import configure  # noqa: E402
from generate import generate_speculative, generate_tokens  # noqa: E402
from runtime import init_runtime  # noqa: E402

out_dir = 'out/speedrun_gpu/base'
max_new_tokens = 256
stop_at_eot = False          # False: every answer is max_new_tokens long (a fixed amount of work)
repeats = 1                  # timed passes over the prompts (after one warm-up pass)
device = 'auto'
dtype = 'auto'
out_file = ''                # also write the results as JSON here
seed = 1337
configure(globals(), verbose=False)

OPENINGS = ['Once upon a time, there was a little girl named Lily.', 'One day, a boy found a shiny key in the garden.',
            'The old king had three sons.', 'In a small village by the sea lived a poor fisherman.',
            'Tom and his dog went to the forest.', 'The little bird could not fly.',
            'There was once a wizard who lived in a tall tower.', 'Anna wanted to bake a cake for her mother.']

rt = init_runtime(device, dtype, seed)
model, tok, ckpt = load_model(out_dir, rt.device)
model.eval()
if rt.dtype != 'float32':
    model.to(getattr(torch, rt.dtype))
if not model.config.mtp_depth:
    sys.exit(f'error: {out_dir} has no MTP modules (train it with --mtp_depth=1)')
prompts = [tok.encode_chat(t)[0] if tok.chat else [tok.eot_id] + tok.encode(t) for t in OPENINGS]
stops = tuple(tok.stop_ids() if tok.chat else [tok.eot_id]) if stop_at_eot else ()


def sync():
    if rt.device_type == 'cuda':
        torch.cuda.synchronize()


def greedy(prompt, cuda_graph):
    out = []
    for t in generate_tokens(model, torch.tensor([prompt], device=rt.device), max_new_tokens, temperature=0,
                             stop_ids=stops or None, cuda_graph=cuda_graph):
        out.append(int(t[0]))
        if out[-1] in stops:
            break
    return out


methods = {'greedy, eager': lambda p: (greedy(p, False), None),
           'speculative (MTP drafts), eager': lambda p: generate_speculative(model, p, max_new_tokens, stop_ids=stops)}
if rt.device_type == 'cuda':
    methods['greedy, CUDA graph'] = lambda p: (greedy(p, True), None)
results, reference = {}, None
for name, fn in methods.items():
    with rt.autocast():
        for p in prompts:
            fn(p)                                   # warm-up: every prompt once (a graph per prompt length)
        sync()
        t0, outs, stats = time.time(), [], {'drafted': 0, 'accepted': 0, 'forward_passes': 0}
        for _ in range(repeats):
            outs = []
            for p in prompts:
                toks, s = fn(p)
                outs.append(toks)
                for k in stats:
                    stats[k] += (s or {}).get(k, 0)
        sync()
        seconds = time.time() - t0
    n = sum(len(o) for o in outs) * repeats
    reference = reference or outs
    row = {'tokens': n, 'seconds': seconds, 'tokens_per_s': n / seconds,
           'same_as_greedy': sum(a == b for a, b in zip(outs, reference)), 'answers': len(outs)}
    if stats['drafted']:
        row.update(acceptance=stats['accepted'] / stats['drafted'], tokens_per_forward=n / stats['forward_passes'])
    results[name] = row
base = results['greedy, eager']['tokens_per_s']
print(f"{out_dir}: {len(prompts)} prompts x {max_new_tokens} new tokens at most, batch 1, {rt.device} {rt.dtype}")
print("| method | tokens/s | vs eager greedy | acceptance | tokens per main forward | answers equal to greedy |")
print('| --- | --- | --- | --- | --- | --- |')
for name, r in results.items():
    print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}x | "
          f"{r.get('acceptance', float('nan')):.1%} | {r.get('tokens_per_forward', 1.0):.2f} | "
          f"{r['same_as_greedy']}/{r['answers']} |")
if out_file:
    with open(out_file, 'w') as f:
        json.dump(results, f, indent=2)
