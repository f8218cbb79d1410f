"""
Serving benchmark: throughput and latency of many concurrent requests with mixed prompt and
output lengths, served by the engine (continuous batching over the paged cache), by our own static
batching of the same requests (generate.generate_tokens on each group of `streams` requests, to the
longest output of the group), and optionally by transformers' generate on the exported model.
Methods: engine (each step's tokens read back one step late, so the host prepares the next step
while the device runs this one: Engine(overlap=True)), engine_sync (read back at once), static, hf.

$ python bench_serve.py config/tinystories_moe.py                      # a random-weight model of a config
$ python bench_serve.py --checkpoint=out/speedrun_gpu/base --streams=1,8,64,256
$ python bench_serve.py config/tinystories_cpu.py --device=cpu --streams=1,4 --n_requests=8 \
    --max_prompt=64 --max_output=32
$ python bench_serve.py config/tinystories_moe.py --streams=64 --n_requests=128 --profile=out/serve_profile.txt

Each level of concurrency C keeps C requests in flight (closed loop: a finished request is replaced
by the next one at once; static batching takes the next C at once, when the whole group before has
finished). Outputs never stop early (no stop token), so every method produces the same tokens.
Reported per method and C: generated tokens per second, time to first token (p50, p99) counted
from when the request was submitted (for static batching: when its client's previous request
finished, so the wait for the rest of that group counts) and the time between a request's tokens
(p50, p99; interpolated, with the number of samples in the JSON: a p99 of fewer than 100 samples is
close to their maximum). The engine's pool holds C requests of the longest length at once.
Also reported: the steps each method ran (static batching: per group a prompt step and one step
per token of its longest output) and their ratio, static steps / engine steps, the speed-up that
scheduling alone gives when a step of either costs the same: the ceiling of engine / static for
this workload unless the engine's steps are cheaper. With uniform output lengths it stays below 2
at 64 streams however many requests (1.13 for 128 requests, 1.57 for 512, 1.86 for 4,096: the
longest of 64 outputs is close to max_output, their mean half of it, and the last requests finish
alone); output_lengths='exponential' draws them from a long tail instead (mean mean_output, clipped
to min_output..max_output), as chat traffic has.
cuda_graph (None: on for CUDA) makes the engine's steps CUDA graphs, one per (rows, prompt-chunk
columns) bucket, all captured before the engine is timed, and static batching's one-token steps
too (one cache length for every group, so one graph per batch size, captured in a warm-up).
"""

import contextlib
import json
import os
import random
import sys
import time

import numpy as np
import torch

from checkpoint import load_model
from config import configure, model_config_from
from engine import Engine, cache_numbers_per_token
from generate import generate_tokens, pad_prompts, use_cuda_graph
from model import GPT, ModelConfig
from runtime import init_runtime, kernel_stats, write_profile

# -----------------------------------------------------------------------------
checkpoint = ''                 # a checkpoint folder to serve; '': a random-weight model of the config given
streams = '1,8,64,256'          # concurrency levels
n_requests = 0                  # requests per level (0: max(4 x streams, 32))
min_prompt, max_prompt = 16, 128      # prompt lengths, uniform (max_prompt + max_output <= block_size)
min_output, max_output = 16, 384      # output lengths
output_lengths = 'uniform'      # 'uniform' in min_output..max_output | 'exponential': min_output + an
mean_output = 128               # exponential draw, mean mean_output in all, clipped to max_output
methods = 'engine,static'       # any of engine, engine_sync, static, hf (transformers' generate on the export)
cuda_graph = None               # the engine's decode steps and static batching's one-token steps as
                                # CUDA graphs; None: on for CUDA
compile_step = False            # with the graphs: both methods' steps fused by torch.compile first (the engine's
                                # per (rows, columns) bucket, static batching's per batch size); compiled before
                                # the timing, like the captures
tokens_per_block = 16           # the engine's cache block (tokens)
prefill_chunk = 256             # prompt tokens the engine reads a step
prompt_rows = None              # the engine's prompt tokens as rows of its one-token pass (None: with the
                                # graphs; False: each step's prompt chunks in a pass of their own; engine.py)
device = 'auto'
dtype = 'auto'
seed = 1337
out_file = ''                   # also write the results as JSON here
profile = ''                    # a file: each method's run at each level under torch.profiler, its tables
                                # appended there (operations, kernels by kind, where the device waited) and
                                # one line per run printed: kernels and their device time per step (fewer
                                # requests are enough: --n_requests=128)
steps_only = False              # run no model: print the steps each level's workload needs from static batching
                                # and from a perfect continuous batcher (a request's prompt in one step,
                                # then one step a token), and their ratio
# -----------------------------------------------------------------------------
config = configure(globals(), model_config=ModelConfig, ignore_unknown_in_files=True)
rt = init_runtime(device, dtype, seed)
graph = use_cuda_graph(cuda_graph, rt.device_type)
if compile_step and not graph:
    sys.exit('error: compile_step=True fuses the CUDA-graph steps: it needs cuda_graph on (the default on CUDA)')
if prompt_rows and not graph:
    sys.exit('error: prompt_rows=True puts prompt tokens in the fixed-shape steps: it needs cuda_graph on '
             '(the default on CUDA)')
levels = [int(s) for s in str(streams).split(',') if s.strip()]
methods = [m.strip() for m in methods.split(',') if m.strip()]
bad = [m for m in methods if m not in ('engine', 'engine_sync', 'static', 'hf')]
if bad or not levels or min(levels) < 1:
    sys.exit(f'error: methods {bad} unknown (valid: engine, engine_sync, static, hf) or streams={streams!r} not '
             f'positive integers')
if output_lengths not in ('uniform', 'exponential') or (output_lengths == 'exponential'
                                                       and not min_output <= mean_output <= max_output):
    sys.exit(f"error: output_lengths={output_lengths!r} (valid: uniform, exponential) or mean_output={mean_output} "
             f"outside min_output..max_output ({min_output}..{max_output})")
def workload(n, vocab_size):
    """n requests: (prompt token ids, output length). The lengths come from their own random stream,
    so they do not depend on the vocabulary (steps_only draws the same ones)."""
    rng, tokens = random.Random(seed), random.Random(seed + 1)

    def output_length():
        if output_lengths == 'uniform':
            return rng.randint(min_output, max_output)
        return min(max_output, min_output + int(rng.expovariate(1 / max(1e-9, mean_output - min_output))))
    lengths = [(rng.randint(min_prompt, max_prompt), output_length()) for _ in range(n)]
    return [([tokens.randrange(vocab_size) for _ in range(p)], o) for p, o in lengths]


def scheduled_steps(reqs, C):
    """(static batching's steps, a perfect continuous batcher's) for the requests' output lengths at
    C streams, in a closed loop: static batching runs each group of C to its longest output (a
    prompt step, then a step for each token after the first); the batcher admits a request the step
    after one leaves and gives each running request one token a step."""
    static = sum(max(n for _, n in reqs[i:i + C]) for i in range(0, len(reqs), C))
    queue, running, steps = [n for _, n in reqs], [], 0
    while queue or running:
        k = C - len(running)
        running, queue = running + queue[:k], queue[k:]
        steps += 1
        running = [n - 1 for n in running if n > 1]
    return static, steps


if steps_only:
    print('| streams | requests | static steps | continuous steps | ratio |')
    print('| --- | --- | --- | --- | --- |')
    for C in levels:
        n = n_requests or max(4 * C, 32)
        st, ct = scheduled_steps(workload(n, 2), C)
        print(f'| {C} | {n} | {st:,} | {ct:,} | {st / ct:.2f} |')
    sys.exit(0)
if checkpoint:
    model, tok, _ = load_model(checkpoint, rt.device)
else:
    model = GPT(model_config_from(config, ModelConfig)).to(rt.device)
model.eval()
if rt.dtype != 'float32':
    model.to(getattr(torch, rt.dtype))
c = model.config
if max_prompt + max_output > c.block_size:
    sys.exit(f'error: max_prompt + max_output = {max_prompt + max_output} exceeds the block_size {c.block_size}')


def sync():
    if rt.device_type == 'cuda':
        torch.cuda.synchronize()


def percentiles(xs):
    """(p50, p99), linearly interpolated between the nearest samples."""
    return tuple(float(p) for p in np.percentile(xs, (50, 99))) if xs else (float('nan'), float('nan'))


engine_modes = set()            # how the engine's steps ran (Engine.decode_mode)


engine_setup = {}               # streams -> the graphs' capture: seconds, graphs, GPU memory reserved after


def run_engine(reqs, C, overlap=True, timed=None):
    """Closed loop over the engine: C requests in flight. Returns (seconds, first-token delays,
    inter-token gaps, tokens, steps); the capture's cost goes to engine_setup[C]. timed: a context
    around the timed loop alone (after the capture)."""
    longest = max(len(p) + n for p, n in reqs)                      # C of the longest at once: no request
    n_blocks = C * -(-longest // tokens_per_block) + 16             # waits for blocks, C are always running
    engine = Engine(model, n_blocks=n_blocks, tokens_per_block=tokens_per_block, max_batch=C, prefill_chunk=prefill_chunk,
                    cuda_graph=graph, overlap=overlap, compile_step=compile_step, prompt_rows=prompt_rows)
    t_capture = time.time()
    engine.capture_graphs(prefill=True)        # every (rows, columns) bucket's graph before the timing
    sync()
    engine_setup[C] = {'capture_s': time.time() - t_capture, 'graphs': engine.stats['graph_captures'],
                       'memory_reserved_gb': torch.cuda.memory_reserved() / 1e9 if rt.device_type == 'cuda' else None}
    queue, started, last, ttft, gaps, tokens = list(reqs), {}, {}, [], [], 0
    with timed or contextlib.nullcontext():
        t0 = time.time()
        while queue or engine.running or engine.waiting:
            while queue and len(engine.running) + len(engine.waiting) < C:
                p, n = queue.pop(0)
                r = engine.add(p, n)
                started[r.id] = time.time()
            events = engine.step()         # its tokens are on the host already (no sync(): with overlap
            now = time.time()              # the next step is running on the device now)
            for r, tok_, finished in events:
                if tok_ is None:
                    continue
                tokens += 1
                if r.id not in last:
                    ttft.append(now - started[r.id])
                else:
                    gaps.append(now - last[r.id])
                last[r.id] = now
        seconds = time.time() - t0
    engine_modes.add(engine.decode_mode())
    engine_setup[C]['engine_stats'] = dict(engine.stats)      # (in the JSON: e.g. the steps that read prompts)
    return seconds, ttft, gaps, tokens, engine.stats['steps']


def run_static(reqs, C, generate_group):
    """Groups of C requests in arrival order, each run to its longest output; a request's tokens
    count up to its own length (the rest of the group's steps are the waste continuous batching
    avoids). Client j of the C submits its next request when its last one finished; it waits
    there until the whole group has finished, and that wait counts in its time to first token."""
    ttft, gaps, tokens, steps = [], [], 0, 0
    t0 = time.time()
    submitted = [t0] * C                          # when client j's request of this group was sent
    for i in range(0, len(reqs), C):
        group = reqs[i:i + C]
        times = generate_group([p for p, _ in group], max(n for _, n in group))
        steps += len(times)                       # the prompt step, then one step a token after the first
        for j, (p, n) in enumerate(group):
            ttft.append(times[0] - submitted[j])
            gaps += [b - a for a, b in zip(times[:n - 1], times[1:n])]
            tokens += n
            submitted[j] = times[n - 1]           # its last token: the client sends the next one
    return time.time() - t0, ttft, gaps, tokens, steps


def ours_group(prompts, n):
    idx, mask = pad_prompts(prompts, device=rt.device)
    times = []
    for _ in generate_tokens(model, idx, n, temperature=0, prompt_mask=mask, cuda_graph=graph,
                             compile_step=compile_step, cache_len=max_prompt + max_output):   # one captured step per batch size
        sync()
        times.append(time.time())
    return times


hf_model = None
if 'hf' in methods:                               # transformers' DeepseekV3ForCausalLM on the export
    import tempfile
    import transformers
    from convert_hf import export_hf
    with tempfile.TemporaryDirectory() as d:
        export_hf(model.float(), d)
        hf_model = transformers.DeepseekV3ForCausalLM.from_pretrained(d, torch_dtype=getattr(torch, rt.dtype))
    hf_model.to(rt.device).eval()
    model.to(getattr(torch, rt.dtype))


def hf_group(prompts, n):
    """transformers' generate (greedy, its own static batching) with a streamer to time each step."""
    idx, mask = pad_prompts(prompts, device=rt.device)
    times = []

    class Clock:
        def put(self, value):
            sync()
            times.append(time.time())

        def end(self):
            pass
    hf_model.generate(input_ids=idx, attention_mask=mask.long(), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, streamer=Clock(), pad_token_id=0)
    return times[1:]                               # the first put() is the prompt


def profiled(title):
    """A context that runs its body under torch.profiler when `profile` names a file (else nothing),
    appends the tables there and leaves the device's kernels in prof_stats[title]."""
    if not profile:
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if rt.device_type == 'cuda' else [])

    @contextlib.contextmanager
    def run():
        with torch.profiler.profile(activities=acts) as prof:
            yield
            sync()
        write_profile(prof, profile, title, rt.device_type)
        prof_stats[title] = kernel_stats(prof)
    return run()


prof_stats = {}                 # title -> {kernel: (microseconds, launches)} (profile=)
if profile and os.path.exists(profile):
    os.remove(profile)
rows, results = [], []
with rt.autocast():
    run_engine(workload(4, c.vocab_size), 2)                     # warm-up (allocator, kernels)
    run_engine(workload(4, c.vocab_size), 2, overlap=False)
    engine_setup.clear()
    for C in levels:
        reqs = workload(n_requests or max(4 * C, 32), c.vocab_size)
        for m in methods:
            title = f'{m} at {C} streams, {len(reqs)} requests'
            if m in ('engine', 'engine_sync'):
                secs, ttft, gaps, tokens, steps = run_engine(reqs, C, overlap=m == 'engine', timed=profiled(title))
            else:
                fn = ours_group if m == 'static' else hf_group
                fn([reqs[0][0]] * min(C, len(reqs)), 4)   # warm-up: the graph of this batch size
                with profiled(title):
                    secs, ttft, gaps, tokens, steps = run_static(reqs, C, fn)
            if prof_stats.get(title):    # on CUDA: the device's kernels
                k = prof_stats[title]
                us, n = sum(t for t, _ in k.values()), sum(n for _, n in k.values())
                print(f'profile, {title}: {n / steps:.0f} kernels and {us / steps:.0f} us of them a step '
                      f'({steps} steps, {1e6 * secs / steps:.0f} us wall a step); tables in {profile}', flush=True)
            r = {'method': m, 'streams': C, 'requests': len(reqs), 'tokens': tokens, 'seconds': secs, 'steps': steps,
                 'tokens_per_s': tokens / secs, 'ttft_p50': percentiles(ttft)[0], 'ttft_p99': percentiles(ttft)[1],
                 'itl_p50': percentiles(gaps)[0], 'itl_p99': percentiles(gaps)[1], 'ttft_samples': len(ttft),
                 'itl_samples': len(gaps),
                 **(engine_setup[C] if m.startswith('engine') else {})}
            results.append(r)
            print(f"{m:7s} streams {C:4d}: {r['tokens_per_s']:10,.0f} tokens/s; first token p50 {r['ttft_p50'] * 1e3:8.1f} ms, "
                  f"p99 {r['ttft_p99'] * 1e3:8.1f} ms; between tokens p50 {r['itl_p50'] * 1e3:6.1f} ms, "
                  f"p99 {r['itl_p99'] * 1e3:6.1f} ms", flush=True)

per_token = cache_numbers_per_token(c)
elem = torch.finfo(getattr(torch, rt.dtype)).bits // 8
print(f"\n{checkpoint or 'random weights'}: {model.num_params() / 1e6:.0f}M parameters, {rt.device} {rt.dtype}; prompts "
      f"{min_prompt}-{max_prompt}, outputs {min_output}-{max_output} tokens; paged cache {per_token:,} numbers "
      f"= {per_token * elem:,} bytes per token; engine steps: {', '.join(sorted(engine_modes)) or '-'}; "
      f"static batching's one-token steps: "
      f"{('CUDA graphs' if rt.device_type == 'cuda' else 'fixed shapes, eager') if graph else 'eager'}")
for C, setup in engine_setup.items():
    if setup['graphs']:
        memory = f", {setup['memory_reserved_gb']:.1f} GB reserved after" if setup['memory_reserved_gb'] else ''
        print(f"engine at {C} streams: {setup['graphs']} graphs captured in {setup['capture_s']:.1f} s{memory}")
print('| streams | method | tokens/s | vs static | steps (static / these) | ms a step | first token p50 / p99 (ms) '
      '| between tokens p50 / p99 (ms) |')
print('| --- | --- | --- | --- | --- | --- | --- | --- |')
for r in results:
    static = next((s for s in results if s['method'] == 'static' and s['streams'] == r['streams']), None)
    vs = f"{r['tokens_per_s'] / static['tokens_per_s']:.2f}x" if static else '-'
    ceiling = f" ({static['steps'] / r['steps']:.2f})" if static else ''
    print(f"| {r['streams']} | {r['method']} | {r['tokens_per_s']:,.0f} | {vs} | {r['steps']:,}{ceiling} | "
          f"{r['seconds'] / r['steps'] * 1e3:.2f} | {r['ttft_p50'] * 1e3:.1f} / {r['ttft_p99'] * 1e3:.1f} | "
          f"{r['itl_p50'] * 1e3:.1f} / {r['itl_p99'] * 1e3:.1f} |")
if out_file:
    with open(out_file, 'w') as f:
        json.dump({'config': {k: v for k, v in config.items()}, 'results': results}, f, indent=2, default=str)
