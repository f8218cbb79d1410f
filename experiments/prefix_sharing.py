"""
What prefix sharing in engine.py saves: N requests that begin with the same system prompt (as a
chat template puts before every conversation) and end with their own question, served by the
engine with prefix sharing and without, on a small random MLA model (on the CPU unless --device).

$ python experiments/prefix_sharing.py [--requests=16] [--system_len=256] [--arrive_every=2] [--device=cuda]

Requests arrive one every `arrive_every` steps (the first alone, so its prefix is cached by the
time the others come). Prints, for each setting, the prompt tokens run through the model, the
ones reused from shared blocks, the steps and the wall time (the best of `repeats` runs, the two
settings taking turns), and checks that the greedy outputs of the two are the same token for token.
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import configure  # noqa: E402
from engine import Engine  # noqa: E402
from generate import use_cuda_graph  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402

# -----------------------------------------------------------------------------
requests = 16
system_len = 256                 # tokens of the shared system prompt
user_len = 24                    # tokens of each request's own question
max_new_tokens = 16
arrive_every = 2                 # steps between arrivals
tokens_per_block = 16            # tokens per cache block
prefill_chunk = 128
n_layer = 4
n_embd = 128
threads = 0                      # torch CPU threads (0: torch's default)
repeats = 3
device = 'cpu'
cuda_graph = None                # decode steps as CUDA graphs (engine.py); None: on for CUDA
seed = 1337
# -----------------------------------------------------------------------------
configure(globals())
if threads:
    torch.set_num_threads(threads)
graph = use_cuda_graph(cuda_graph, torch.device(device).type)
torch.manual_seed(seed)
model = GPT(ModelConfig(vocab_size=512, block_size=system_len + user_len + max_new_tokens + 8, n_layer=n_layer,
                        n_head=4, n_embd=n_embd, attention='mla', pos_emb='rope', norm='rmsnorm', mlp='swiglu',
                        bias=False, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                        v_head_dim=16)).eval().to(device)
g = torch.Generator().manual_seed(seed)
system = torch.randint(0, 512, (system_len,), generator=g).tolist()
prompts = [system + torch.randint(0, 512, (user_len,), generator=g).tolist() for _ in range(requests)]
n_blocks = requests * -(-(system_len + user_len + max_new_tokens) // tokens_per_block)   # room for all at once


def serve(prefix_sharing):
    engine = Engine(model, n_blocks=n_blocks, tokens_per_block=tokens_per_block, prefill_chunk=prefill_chunk,
                    prefix_sharing=prefix_sharing, cuda_graph=graph)
    engine.capture_graphs()                            # (with cuda_graph on CUDA) not timed
    reqs, steps, t0 = [], 0, time.perf_counter()
    while len(reqs) < len(prompts) or engine.waiting or engine.running:
        if len(reqs) < len(prompts) and steps % arrive_every == 0:
            reqs.append(engine.add(prompts[len(reqs)], max_new_tokens))
        engine.step()
        steps += 1
    return engine, [r.output for r in reqs], steps, time.perf_counter() - t0   # step() syncs (int(token))


serve(True)                                            # warm-up
print(f'{requests} requests: a {system_len}-token system prompt + {user_len} tokens each, {max_new_tokens} new '
      f'tokens, one every {arrive_every} steps; blocks of {tokens_per_block}; {model.num_params() / 1e6:.2f}M-parameter '
      f"MLA model, {device}{f' ({torch.get_num_threads()} threads)' if device == 'cpu' else ''}")
runs = {False: [], True: []}
for _ in range(repeats):
    for on in (False, True):
        runs[on].append(serve(on))
results = {}
for on in (False, True):
    engine, outputs, steps, _ = runs[on][0]
    wall = min(run[3] for run in runs[on])
    s = engine.stats
    results[on] = outputs
    assert all(run[1] == outputs for run in runs[on])
    print(f"prefix sharing {'on ' if on else 'off'}: prefill {s['prefill_tokens']:6,} of {s['prompt_tokens']:,} "
          f"prompt tokens, reused {s['reused_tokens']:6,} (hit rate {engine.hit_rate():5.1%}), "
          f"{steps} steps, {wall:6.2f} s (best of {repeats})")
same = results[True] == results[False]
print(f"greedy outputs with and without sharing {'identical' if same else 'DIFFER'}")
sys.exit(0 if same else 1)
