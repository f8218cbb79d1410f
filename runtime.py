"""
Where and how a run executes: device, dtype and autocast, torch.distributed under torchrun (DDP,
FSDP2), torch.compile, the whole training step as one CUDA graph, and the measurements behind
MFU and the profiler tables.
"""

import contextlib
import datetime
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model import Block


# -----------------------------------------------------------------------------
# Device, dtype, autocast, distributed

@dataclass
class Runtime:
    device: str            # 'cuda:0', 'cpu', 'mps'
    device_type: str       # 'cuda', 'cpu', 'mps'
    dtype: str             # 'float32' | 'bfloat16' | 'float16' (compute dtype under autocast)
    ddp: bool
    rank: int
    local_rank: int
    world_size: int

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        """Autocast to the run's dtype (bf16 / fp16) wherever it is not float32, the CPU included."""
        if self.dtype == 'float32':
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=getattr(torch, self.dtype))


def ctrl_c_in_one_line(kind, value, tb, message='\nstopped by Ctrl-C', default=sys.excepthook):
    """sys.excepthook from init_runtime on: a Ctrl-C (KeyboardInterrupt) that nothing caught, in a
    stage's set-up before its loop (loading, the reference pass, sampling) or in a script without
    a loop, ends the program with one line, `message`, instead of a traceback (it still dies by
    SIGINT: 130); any other exception as Python prints it. (A training loop's Run then saves a
    checkpoint on Ctrl-C, and installs this hook with its own message for a second one.)"""
    if issubclass(kind, KeyboardInterrupt):
        print(message, file=sys.stderr)
    else:
        default(kind, value, tb)


def init_runtime(device='auto', dtype='auto', seed=1337):
    """Pick the device and dtype, start torch.distributed when launched by torchrun (one process
    per GPU: NCCL on CUDA, gloo on the CPU), and seed every RNG with `seed` on EVERY rank, so that
    every rank builds the same model (FSDP shards it without a broadcast). training.Run then moves
    ranks > 0 to their own stream (seed + rank) for dropout; batches are drawn from explicit
    generators (Run.batch_generator), so they differ per rank by construction."""
    sys.excepthook = ctrl_c_in_one_line
    ddp = int(os.environ.get('RANK', -1)) != -1
    if ddp:
        rank, local_rank = int(os.environ['RANK']), int(os.environ['LOCAL_RANK'])
        world_size = int(os.environ['WORLD_SIZE'])
    else:
        rank, local_rank, world_size = 0, 0, 1
    if device == 'auto':
        if torch.cuda.is_available():
            device = 'cuda'
        elif getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
            device = 'mps'
        else:
            device = 'cpu'
    if device == 'cuda':
        device = f'cuda:{local_rank}'                  # set_device needs the index (torch 2.11)
    device_type = device.split(':')[0]
    if device_type not in ('cpu', 'cuda', 'mps'):      # (torch's own error lists two dozen backends)
        sys.exit(f"error: device='{device}'; valid: auto, cpu, cuda, cuda:N, mps")
    if device_type == 'cuda':
        if not torch.cuda.is_available():
            sys.exit(f"error: device='{device}' but CUDA is not available; use --device=cpu or auto")
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if dtype == 'auto':
        dtype = 'bfloat16' if device_type == 'cuda' and torch.cuda.is_bf16_supported() else 'float32'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        sys.exit(f"error: dtype='{dtype}'; valid: auto, float32, bfloat16, float16")
    if ddp:
        # rank 0 evaluates (and may sample text) while the others wait in a collective: allow it
        # an hour rather than the default 10 minutes before a waiting rank gives up
        dist.init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo',
                                timeout=datetime.timedelta(hours=1))
    torch.manual_seed(seed)
    return Runtime(device, device_type, dtype, ddp, rank, local_rank, world_size)


def close_runtime(rt):
    if rt.ddp:
        dist.barrier()              # rank 0 may still be writing plots: leave together (a rank
        dist.destroy_process_group()   # that tears gloo down alone can abort the other)


def all_ranks(x):
    """The concatenation over ranks of a tensor x (the same shape on every rank) along dim 0,
    e.g. every rank's rollout rewards for statistics that must agree everywhere; x itself in a
    single process. A collective: every rank must call it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def synchronize(device_type):
    if device_type == 'cuda':
        torch.cuda.synchronize()


class CUDAGraphStep:
    """A whole training step (forward, backward, optimizer, ...) replayed as one CUDA graph: its
    ~1,300 kernels go to the GPU in one launch, so the GPU no longer idles while Python catches up
    (the gaps in bench.py's idle table).
        step = CUDAGraphStep(fn, warmup=3);  out = step(*inputs)   # every step
    The first `warmup` calls run fn as it is, on a side stream (torch.compile, autotuning and the
    allocator settle there, as capture requires); the next call captures fn in a graph, then
    replays it, and every later call only replays it. Each call copies `inputs` (tensors, or
    lists / tuples of them, e.g. this step's batches) into the tensors fn was first given, so fn
    must read its inputs only from its arguments. fn must never wait on the device (no .item(),
    no shapes that depend on data) and must keep what it returns in tensors: after the capture,
    every call returns the same objects, the captured step's outputs, rewritten by each replay.
    Gradients set to None at the end of fn are right: the captured backward then writes them
    afresh at every replay instead of adding to them."""

    def __init__(self, fn, warmup=3):
        self.fn, self.warmup_left = fn, warmup
        self.static, self.graph, self.out, self.side = None, None, None, None

    @staticmethod
    def _copy(dst, src):
        if torch.is_tensor(dst):
            dst.copy_(src, non_blocking=True)
        else:
            for d, s in zip(dst, src):
                CUDAGraphStep._copy(d, s)

    def __call__(self, *inputs):
        if self.static is None:
            self.static = inputs
        else:
            self._copy(self.static, inputs)
        if self.warmup_left > 0:
            self.warmup_left -= 1
            self.side = self.side or torch.cuda.Stream()
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = self.fn(*self.static)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.fn(*self.static)
        self.graph.replay()
        return self.out


def shard_model(model, rt):
    """FSDP2 (torch.distributed.fsdp.fully_shard) for fsdp=True: every transformer block (those of
    the MTP modules too) becomes one unit whose parameters (and so gradients and optimizer state)
    are split by rows across the ranks; a unit's full parameters are all-gathered just before its
    forward (and again for its backward) and freed after, and its gradients are reduce-scattered
    after its backward. The root unit holds the rest (embeddings, final norm, head, the MTP
    modules' projections and norms: GPT.forward uses an MTP module's norm outside its forward, so
    a unit of its own would have been freed by then). Blocks first, then the root.
    On CUDA in bf16 the gathered parameters are bf16 and gradients are reduced in fp32
    (MixedPrecisionPolicy); the sharded master weights and the optimizer stay fp32. On the CPU
    (gloo) everything stays fp32. cast_forward_inputs=False keeps the residual stream between
    blocks in fp32, as it is without FSDP (autocast still runs the matmuls in bf16)."""
    from torch.distributed.device_mesh import init_device_mesh     # imported here: FSDP takes about
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard   # a second to import
    mesh = init_device_mesh(rt.device_type, (rt.world_size,))
    if rt.device_type == 'cuda' and rt.dtype == 'bfloat16':
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    else:
        mp = MixedPrecisionPolicy(cast_forward_inputs=False)
    for m in model.modules():
        if isinstance(m, Block):
            fully_shard(m, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')


def compile_mode_arg(mode):
    """torch.compile's mode= for a config's compile_mode, refused early with the valid names."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode='{mode}'; valid: {', '.join(COMPILE_MODES)}")
    return None if mode == 'default' else mode


# -----------------------------------------------------------------------------
# MFU and the profiler tables


_PEAK_CACHE = {}


def measure_peak_flops(device_type, dtype='bfloat16'):
    """Achievable dense matmul FLOP/s on this device, measured with a large square matmul
    (in the run's dtype on GPUs, float32 elsewhere). MFU = model FLOPs per second / this number."""
    key = (device_type, dtype)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    dt = getattr(torch, dtype) if device_type == 'cuda' else torch.float32
    n = 8192 if device_type == 'cuda' else 1024
    g = torch.Generator(device=device_type).manual_seed(0)     # the run's own random streams stay as they are
    a = torch.randn(n, n, device=device_type, dtype=dt, generator=g)
    b = torch.randn(n, n, device=device_type, dtype=dt, generator=g)
    best = float('inf')
    for i in range(6):
        synchronize(device_type)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        synchronize(device_type)
        if i > 0:                                       # the first round is warm-up
            best = min(best, (time.perf_counter() - t0) / 4)
    _PEAK_CACHE[key] = 2 * n ** 3 / best
    return _PEAK_CACHE[key]


# kernel kinds by name, for the profile summaries (a heuristic: the names are the libraries' own)
# (first match wins: Triton kernels fused around attention carry 'attention' in their names too)
KERNEL_KINDS = (('fused (Triton)', ('triton_',)),
                ('GEMM', ('gemm', 'nvjet', 'cutlass', 'xmma', 'cublas')),
                ('attention', ('sdpa', 'flash', 'fmha', 'attention')),
                ('optimizer', ('multi_tensor', 'adam')))


def kernel_stats(prof):
    """{kernel name: (microseconds, launches)} over the device kernels of a torch.profiler run.
    Ranges that annotate the device timeline (e.g. 'Optimizer.step#AdamW.step' spans the
    optimizer's kernels) are left out: counting them would count those kernels twice."""
    kernels = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, 'is_user_annotation', False):
            t, n = kernels.get(e.name, (0.0, 0))
            kernels[e.name] = (t + e.time_range.elapsed_us(), n + 1)
    return kernels


def kernel_table(prof, rows=60):
    """The device kernels of a torch.profiler run, aggregated by name: one line per kind with its
    total time, share and count (the `rows` longest), then the time per KERNEL_KINDS class."""
    kernels = kernel_stats(prof)
    total = sum(t for t, _ in kernels.values()) or 1.0
    lines = [f'device kernels: {len(kernels)} kinds, {sum(n for _, n in kernels.values())} launches, '
             f'{total / 1000:.2f} ms']
    for name, (t, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f'{t / 1000:9.3f} ms {100 * t / total:5.1f}% {n:6d}x  {name[:110]}')
    classes = {}
    for name, (t, n) in kernels.items():
        kind = next((k for k, keys in KERNEL_KINDS if any(x in name.lower() for x in keys)), 'other')
        classes[kind] = classes.get(kind, 0.0) + t
    lines.append('by class: ' + ', '.join(f'{k} {v / 1000:.2f} ms ({100 * v / total:.0f}%)'
                                         for k, v in sorted(classes.items(), key=lambda kv: -kv[1])))
    return '\n'.join(lines) + '\n'


class StepDiagnostics:
    """Two calls around a training step, for the loop's diagnostics: with `profile` (a file),
    torch.profiler over the run's 11th and 12th steps (past compilation and a graph's capture), its
    tables appended to the file (write_profile); with `sync_check` (CUDA), a warning with a stack at
    every host-device sync inside a step, from the run's 5th step on. With neither they do nothing."""

    def __init__(self, profile, sync_check, rt, start, title):
        self.profile, self.sync_check, self.rt, self.start, self.title = profile, sync_check, rt, start, title
        self.prof = None

    def before(self, step):
        """Before step `step` (0-based)."""
        if self.profile and step == self.start + 10:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.rt.device_type == 'cuda':
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
        if self.sync_check and step >= self.start + 4:
            torch.cuda.set_sync_debug_mode('warn')

    def after(self, step):
        """After step `step` (0-based): the profile is written after the second profiled step."""
        if self.sync_check:
            torch.cuda.set_sync_debug_mode('default')
        if self.prof is not None and step == self.start + 11:
            synchronize(self.rt.device_type)
            self.close()
            if self.rt.master:
                write_profile(self.finished, self.profile, f'{self.title}: steps {step - 1} and {step}',
                              self.rt.device_type)

    def close(self):
        """Stop the profiler (after the loop too: a run may end inside the profiled steps)."""
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.finished, self.prof = self.prof, None


def write_profile(prof, path, title, device_type):
    """Append a torch.profiler run's tables to `path`: its operations by time and, on CUDA, its
    kernels by kind (kernel_table) and where the device waited (idle_table)."""
    cuda = device_type == 'cuda'
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'a') as f:
        f.write(f'\n=== {title} ===\n')
        f.write(prof.key_averages().table(sort_by='cuda_time_total' if cuda else 'cpu_time_total', row_limit=40))
        if cuda:
            f.write('\n' + kernel_table(prof) + idle_table(prof))


def idle_table(prof, rows=15, min_gap_us=5.0):
    """Where the device waits: the span from the first kernel's start to the last one's end, the
    part of it no kernel runs (idle = span - union of kernel intervals), and the `rows` longest
    idle gaps, each with the kernels on either side and the host ops running when the kernel
    after it started (the host was late there: those ops are what to make cheaper)."""
    evs = [e for e in prof.events() if not getattr(e, 'is_user_annotation', False)]
    kern = sorted(((e.time_range.start, e.time_range.end, e.name) for e in evs
                   if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda k: k[0])
    if not kern:
        return 'idle: no device kernels\n'
    host = [e for e in evs if e.device_type == torch.autograd.DeviceType.CPU]
    gaps, busy_end, prev = [], kern[0][1], kern[0][2]
    for start, end, name in kern[1:]:
        if start - busy_end > min_gap_us:
            gaps.append((start - busy_end, prev, name, start))
        if end > busy_end:
            busy_end, prev = end, name
    span = busy_end - kern[0][0]
    idle = sum(g[0] for g in gaps)
    lines = [f'device span {span / 1000:.2f} ms, idle {idle / 1000:.2f} ms ({100 * idle / max(span, 1e-9):.0f}%) '
             f'in {len(gaps)} gaps over {min_gap_us:g} us; the longest:']
    for gap, before, after, t in sorted(gaps, key=lambda g: -g[0])[:rows]:
        running = sorted((e for e in host if e.time_range.start <= t <= e.time_range.end),
                         key=lambda e: e.time_range.start)
        ops = ' > '.join(e.name[:40] for e in running[:4]) or '-'
        lines.append(f'{gap:9.1f} us  after {before[:45]}  before {after[:45]}  host: {ops}')
    return '\n'.join(lines) + '\n'
