"""
Where a batch-1 decode token goes on a GPU: kernels per token, the device time of those kernels,
and the wall time per token, for the CUDA-graph decode of a config (compiled step or not). The
difference between wall time and kernel time is the gaps between kernels (inside the graph and
around the host's per-token work), which at batch 1 depend on how many kernels a token takes.

$ python experiments/decode_profile.py config/tinystories_moe.py [--compile_decode=True] [--tokens=128]

Prints where one generate() call goes (the prompt's forward, the per-token replays, and what
capturing the graph anew would add), a table of the kernel kinds of one token (calls per token,
microseconds per token), most frequent first, then one summary line.
"""

import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import configure, model_config_from  # noqa: E402
from runtime import init_runtime, kernel_stats, synchronize  # noqa: E402
from generate import decode_graphs, generate_tokens  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402

# -----------------------------------------------------------------------------
decode_batch = 1                 # rows decoded together (not batch_size: training configs set that)
prompt_len = 32
tokens = 128
compile_decode = True
rows = 40                        # kernel kinds listed
device = 'auto'
dtype = 'auto'
seed = 1337
# -----------------------------------------------------------------------------
config = configure(globals(), model_config=ModelConfig, ignore_unknown_in_files=True)
rt = init_runtime(device, dtype, seed)
if rt.device_type != 'cuda':
    sys.exit('error: decode_profile.py needs a CUDA device (the decode step runs as a CUDA graph)')
model = GPT(model_config_from(config, ModelConfig)).to(rt.device).eval().to(getattr(torch, rt.dtype))
prompt = torch.randint(0, model.config.vocab_size, (decode_batch, prompt_len), device=rt.device)


@torch.no_grad()
def decode(n=tokens):
    with rt.autocast():
        for _ in generate_tokens(model, prompt, n, temperature=0, cuda_graph=True,
                                 compile_step=compile_decode):
            pass


def call_seconds(n, fresh=False):
    """The median wall time of three generate() calls of n new tokens (fresh: each capturing its
    graph anew, as every call did before graphs were kept between calls)."""
    walls = []
    for _ in range(3):
        if fresh:
            decode_graphs(model).clear()
        synchronize('cuda')
        t0 = time.perf_counter()
        decode(n)
        synchronize('cuda')
        walls.append(time.perf_counter() - t0)
    return sorted(walls)[1]


for _ in range(2):                                        # compile, capture, warm up
    decode()
wall = call_seconds(tokens) / tokens
# Where one generate() call goes: n=1 is the prompt's forward alone (no graph is needed for one
# token); the rest are replays and sampling. A call that captures its graph takes longer by
# making it (warm-up steps through the compiled step, then the capture).
t1, t_fresh = call_seconds(1), call_seconds(tokens, fresh=True)
per_token = (wall * tokens - t1) / (tokens - 1)
print(f'a generate() call of {tokens} tokens, {1e3 * wall * tokens:.1f} ms: prompt forward {1e3 * t1:.1f} ms, '
      f'then {1e6 * per_token:.0f} us a token ({decode_batch / per_token:.0f} tokens/s); a call that '
      f'captures its graph anew: {1e3 * t_fresh:.1f} ms ({decode_batch * tokens / t_fresh:.0f} tokens/s)')

with profile(activities=[ProfilerActivity.CUDA]) as prof:
    decode()
    synchronize('cuda')
stats = kernel_stats(prof)
calls = {name: n for name, (_, n) in stats.items()}
device_us = {name: us for name, (us, _) in stats.items()}
n_kernels = sum(calls.values()) / tokens
kernel_us = sum(device_us.values()) / tokens
print(f"{'kernel':70s} {'per token':>9s} {'us/token':>9s}")
for name in sorted(calls, key=lambda n: -calls[n])[:rows]:
    print(f'{name[:70]:70s} {calls[name] / tokens:9.1f} {device_us[name] / tokens:9.1f}')
print(f'\nbatch {decode_batch}, {tokens} tokens, compiled step: {compile_decode}: {n_kernels:.0f} kernels a token '
      f'({len(calls)} kinds), {kernel_us:.0f} us of kernels a token, {1e6 * wall:.0f} us wall a token '
      f'({decode_batch / wall:.0f} tokens/s); gaps {1e6 * wall - kernel_us:.0f} us a token, '
      f'{(1e6 * wall - kernel_us) / max(n_kernels, 1):.2f} us per kernel')
