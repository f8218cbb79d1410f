"""Micro-benchmarks of candidate kernels for the MoE training step (issue 10), each checked
against the reference it would replace, on one CUDA GPU:

  ce      the loss's row pass over a chunk of bf16 logits (model.cross_entropy_rows_): the kernel
          in model.py (a program per row, two reads of the row) against
          - a persistent grid (P programs per SM, each looping over rows, so that fewer rows are
            in flight and the second read may come from L2), and
          - a row held whole in registers (one read of the row, one write);
  router  the sigmoid router's choice of K experts (torch.topk) against K rounds of argmax
          under torch.compile, forward and backward.

$ python experiments/kernel_bench.py [ce,router]
"""
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import triton                           # noqa: E402
import triton.language as tl            # noqa: E402

import model                            # noqa: E402
from model import _cross_entropy_row    # noqa: E402
from common import CUDAGraphStep        # noqa: E402


def bench(fn, n=20, warmup=3):
    """Median milliseconds of fn() over n CUDA-event-timed runs after warmup."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


# --- the loss's row pass ---

@triton.jit
def ce_persistent(z_ptr, stride, targets_ptr, loss_ptr, n_rows, V, BLOCK: tl.constexpr):
    """model's row pass, but each program walks rows pid, pid + P, ... (P programs in all)."""
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        _cross_entropy_row(z_ptr + row.to(tl.int64) * stride, tl.load(targets_ptr + row), loss_ptr + row,
                           V, BLOCK)


@triton.jit
def ce_whole_row(z_ptr, stride, targets_ptr, loss_ptr, V, BLOCK: tl.constexpr):
    """One program per row, the row loaded once (bf16 in registers, BLOCK >= V), then written once."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride
    cols = tl.arange(0, BLOCK)
    z = tl.load(z_row + cols, mask=cols < V, other=float('-inf'))
    m = tl.max(z, 0).to(tl.float32)
    s = tl.sum(tl.exp(z.to(tl.float32) - m), 0)
    lse = m + tl.log(s)
    y = tl.load(targets_ptr + row)
    valid = y >= 0
    z_y = tl.sum(tl.where(cols == y, z.to(tl.float32), 0.0), 0)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_y, 0.0))
    dz = tl.exp(z.to(tl.float32) - lse) - tl.where(cols == y, 1.0, 0.0)
    dz = tl.where(valid, dz, 0.0)
    tl.store(z_row + cols, dz.to(z_ptr.dtype.element_ty), mask=cols < V)


def ce_variants(n_sm):
    def current(z, t):
        return model.cross_entropy_rows_(z, t)

    def persistent(progs, block, warps):
        def run(z, t):
            loss = torch.empty(z.size(0), device=z.device, dtype=torch.float32)
            grid = (min(z.size(0), progs * n_sm),)
            ce_persistent[grid](z, z.stride(0), t, loss, z.size(0), z.size(1), BLOCK=block, num_warps=warps)
            return loss
        return run

    def whole(warps):
        def run(z, t):
            loss = torch.empty(z.size(0), device=z.device, dtype=torch.float32)
            ce_whole_row[(z.size(0),)](z, z.stride(0), t, loss, z.size(1),
                                       BLOCK=triton.next_power_of_2(z.size(1)), num_warps=warps)
            return loss
        return run
    variants = {'current (row per program, 4096 x 8 warps)': current}
    for progs in (1, 2, 4):
        for block, warps in ((4096, 8), (8192, 16)):
            variants[f'persistent {progs}/SM, {block} x {warps} warps'] = persistent(progs, block, warps)
    for warps in (8, 16, 32):
        variants[f'whole row, {warps} warps'] = whole(warps)
    return variants


def bench_ce(rows=10672, V=50304):
    """rows: the chunk linear_cross_entropy takes (1 GiB of bf16 logits at V = 50,304)."""
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    g = torch.Generator(device='cuda').manual_seed(0)
    z0 = (torch.randn(rows, V, device='cuda', generator=g) * 3).to(torch.bfloat16)
    t = torch.randint(0, V, (rows,), device='cuda', generator=g)
    t[::7] = -1
    ref_z = z0.cpu()
    ref_loss = model.cross_entropy_rows_(ref_z, t.cpu())                # the PyTorch reference, in place
    gb = 3 * z0.numel() * 2 / 1e9                                        # 2 reads + 1 write
    print(f'ce: {rows} x {V} bf16 logits; TB/s below counts 2 reads + 1 write = {gb:.2f} GB')
    out = []
    for name, fn in ce_variants(n_sm).items():
        z = z0.clone()
        loss = fn(z, t)
        err_loss = (loss.cpu() - ref_loss).abs().max().item()
        err_dz = (z.cpu().float() - ref_z.float()).abs().max().item()
        ok = err_loss < 1e-2 and err_dz < 1e-2
        ms = bench(lambda: fn(z, t))
        out.append((name, ms, ok, err_loss, err_dz))
        print(f'  {name:45s} {ms:7.3f} ms  {gb / ms:6.2f} TB/s(eff)  max err loss {err_loss:.1e} dz {err_dz:.1e}'
              f'  {"ok" if ok else "WRONG"}', flush=True)
    return out


# --- the router's top-K ---

def route_topk(logits, bias, K, scale):
    scores = logits.sigmoid()
    idx = (scores + bias).topk(K, dim=-1).indices
    w = scores.gather(1, idx)
    return w / w.sum(-1, keepdim=True) * scale, idx


def route_argmax(logits, bias, K, scale):
    """model.top_k_indices: K rounds of argmax (row reductions that inductor fuses), not a sort."""
    scores = logits.sigmoid()
    idx = model.top_k_indices(scores + bias, K, by_argmax=True)
    w = scores.gather(1, idx)
    return w / w.sum(-1, keepdim=True) * scale, idx


def bench_router(N=32768, C=512, E=64, K=4):
    g = torch.Generator(device='cuda').manual_seed(0)
    x = torch.randn(N, C, device='cuda', generator=g)
    W = (torch.randn(E, C, device='cuda', generator=g) * 0.02).requires_grad_()
    bias = torch.randn(E, device='cuda', generator=g) * 1e-2
    print(f'router: {N} tokens, {E} experts, top-{K}; forward + backward, compiled')
    ref = None
    for name, route in (('topk', route_topk), ('argmax x K', route_argmax)):
        fn = torch.compile(lambda x, W: route(x @ W.t(), bias, K, 2.5))
        out = {}

        def step():
            w, idx = fn(x, W)
            (w * torch.arange(1, K + 1, device='cuda')).sum().backward()
            out.update(w=w.detach(), idx=idx, grad=W.grad)
            W.grad = None
        replay = CUDAGraphStep(step)             # as in the whole-step graph: no host time counted
        for _ in range(4):                       # 3 plain calls, the capture and its first replay
            replay()
        if ref is None:
            ref, same = dict(out), True
        else:
            same = bool((out['idx'] == ref['idx']).all()) and torch.allclose(out['w'], ref['w']) \
                and torch.allclose(out['grad'], ref['grad'])
        ms = bench(replay)
        print(f'  {name:12s} {ms:7.3f} ms per layer (CUDA graph)  '
              f'{"same choice, weights and gradient" if same else "DIFFERENT"}', flush=True)


if __name__ == '__main__':
    which = sys.argv[1].split(',') if len(sys.argv) > 1 else ['ce', 'router']
    print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)
    if 'ce' in which:
        bench_ce()
    if 'router' in which:
        bench_router()
