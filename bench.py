"""
Speed and memory of a model config: the training step (forward + backward + optimizer), prefill
and decode, on random tokens; optionally transformers' DeepseekV3ForCausalLM with the same
config and weights, timed the same way in the same process: eager, as its generate() and a
training loop of one's own run it (ours compiled where compile is on: the table says which), and
loaded only after our first training round, so that round's peak memory is ours alone (its own
peak includes our weights and optimizer state, resident beside it).

$ python bench.py config/tinystories_moe.py
$ python bench.py config/tinystories_moe.py --compare_hf=True
$ python bench.py config/tinystories_moe.py --device=cpu --batch_size=4 --block_size=64 --moe_impl=loop

Decoding runs with the weights in the compute dtype (bf16 on GPUs, for both models), eagerly and,
on CUDA with cuda_graph=True, with every one-token step replayed as a CUDA graph.

Reports the median of `steps` timed repetitions after `warmup` untimed ones, synchronising the
device around each. MFU = model FLOPs per second (active experts and attention, see
GPT.flops_per_token) over the peak of a large bf16 matmul measured on this device.
"""

import json
import os
import statistics
import sys
import tempfile
import time

import torch

from config import configure, model_config_from
from runtime import compile_mode_arg, CUDAGraphStep, init_runtime, measure_peak_flops, synchronize, write_profile
from generate import generate_tokens, new_cache
from model import GPT, ModelConfig, padded_vocab_size
from optim import build_optimizer
from quant import BITS, quantize_model, weight_bytes

# -----------------------------------------------------------------------------
batch_size = 64
block_size = 512
vocab_size = 0                  # 0: the config's dataset's (data/<dataset>/meta.json, padded), else GPT-2's 50,304
dataset = ''                    # (train.py configs name it) the data folder whose vocabulary the model gets
optimizer = 'adamw'
learning_rate = 1e-4            # small: the weights should stay sane while timing
weight_decay = 0.1
modes = 'train,prefill,decode'  # any of train, prefill, decode, optimizer (the optimizer step alone)
quantize = ''                   # 'int8' | 'int4': prefill and decode with quantized weights (quant.py)
steps = 10                      # timed repetitions (median reported)
warmup = 3
decode_batches = (1, 64)        # batch sizes for decode timing
decode_tokens = 128             # new tokens per decode timing
prompt_len = 32
cuda_graph = True               # also time decoding with each step replayed as a CUDA graph
compile_decode = True           # and with the graph of a torch.compile'd step
compare_hf = False              # also time transformers' DeepseekV3ForCausalLM (needs transformers)
hf_rounds = 3                   # with compare_hf: training timed in this many alternating rounds (ours,
                                # transformers, ours, ...), each side's median round reported, so
                                # that a slow or fast spell of the GPU falls on both
compile = None                  # torch.compile the training step; None: on for CUDA
compile_mode = 'default'        # torch.compile's mode (runtime.COMPILE_MODES), e.g. 'reduce-overhead'
cuda_graph_train = False        # replay the whole training step (forward, backward, AdamW) as one CUDA graph
inductor = {}                   # torch._inductor.config settings to try, e.g. --inductor="{'combo_kernels': True}"
device = 'auto'
dtype = 'auto'
seed = 1337
out_file = ''                   # write the results as JSON here
profile = ''                    # write torch.profiler tables (top kernels per mode) to this file
# -----------------------------------------------------------------------------
config = configure(globals(), model_config=ModelConfig, ignore_unknown_in_files=True)
rt = init_runtime(device, dtype, seed)
if vocab_size == 0:                           # the model the config trains: train.py sizes its vocabulary so
    meta = os.path.join('data', dataset, 'meta.json') if dataset else ''
    if meta and os.path.isfile(meta):
        with open(meta) as f:
            config['vocab_size'] = padded_vocab_size(json.load(f)['vocab_size'])
    else:
        config['vocab_size'] = 50304
        print(f"vocab_size 50,304 (GPT-2's): {meta or 'no dataset named'} {'not found' if meta else ''}".strip(),
              file=sys.stderr)
cfg = model_config_from(config, ModelConfig)
modes = [m.strip() for m in modes.split(',') if m.strip()]
bad = [m for m in modes if m not in ('train', 'prefill', 'decode', 'optimizer')]
if bad:
    sys.exit(f"error: modes={bad}; valid: train, prefill, decode, optimizer")
try:
    compile_mode_arg(compile_mode)
except ValueError as e:
    sys.exit(f'error: {e}')
cuda = rt.device_type == 'cuda'
if inductor:
    import torch._inductor.config as inductor_config
    for k, v in inductor.items():             # dotted keys reach sub-configs: 'triton.enable_pdl'
        *parents, name = k.split('.')
        try:
            section = inductor_config
            for p in parents:
                section = getattr(section, p)
            getattr(section, name)
        except AttributeError:
            sys.exit(f"error: inductor={{'{k}': ...}}: torch {torch.__version__} has no torch._inductor.config.{k}")
        setattr(section, name, v)
if compile is None:
    compile = cuda


def timed(fn, n=steps, n_warmup=warmup):
    """Median seconds of fn() over n runs after n_warmup, synchronised around each."""
    for _ in range(n_warmup):
        fn()
    times = []
    for _ in range(n):
        synchronize(rt.device_type)
        t0 = time.perf_counter()
        fn()
        synchronize(rt.device_type)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profiled(name, fn):
    """One more run of fn under torch.profiler; its top operations by device time go to `profile`."""
    if not profile:
        return
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=acts) as prof:
        fn()
        synchronize(rt.device_type)
    write_profile(prof, profile, name, rt.device_type)


def peak_memory_gb():
    return torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float('nan')


def reset_memory():
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def bench_train(model, step_fn, flops_per_token, reset=True):
    if reset:
        reset_memory()
    dt = timed(step_fn)
    tok_s = batch_size * block_size / dt
    return {'step_ms': 1000 * dt, 'tokens_per_sec': tok_s, 'mfu': flops_per_token * tok_s / peak,
            'peak_mem_gb': peak_memory_gb()}


def our_train_step(model, opt, x, y):
    def step():
        with rt.autocast():
            _, loss = model(x, y, return_logits=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        raw.update_router_bias()
    return step


def hf_train_step(model, opt, x):
    def step():
        with rt.autocast():
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


torch.manual_seed(seed)
raw = GPT(cfg).to(rt.device)
peak = measure_peak_flops(rt.device_type, rt.dtype)
print(f'{rt.device} ({torch.cuda.get_device_name() if cuda else "cpu"}), {rt.dtype}, torch {torch.__version__}; '
      f'matmul peak {peak / 1e12:.1f} TFLOP/s; {raw.num_params() / 1e6:.1f}M parameters, '
      f'{raw.active_params() / 1e6:.1f}M active; batch {batch_size} x {block_size}', flush=True)
x = torch.randint(0, cfg.vocab_size, (batch_size, block_size), device=rt.device)
y = torch.roll(x, -1, 1)
results = {'config': {k: v for k, v in config.items()}, 'device': rt.device, 'peak_flops': peak}
flops = raw.flops_per_token(block_size)



def load_hf():
    """transformers' DeepseekV3ForCausalLM with our weights (as initialised: exported before training)."""
    import transformers
    from convert_hf import export_hf
    with tempfile.TemporaryDirectory() as d:
        export_hf(raw, d)
        model = transformers.DeepseekV3ForCausalLM.from_pretrained(d, torch_dtype=torch.float32).to(rt.device)
    print(f'transformers {transformers.__version__}: DeepseekV3ForCausalLM with the same weights (eager)', flush=True)
    return model


hf = None
if compare_hf and 'train' in modes:     # the weights transformers' model gets: ours before our steps
    hf_weights = {k: v.detach().cpu().clone() for k, v in raw.state_dict().items()}

if 'train' in modes:
    raw.train()
    model = torch.compile(raw, mode=compile_mode_arg(compile_mode)) if compile else raw
    graphed = cuda_graph_train and cuda
    if cuda_graph_train and not cuda:
        sys.exit('error: cuda_graph_train=True needs a CUDA GPU')
    try:
        opt = build_optimizer(raw, optimizer, learning_rate, weight_decay, device_type=rt.device_type,
                              capturable=graphed)
    except ValueError as e:
        sys.exit(f'error: {e}')

    def captured_step():
        step = CUDAGraphStep(our_train_step(model, opt, x, y), warmup=3)
        for _ in range(4):            # 3 plain steps, then the capture (and its first replay)
            step()
        return step

    train_step = None if graphed else our_train_step(model, opt, x, y)
    ours, theirs, hopt = [], [], None
    for r in range(max(1, hf_rounds) if compare_hf else 1):
        if train_step is None:
            if r == 0:
                reset_memory()        # the graph's memory pool is taken while capturing: count it
            train_step = captured_step()
        ours.append(bench_train(raw, train_step, flops, reset=not (graphed and r == 0)))
        print('train', ours[-1], flush=True)
        if compare_hf and hf is None:      # after our first round, whose peak memory is then ours alone
            trained = {k: v.detach().clone() for k, v in raw.state_dict().items()}
            raw.load_state_dict(hf_weights)                          # transformers gets the initial weights
            hf = load_hf()
            raw.load_state_dict(trained)
            del trained, hf_weights
        if hf is not None:
            if graphed:               # give the graph's memory pool back for transformers' round (at
                train_step = None     # batch 128 the two do not fit together); captured again after
                torch.cuda.empty_cache()
            hf.train()
            hopt = hopt or torch.optim.AdamW(hf.parameters(), lr=learning_rate, fused=cuda)
            # transformers' DeepseekV3 trains no MTP module: its MFU counts the model without them
            theirs.append(bench_train(hf, hf_train_step(hf, hopt, x), raw.flops_per_token(block_size, mtp=False)))
            print('train_hf', theirs[-1], flush=True)
    median_round = lambda rs: sorted(rs, key=lambda m: m['tokens_per_sec'])[len(rs) // 2]   # noqa: E731
    # peak memory from the first round, before transformers' model was loaded
    results['train'] = {**median_round(ours), 'peak_mem_gb': ours[0]['peak_mem_gb']}
    if theirs:
        results['train_hf'] = median_round(theirs)
        results['train_rounds'] = {'ours': [m['tokens_per_sec'] for m in ours],
                                   'transformers': [m['tokens_per_sec'] for m in theirs]}
        del hopt
        hf.zero_grad(set_to_none=True)
    if profile and train_step is None:
        train_step = captured_step()
    profiled('train step', train_step)
    del opt, model, train_step
    raw.zero_grad(set_to_none=True)

# inference runs with the weights in the compute dtype (bf16 on GPUs; RoPE frequencies and router
# biases stay float32, see GPT._apply) rather than float32 weights cast by autocast at every call
if 'optimizer' in modes:              # optimizer.step() alone, on fixed random gradients
    opt = build_optimizer(raw, optimizer, learning_rate, weight_decay, device_type=rt.device_type)
    for p in raw.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    dt = timed(opt.step)
    profiled(f'{optimizer} step', opt.step)
    results['optimizer'] = {'step_ms': 1000 * dt}
    print('optimizer', results['optimizer'], flush=True)
    del opt
    raw.zero_grad(set_to_none=True)

if compare_hf and hf is None:          # (no training round: loaded here, before the cast and quantization)
    hf = load_hf()
raw.eval()
if rt.dtype != 'float32':
    raw.to(getattr(torch, rt.dtype))
if quantize:
    if quantize not in BITS:
        sys.exit(f"error: quantize='{quantize}'; valid: {', '.join(BITS)}")
    quantize_model(raw, quantize)
    print(f'{quantize} weights: {weight_bytes(raw) / 2**30:.2f} GiB', flush=True)
if hf is not None:
    hf.eval()
    if rt.dtype != 'float32':
        hf.to(getattr(torch, rt.dtype))
if 'prefill' in modes:
    @torch.no_grad()
    def prefill():
        with rt.autocast():
            raw(x, cache=new_cache(raw, batch_size, block_size, rt.device), last_only=True)   # as generation
    reset_memory()
    dt = timed(prefill)
    results['prefill'] = {'tokens_per_sec': batch_size * block_size / dt, 'ms': 1000 * dt,
                          'peak_mem_gb': peak_memory_gb()}
    print('prefill', results['prefill'], flush=True)

if 'decode' in modes:
    for B in decode_batches:
        prompt = torch.randint(0, cfg.vocab_size, (B, prompt_len), device=rt.device)

        variants = [('', False, False)]                 # (name, CUDA graph, compiled step)
        if cuda_graph and cuda:
            variants.append(('_graph', True, False))
            if compile_decode:
                variants.append(('_graph_compiled', True, True))
        for suffix, graph, compiled in variants:
            @torch.no_grad()
            def decode():
                with rt.autocast():
                    for _ in generate_tokens(raw, prompt, decode_tokens, temperature=0, cuda_graph=graph,
                                             compile_step=compiled):
                        pass
            reset_memory()
            dt = timed(decode, n=max(3, steps // 3), n_warmup=1)
            key = f'decode_b{B}{suffix}'
            results[key] = {'tokens_per_sec': B * decode_tokens / dt, 'peak_mem_gb': peak_memory_gb()}
            label = {'': '', '_graph': ' (CUDA graph)', '_graph_compiled': ' (compiled, CUDA graph)'}[suffix]
            profiled(f'decode batch {B} ({decode_tokens} tokens){label}', decode)
            print(f'decode batch {B}{label}', results[key], flush=True)
        if hf is not None:
            @torch.no_grad()
            def hf_decode():
                with rt.autocast():
                    hf.generate(prompt, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
                                do_sample=False, use_cache=True, pad_token_id=0)
            dt = timed(hf_decode, n=max(3, steps // 3), n_warmup=1)
            results[f'decode_b{B}_hf'] = {'tokens_per_sec': B * decode_tokens / dt}
            print(f'decode batch {B} (transformers)', results[f'decode_b{B}_hf'], flush=True)

# --- the table --------------------------------------------------------------------------------
rows = []
if 'train' in results:
    r = results['train']
    mem = f", peak {r['peak_mem_gb']:.1f} GiB" if cuda else ''
    rows.append(('train tokens/s', f"{r['tokens_per_sec']:,.0f}",
                 f"MFU {100 * r['mfu']:.1f}%, step {r['step_ms']:.1f} ms{mem}"))
if 'train_hf' in results:
    r, ours = results['train_hf'], results['train']
    rows.append(('train tokens/s (transformers)', f"{r['tokens_per_sec']:,.0f}",
                 f"MFU {100 * r['mfu']:.1f}%; ours{' (compiled)' if compile else ''} / transformers (eager) = "
                 f"{ours['tokens_per_sec'] / r['tokens_per_sec']:.1f}x"
                 + (f" (medians of {len(results['train_rounds']['ours'])} alternating rounds)"
                    if 'train_rounds' in results else '')))
if 'optimizer' in results:
    rows.append((f'{optimizer} step ms', f"{results['optimizer']['step_ms']:.1f}", 'optimizer.step() alone'))
if 'prefill' in results:
    rows.append(('prefill tokens/s', f"{results['prefill']['tokens_per_sec']:,.0f}", ''))
for B in decode_batches:
    for suffix, label in (('', ''), ('_graph', ', CUDA graph'), ('_graph_compiled', ', compiled + CUDA graph')):
        if f'decode_b{B}{suffix}' in results:
            r = results[f'decode_b{B}{suffix}']
            note = ''
            if f'decode_b{B}_hf' in results:
                h = results[f'decode_b{B}_hf']['tokens_per_sec']
                note = f'transformers (eager generate) {h:,.0f}; ours / transformers = {r["tokens_per_sec"] / h:.1f}x'
            rows.append((f'decode tokens/s, batch {B}{label}', f"{r['tokens_per_sec']:,.0f}", note))
print()
print(f"| {'measure':32s} | {'value':>12s} | notes |")
print(f"| {'-' * 32} | {'-' * 12} | ----- |")
for name, value, note in rows:
    print(f'| {name:32s} | {value:>12s} | {note} |')
if out_file:
    os.makedirs(os.path.dirname(out_file) or '.', exist_ok=True)
    with open(out_file, 'w') as f:
        json.dump(results, f, indent=2, default=str)
