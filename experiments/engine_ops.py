"""
What an engine decode step runs beyond static batching's: the ATen operations of one decode step
of engine.py (continuous batching over the paged cache, its fixed-shape static steps) and of
generate.generate_tokens with its static cache (static batching), on the same model and rows,
counted with torch.profiler on the CPU (the operators a step calls, whatever the device; on a GPU
most of them are one kernel each, views aside).

$ python experiments/engine_ops.py                         # the default MoE, 64 rows
$ python experiments/engine_ops.py --config=config/tinystories_cpu.py --rows=8

Prints the operations a step per path and each operator whose count differs.
"""

import collections
import os
import runpy
import sys

import torch
from torch.profiler import profile, ProfilerActivity

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import configure  # noqa: E402
from engine import Engine  # noqa: E402
from generate import generate_tokens  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402

# -----------------------------------------------------------------------------
config = 'config/tinystories_moe.py'   # the model (random weights)
rows = 64                    # requests decoding at once
prompt_tokens = 16
steps = 4                    # decode steps counted (the mean is printed)
cache_len = 512              # static batching's cache (the engine's tables span the model's block_size)
# -----------------------------------------------------------------------------
configure(globals(), verbose=False)
settings = runpy.run_path(config)
torch.manual_seed(0)
model = GPT(ModelConfig(**{k: v for k, v in settings.items() if k in ModelConfig.__dataclass_fields__})).eval()
prompts = torch.randint(0, 1000, (rows, prompt_tokens)).tolist()


def operations(fn):
    """Counts of the ATen operators fn calls directly (not those an operator calls inside)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return collections.Counter(e.name for e in prof.events() if e.name.startswith('aten::')
                               and (e.cpu_parent is None or not e.cpu_parent.name.startswith('aten::')))


with torch.no_grad():
    engine = Engine(model, n_blocks=rows * (cache_len // 16 + 1), tokens_per_block=16, max_batch=rows,
                    cuda_graph=True)                     # the static steps (on the CPU without a graph)
    for p in prompts:
        engine.add(p, max_new_tokens=steps + 4)
    while engine.waiting or any(r.pending for r in engine.running):
        engine.step()                                    # the prompts are read
    engine.step()
    paged = operations(lambda: [engine.step() for _ in range(steps)])
    tokens = generate_tokens(model, torch.tensor(prompts), steps + 4, temperature=0.0, cuda_graph=True,
                             cache_len=cache_len)
    next(tokens), next(tokens)
    static = operations(lambda: [next(tokens) for _ in range(steps)])
    tokens.close()
print(f'ATen operations a decode step ({rows} rows, {config}): engine {sum(paged.values()) / steps:.0f}, '
      f'static batching {sum(static.values()) / steps:.0f}')
for name in sorted(set(paged) | set(static), key=lambda k: static[k] - paged[k]):
    if paged[name] != static[name]:
        print(f'  {name:32s} engine {paged[name] / steps:6.1f}   static {static[name] / steps:6.1f}')
