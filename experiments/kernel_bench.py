"""Micro-benchmarks of candidate kernels for the MoE training step, each checked
against the reference it would replace, on one CUDA GPU:

  ce      the loss's row pass over a chunk of bf16 logits (fast_paths.cross_entropy_rows_): the kernel
          in fast_paths.py (a program per row, one read and one write, the softmax left unnormalised)
          against the earlier kernel that normalised it (two reads of the row, one write), that
          one on a persistent grid (P programs per SM, each looping over rows, so that fewer rows
          are in flight and the second read may come from L2), and a row held whole in registers;
  router  the sigmoid router's choice of K experts (torch.topk) against K rounds of argmax
          under torch.compile, forward and backward;
  lmhead  one chunk of the output layer and the loss (logits, loss, dh, dW): cuBLAS GEMMs with
          the row pass between them (fast_paths.LinearCrossEntropy) against the three Triton kernels
          that take the softmax inside the backward GEMMs (linear_cross_entropy_chunk_),
          each kernel over a few tile configurations;
  chunks  fast_paths.linear_cross_entropy (forward and backward) at 128 x 512 tokens with chunks of
          0.25 to 2 GiB of logits (1 GiB is the default);
  attn    MLA's causal attention (q, k 96 wide, v 64) forward and backward through each SDPA
          backend that takes it (cuDNN, flash with v padded to 96, memory-efficient) and
          FlexAttention.

  grouped the experts' grouped GEMMs (torch._grouped_mm) of one MoE layer at 128 x 512 tokens, each
          alone in autograd's operand layouts and the alternatives, then forward + backward;
  mla     one MLAttention layer forward + backward, this model.py against
          experiments/model_old_ab.py (q, k, v kept as (B, T, H, D) against transposed copies);
  glue    the MoE's row gathers as torch.compile writes them against one Triton kernel;
  counts  tokens per expert: atomic scatter_add against a one-hot sum and a search of the sorted keys;
  normcast the float32 residual stream's RMSNorm backward and the bf16 cast of its gradient, as
          inductor fuses them under its mix-order reduction settings.

$ python experiments/kernel_bench.py [ce,router,lmhead,chunks,attn,grouped,mla,glue,counts,normcast]
"""
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import triton                           # noqa: E402
import triton.language as tl            # noqa: E402

import fast_paths                       # noqa: E402
import model                            # noqa: E402
from runtime import CUDAGraphStep        # noqa: E402


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
def ce_two_pass_row(z_row, y, loss_at, V, BLOCK: tl.constexpr):
    """The earlier row pass: *loss_at = logsumexp(z) - z[y], z <- softmax(z) - onehot(y) (0 where
    y = -1); one read for the max and the sum, a second to write the normalised gradient."""
    m = float('-inf')
    s = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(z_row + cols, mask=cols < V, other=float('-inf')).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    valid = y >= 0
    z_y = tl.load(z_row + tl.maximum(y, 0)).to(tl.float32)
    tl.store(loss_at, tl.where(valid, lse - z_y, 0.0))
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
        dz = tl.where(valid, tl.exp(z - lse) - tl.where(cols == y, 1.0, 0.0), 0.0)
        tl.store(z_row + cols, dz.to(z_row.dtype.element_ty), mask=cols < V)


@triton.jit
def ce_two_pass(z_ptr, stride, targets_ptr, loss_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ce_two_pass_row(z_ptr + row * stride, tl.load(targets_ptr + row), loss_ptr + row, V, BLOCK)


@triton.jit
def ce_persistent(z_ptr, stride, targets_ptr, loss_ptr, n_rows, V, BLOCK: tl.constexpr):
    """The two-pass row, but each program walks rows pid, pid + P, ... (P programs in all)."""
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        ce_two_pass_row(z_ptr + row.to(tl.int64) * stride, tl.load(targets_ptr + row), loss_ptr + row,
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
    """name -> fn(z, t) returning (loss, inv_sum or None): z then holds the gradient times
    1 / inv_sum per row (model's kernel) or the gradient itself (None)."""
    def current(z, t):
        return fast_paths.cross_entropy_rows_(z, t)

    def two_pass(z, t):
        loss = torch.empty(z.size(0), device=z.device, dtype=torch.float32)
        ce_two_pass[(z.size(0),)](z, z.stride(0), t, loss, z.size(1), BLOCK=4096, num_warps=8)
        return loss, None

    def persistent(progs, block, warps):
        def run(z, t):
            loss = torch.empty(z.size(0), device=z.device, dtype=torch.float32)
            grid = (min(z.size(0), progs * n_sm),)
            ce_persistent[grid](z, z.stride(0), t, loss, z.size(0), z.size(1), BLOCK=block, num_warps=warps)
            return loss, None
        return run

    def whole(warps):
        def run(z, t):
            loss = torch.empty(z.size(0), device=z.device, dtype=torch.float32)
            ce_whole_row[(z.size(0),)](z, z.stride(0), t, loss, z.size(1),
                                       BLOCK=triton.next_power_of_2(z.size(1)), num_warps=warps)
            return loss, None
        return run
    def one_pass(block, warps):
        def run(z, t):
            loss = torch.empty(z.size(0), device=z.device, dtype=torch.float32)
            inv_sum = torch.empty_like(loss)
            fast_paths._cross_entropy_rows_kernel[(z.size(0),)](z, z.stride(0), t, loss, inv_sum, z.size(1),
                                                           BLOCK=block, num_warps=warps)
            return loss, inv_sum
        return run
    variants = {'model (one pass, unnormalised, 4096 x 8 warps)': current}
    for block, warps in ((2048, 4), (2048, 8), (4096, 4), (4096, 16), (8192, 8), (8192, 16), (16384, 16)):
        variants[f'one pass, {block} x {warps} warps'] = one_pass(block, warps)
    variants['earlier (two passes, 4096 x 8 warps)'] = two_pass
    for progs in (1, 2):
        variants[f'two passes, persistent {progs}/SM, 4096 x 8 warps'] = persistent(progs, 4096, 8)
    variants['one pass, whole row in registers, 32 warps'] = whole(32)
    return variants


def bench_ce(rows=9363, V=50304):
    """rows: the chunk linear_cross_entropy takes at 128 x 512 tokens (7 chunks of <= 1 GiB)."""
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    g = torch.Generator(device='cuda').manual_seed(0)
    z0 = (torch.randn(rows, V, device='cuda', generator=g) * 3).to(torch.bfloat16)
    t = torch.randint(0, V, (rows,), device='cuda', generator=g)
    t[::7] = -1
    ref_z = z0.cpu().float()
    ref_loss, ref_inv = fast_paths.cross_entropy_rows_(ref_z, t.cpu())       # the PyTorch reference
    ref_dz = ref_z * ref_inv[:, None]
    gb = z0.numel() * 2 / 1e9
    print(f'ce: {rows} x {V} bf16 logits ({gb:.2f} GB); TB/s counts the bytes each variant moves '
          f'(one pass: 1 read + 1 write; two passes: 2 reads + 1 write)')
    out = []
    for name, fn in ce_variants(n_sm).items():
        z = z0.clone()
        loss, inv_sum = fn(z, t)
        dz = z.float() if inv_sum is None else z.float() * inv_sum[:, None]
        err_loss = (loss.cpu() - ref_loss).abs().max().item()
        err_dz = (dz.cpu() - ref_dz).abs().max().item()
        ok = err_loss < 1e-2 and err_dz < 1e-2
        ms = bench(lambda: fn(z, t))
        moved = (2 if inv_sum is not None or 'one pass' in name else 3) * gb
        out.append((name, ms, ok, err_loss, err_dz))
        print(f'  {name:50s} {ms:7.3f} ms  {moved / ms:6.2f} TB/s  max err loss {err_loss:.1e} dz {err_dz:.1e}'
              f'  {"ok" if ok else "WRONG"}', flush=True)
    return out


# --- the experts' grouped GEMMs ---

def bench_grouped(N=65536, K=4, E=64, C=512, I=256):
    """The six grouped GEMMs of one MoE layer at 128 x 512 tokens (forward gate/up and down, and
    the gradients of their inputs and weights), each timed alone in the operand layouts that
    torch's autograd uses and in the alternatives, with TFLOP/s; then forward + backward through
    autograd with its kernels from torch.profiler."""
    import torch.nn.functional as F
    g = torch.Generator(device='cuda').manual_seed(0)
    idx = torch.rand(N, E, device='cuda', generator=g).topk(K, -1).indices
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    M = N * K
    bf = dict(device='cuda', dtype=torch.bfloat16)
    x = torch.randn(M, C, **bf)
    w13 = torch.randn(E, 2 * I, C, **bf) * 0.02
    w2 = torch.randn(E, C, I, **bf) * 0.02
    h = torch.randn(M, I, **bf)
    dy13 = torch.randn(M, 2 * I, **bf)
    dy2 = torch.randn(M, C, **bf)
    gmm = torch._grouped_mm
    print(f'grouped: {E} experts, {M} rows (tokens per expert {counts.min().item()}..{counts.max().item()}), '
          f'C = {C}, I = {I}')
    cases = {
        'fwd gate/up  x @ w13^T (view)': (lambda: gmm(x, w13.transpose(1, 2), offs=offs), M * C * 2 * I),
        'fwd gate/up  x @ (w13^T contiguous)': (lambda: gmm(x, w13.transpose(1, 2).contiguous(), offs=offs), None),
        'fwd down     h @ w2^T (view)': (lambda: gmm(h, w2.transpose(1, 2), offs=offs), M * I * C),
        'dx  gate/up  dy13 @ w13': (lambda: gmm(dy13, w13, offs=offs), M * C * 2 * I),
        'dx  down     dy2 @ w2': (lambda: gmm(dy2, w2, offs=offs), M * I * C),
        'dW  gate/up  x^T dy13 -> (E, C, 2I)': (lambda: gmm(x.t(), dy13, offs=offs), M * C * 2 * I),
        'dW  gate/up  dy13^T x -> (E, 2I, C)': (lambda: gmm(dy13.t(), x, offs=offs), M * C * 2 * I),
        'dW  down     h^T dy2 -> (E, I, C)': (lambda: gmm(h.t(), dy2, offs=offs), M * I * C),
        'dW  down     dy2^T h -> (E, C, I)': (lambda: gmm(dy2.t(), h, offs=offs), M * I * C),
    }
    flop = None
    for name, (fn, f) in cases.items():
        flop = f or flop
        try:
            ms = bench(fn)
        except Exception as e:
            print(f'  {name:40s} {type(e).__name__}: {str(e)[:100]}')
            continue
        print(f'  {name:40s} {ms:7.3f} ms  {2 * flop / ms / 1e9:5.0f} TFLOP/s', flush=True)

    xr = x.clone().requires_grad_()
    w13r = w13.float().requires_grad_()
    w2r = w2.float().requires_grad_()
    dy = torch.randn(M, C, **bf)

    def layer():
        gate, up = gmm(xr, w13r.to(torch.bfloat16).transpose(1, 2), offs=offs).chunk(2, dim=-1)
        y = gmm(F.silu(gate) * up, w2r.to(torch.bfloat16).transpose(1, 2), offs=offs)
        y.backward(dy)
        xr.grad = w13r.grad = w2r.grad = None
    print(f'  autograd forward + backward: {bench(layer):.3f} ms (all six GEMMs: {6 * M * C * 3 * I / 1e9:.0f} GFLOP)')
    prof_parts(layer)


# --- the router's top-K ---

def route_topk(logits, bias, K, scale):
    scores = logits.sigmoid()
    idx = (scores + bias).topk(K, dim=-1).indices
    w = scores.gather(1, idx)
    return w / w.sum(-1, keepdim=True) * scale, idx


def route_argmax(logits, bias, K, scale):
    """fast_paths.top_k_indices: K rounds of argmax (row reductions that inductor fuses), not a sort."""
    scores = logits.sigmoid()
    idx = fast_paths.top_k_indices(scores + bias, K, by_argmax=True)
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


# --- the output layer and the loss, one chunk ---

# The same output layer and loss without the row pass: the softmax is taken inside the two
# backward GEMMs, so the logits are written once (by the first GEMM) and read twice, not five times.
# Tried and dropped: correct, but 9.1 ms per chunk against 3.1 ms (README, notes).
#     z = h W^T, and m_it = max of row i over column tile t    (_logits_kernel)
#     m_i = max_t m_it,  P_ij = exp(z_ij - m_i),  S_i = sum_j P_ij,  lse_i = m_i + log S_i
#     dh_i = (P_i W) / S_i - W[y_i]                              (_softmax_weight_kernel)
#     dW  += softmax(z)^T h - onehot(y)^T h                      (_softmax_t_h_kernel, index_add_)
# softmax(z) is taken in registers from the bf16 logits each GEMM reads, so nothing but z is
# written; the onehot parts are a gather of W's rows and a scatter of h's rows, in float32.

@triton.jit
def _logits_kernel(h_ptr, w_ptr, z_ptr, tile_max_ptr, n, V, C, n_tiles_v,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """z = h W^T for BM rows x BN vocabulary columns (bf16), and each row's max over them."""
    pid = tl.program_id(0)
    n_tiles_m = tl.cdiv(n, BM)
    pid_m = pid % n_tiles_m                   # neighbouring programs share the W tile (L2)
    pid_v = pid // n_tiles_m
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_v * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    rows_c = tl.minimum(rows, n - 1)          # edge tiles read a valid row; the store is masked
    cols_c = tl.minimum(cols, V - 1)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, C, BK):                 # C % BK == 0
        a = tl.load(h_ptr + rows_c[:, None] * C + (k + ks)[None, :])
        b = tl.load(w_ptr + cols_c[:, None] * C + (k + ks)[None, :])
        acc = tl.dot(a, tl.trans(b), acc)
    z = acc.to(z_ptr.dtype.element_ty)
    tl.store(z_ptr + rows[:, None].to(tl.int64) * V + cols[None, :], z,
             mask=(rows[:, None] < n) & (cols[None, :] < V))
    z_max = tl.max(tl.where(cols[None, :] < V, z.to(tl.float32), float('-inf')), 1)
    tl.store(tile_max_ptr + rows * n_tiles_v + pid_v, z_max, mask=rows < n)

@triton.jit
def _softmax_weight_kernel(z_ptr, w_ptr, tile_max_ptr, targets_ptr, dh_ptr, lse_ptr, loss_ptr,
                           n, V, C, n_tiles_v, BM: tl.constexpr, BN: tl.constexpr,
                           BK: tl.constexpr, BT: tl.constexpr):
    """dh = softmax(z) W - W[y] for BM rows x BN of the C columns (0 where y = -1); the first
    column block also writes each row's lse (+inf where y = -1) and loss."""
    pid = tl.program_id(0)
    n_tiles_c = C // BN
    pid_c = pid % n_tiles_c                   # the programs reading the same logits are neighbours
    pid_m = pid // n_tiles_c
    rows = pid_m * BM + tl.arange(0, BM)
    rows_c = tl.minimum(rows, n - 1)
    t = tl.arange(0, BT)                      # BT >= n_tiles_v
    m = tl.max(tl.load(tile_max_ptr + rows_c[:, None] * n_tiles_v + t[None, :],
                       mask=t[None, :] < n_tiles_v, other=float('-inf')), 1)
    cols = pid_c * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    z_rows = z_ptr + rows_c.to(tl.int64)[:, None] * V
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    s = tl.zeros((BM,), dtype=tl.float32)
    for k in range(0, V, BK):
        kk = k + ks
        p = tl.exp(tl.load(z_rows + kk[None, :], mask=kk[None, :] < V, other=float('-inf')).to(tl.float32)
                   - m[:, None])                                            # P = exp(z - m)
        s += tl.sum(p, 1)
        w = tl.load(w_ptr + kk[:, None] * C + cols[None, :], mask=kk[:, None] < V, other=0.0)
        acc = tl.dot(p.to(w.dtype), w, acc)
    y = tl.load(targets_ptr + rows_c)
    valid = (y >= 0) & (rows < n)
    w_y = tl.load(w_ptr + tl.maximum(y, 0)[:, None] * C + cols[None, :]).to(tl.float32)
    dh = tl.where(valid[:, None], acc / s[:, None] - w_y, 0.0)             # P W / S - W[y]
    tl.store(dh_ptr + rows[:, None] * C + cols[None, :], dh.to(dh_ptr.dtype.element_ty),
             mask=rows[:, None] < n)
    if pid_c == 0:
        lse = m + tl.log(s)
        z_y = tl.load(z_ptr + rows_c.to(tl.int64) * V + tl.maximum(y, 0)).to(tl.float32)
        tl.store(loss_ptr + rows, tl.where(valid, lse - z_y, 0.0), mask=rows < n)
        tl.store(lse_ptr + rows, tl.where(valid, lse, float('inf')), mask=rows < n)

@triton.jit
def _softmax_t_h_kernel(z_ptr, h_ptr, lse_ptr, dw_ptr, n, V, C, BV: tl.constexpr,
                        BN: tl.constexpr, BK: tl.constexpr, ACCUMULATE: tl.constexpr):
    """dW (+)= softmax(z)^T h for BV vocabulary rows x BN of the C columns, in float32 (rows
    with lse = +inf, the masked ones, add nothing)."""
    pid = tl.program_id(0)
    n_tiles_c = C // BN
    pid_c = pid % n_tiles_c
    pid_v = pid // n_tiles_c
    vs = pid_v * BV + tl.arange(0, BV)
    vs_c = tl.minimum(vs, V - 1)
    cols = pid_c * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    acc = tl.zeros((BV, BN), dtype=tl.float32)
    for k in range(0, n, BK):
        kk = k + ks
        kk_c = tl.minimum(kk, n - 1)
        lse = tl.load(lse_ptr + kk, mask=kk < n, other=float('inf'))
        z = tl.load(z_ptr + kk_c.to(tl.int64)[:, None] * V + vs_c[None, :]).to(tl.float32)
        p = tl.exp(z - lse[:, None])                                        # (BK, BV) softmax
        h = tl.load(h_ptr + kk_c[:, None] * C + cols[None, :])
        acc = tl.dot(tl.trans(p.to(h.dtype)), h, acc)
    out = dw_ptr + vs[:, None] * C + cols[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=vs[:, None] < V, other=0.0)
    tl.store(out, acc, mask=vs[:, None] < V)


LOSS_KERNEL_CONFIG = dict(logits=(128, 256, 64, 8, 3), weight=(128, 256, 64, 8, 3), t_h=(128, 256, 64, 8, 3))
# (rows, columns, k-step, warps, pipeline stages) of the three kernels' tiles


def linear_cross_entropy_chunk_(h, w, targets, z, dh, dw, accumulate, config=None):
    """One chunk of the output layer and the loss by the three Triton kernels above: h (n, C) bf16,
    w (V, C) bf16, targets (n,), z (>= n*V) bf16 scratch, dh (n, C) written, dw (V, C) float32
    written (accumulate=False) or added to. Returns the per-row loss (float32, 0 where y = -1)."""
    cfg = {**LOSS_KERNEL_CONFIG, **(config or {})}
    n, C = h.shape
    V = w.size(0)
    z = z[:n * V].view(n, V)
    (bm, bn, bk, nw, ns) = cfg['logits']
    n_tiles_v = triton.cdiv(V, bn)
    tile_max = torch.empty(n, n_tiles_v, device=h.device, dtype=torch.float32)
    _logits_kernel[(triton.cdiv(n, bm) * n_tiles_v,)](h, w, z, tile_max, n, V, C, n_tiles_v,
                                                      BM=bm, BN=bn, BK=bk, num_warps=nw, num_stages=ns)
    lse = torch.empty(n, device=h.device, dtype=torch.float32)
    loss = torch.empty(n, device=h.device, dtype=torch.float32)
    (bm, bn, bk, nw, ns) = cfg['weight']
    _softmax_weight_kernel[(triton.cdiv(n, bm) * (C // bn),)](
        z, w, tile_max, targets, dh, lse, loss, n, V, C, n_tiles_v, BM=bm, BN=bn, BK=bk,
        BT=triton.next_power_of_2(n_tiles_v), num_warps=nw, num_stages=ns)
    (bv, bn, bk, nw, ns) = cfg['t_h']
    _softmax_t_h_kernel[(triton.cdiv(V, bv) * (C // bn),)](z, h, lse, dw, n, V, C, BV=bv, BN=bn, BK=bk,
                                                           ACCUMULATE=accumulate, num_warps=nw, num_stages=ns)
    valid = (targets >= 0).unsqueeze(1)
    dw.index_add_(0, targets.clamp(min=0), torch.where(valid, -h.float(), 0.0))   # - onehot(y)^T h
    return loss



LMHEAD_CONFIGS = {      # (rows, columns, k-step, warps, stages) per kernel
    'logits': [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
               (128, 128, 64, 8, 4), (64, 256, 64, 4, 4), (128, 256, 128, 8, 2)],
    'weight': [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (64, 256, 64, 4, 4), (64, 512, 64, 8, 3),
               (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (64, 256, 128, 4, 3), (128, 256, 128, 8, 2)],
    't_h': [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (64, 256, 64, 4, 4), (64, 512, 64, 8, 3),
            (128, 128, 64, 4, 4), (256, 128, 64, 8, 3), (128, 256, 32, 8, 4)],
}


def bench_lmhead(n=9363, V=50304, C=512):
    """n: linear_cross_entropy's chunk at 128 x 512 tokens (7 equal chunks of at most 1 GiB)."""
    g = torch.Generator(device='cuda').manual_seed(0)
    h = torch.randn(n, C, device='cuda', generator=g).to(torch.bfloat16)
    w = (torch.randn(V, C, device='cuda', generator=g) * 2 / C ** 0.5).to(torch.bfloat16)
    y = torch.randint(0, V, (n,), device='cuda', generator=g)
    y[::7] = -1
    flop = 2 * n * V * C
    print(f'lmhead: {n} rows x {C} -> {V}; each GEMM {flop / 1e12:.2f} TFLOP')
    dh, dw = torch.empty_like(h), torch.zeros(V, C, device='cuda')

    def cublas(parts=('logits', 'rows', 'dh', 'dw')):
        z = h @ w.t()
        loss, inv_sum = fast_paths.cross_entropy_rows_(z, y) if 'rows' in parts else (None, 1.0)
        if 'dh' in parts:
            torch.mm(z, w, out=dh).mul_(inv_sum[:, None])
        if 'dw' in parts:
            torch.addmm(dw, z.t(), (h * inv_sum[:, None]).to(h.dtype), out_dtype=torch.float32, out=dw)
        return loss
    z = h @ w.t()
    ref_loss, ref_inv = fast_paths.cross_entropy_rows_(z, y)
    z = (z * ref_inv[:, None]).to(z.dtype)                # softmax - onehot
    ref_dh = z @ w
    ref_dw = (z.t().float() @ h.float())
    t_logits = bench(lambda: h @ w.t())
    t_rows = bench(lambda: fast_paths.cross_entropy_rows_(h @ w.t(), y)) - t_logits
    t_dh = bench(lambda: torch.mm(z, w, out=dh))
    t_dw = bench(lambda: torch.addmm(dw, z.t(), h, out_dtype=torch.float32, out=dw))
    total = bench(cublas)
    print(f'  cuBLAS + row pass: logits {t_logits:.3f} ms ({flop / t_logits / 1e9:.0f} TFLOP/s), row pass {t_rows:.3f}, '
          f'dh {t_dh:.3f} ({flop / t_dh / 1e9:.0f}), dW {t_dw:.3f} ({flop / t_dw / 1e9:.0f}); all {total:.3f} ms', flush=True)

    scratch = torch.empty(n * V, device='cuda', dtype=torch.bfloat16)
    best = {}
    for kernel, configs in LMHEAD_CONFIGS.items():
        for c in configs:
            cfg = {kernel: c}
            try:
                run = lambda: linear_cross_entropy_chunk_(h, w, y, scratch, dh, dw, False, cfg)  # noqa: E731
                run()
                all_ms = bench(run)
            except Exception as e:               # out of shared memory or registers for this tile
                print(f'  {kernel:7s} {c}: {type(e).__name__}: {str(e)[:80]}')
                continue
            best.setdefault(kernel, (1e9, None))
            if all_ms < best[kernel][0]:
                best[kernel] = (all_ms, c)
            print(f'  {kernel:7s} {c}: all three {all_ms:.3f} ms', flush=True)
    cfg = {k: c for k, (_, c) in best.items()}
    run = lambda: linear_cross_entropy_chunk_(h, w, y, scratch, dh, dw, False, cfg)  # noqa: E731
    loss = run()
    err = ((loss - ref_loss).abs().max().item(), (dh.float() - ref_dh.float()).abs().max().item(),
           (dw - ref_dw).abs().max().item())
    scale = (ref_dh.float().abs().max().item(), ref_dw.abs().max().item())
    t_all = bench(run)
    print(f'  Triton, best tiles {cfg}: all {t_all:.3f} ms against {total:.3f} ms; max error loss {err[0]:.1e}, '
          f'dh {err[1]:.1e} (of {scale[0]:.1e}), dW {err[2]:.1e} (of {scale[1]:.1e})', flush=True)
    prof_parts(run)


def prof_parts(run):
    """Each kernel's time in one run, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
        name = e.key if len(e.key) <= 110 else e.key[:50] + ' ... ' + e.key[-55:]   # templates differ late
        print(f'    {e.device_time_total / 1000:8.3f} ms  {e.count:3d}x  {name}')


def bench_chunks(N=65536, V=50304, C=512):
    g = torch.Generator(device='cuda').manual_seed(0)
    h = torch.randn(N, C, device='cuda', generator=g).requires_grad_()
    w = (torch.randn(V, C, device='cuda', generator=g) * 2 / C ** 0.5).requires_grad_()
    y = torch.randint(0, V, (N,), device='cuda', generator=g)
    print(f'chunks: linear_cross_entropy forward + backward, {N} rows x {C} -> {V}, float32 weights under bf16 autocast')
    for gib in (0.25, 0.5, 1, 2):
        def run():
            with torch.autocast('cuda', torch.bfloat16):
                loss = fast_paths.linear_cross_entropy(h, w, y, chunk_bytes=int(gib * 2 ** 30))
            loss.backward()
            h.grad = w.grad = None
        torch.cuda.reset_peak_memory_stats()
        ms = bench(run, n=10)
        print(f'  {gib:4} GiB chunks ({-(-N // max(1, int(gib * 2 ** 30) // (V * 2)))}): {ms:7.3f} ms, '
              f'peak {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB', flush=True)


def bench_attn(B=128, H=8, T=512, d_qk=96, d_v=64):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = torch.Generator(device='cuda').manual_seed(0)
    q, k = (torch.randn(B, H, T, d_qk, device='cuda', generator=g, dtype=torch.bfloat16).requires_grad_()
            for _ in range(2))
    v = torch.randn(B, H, T, d_v, device='cuda', generator=g, dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(B, H, T, d_v, device='cuda', generator=g, dtype=torch.bfloat16)
    flop = 4 * B * H * T * T * (d_qk + d_v) / 2 * 3.5 / 2      # causal; backward = 2.5 x forward
    print(f'attn: B={B} H={H} T={T}, q/k {d_qk}, v {d_v}, causal; forward + backward')

    def sdpa(backend, pad):
        def run():
            with sdpa_kernel(backend):
                vv = F.pad(v, (0, d_qk - d_v)) if pad else v
                y = F.scaled_dot_product_attention(q, k, vv, is_causal=True)[..., :d_v]
            y.backward(dy)
            q.grad = k.grad = v.grad = None
            return y
        return run
    variants = {'cuDNN': sdpa(SDPBackend.CUDNN_ATTENTION, False),
                'flash, v padded to 96': sdpa(SDPBackend.FLASH_ATTENTION, True),
                'memory-efficient': sdpa(SDPBackend.EFFICIENT_ATTENTION, False)}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T)
        flex = torch.compile(flex_attention)

        def run_flex():
            y = flex(q, k, v, block_mask=mask)
            y.backward(dy)
            q.grad = k.grad = v.grad = None
            return y
        variants['FlexAttention (compiled)'] = run_flex
    except Exception as e:                       # noqa: BLE001
        print(f'  FlexAttention: {type(e).__name__}: {str(e)[:80]}')
    ref = None
    for name, run in variants.items():
        try:
            y = run().float()
            ms = bench(run, n=10)
        except Exception as e:                   # noqa: BLE001 (a backend that refuses these shapes)
            print(f'  {name:28s} {type(e).__name__}: {str(e)[:80]}')
            continue
        ref = y if ref is None else ref
        print(f'  {name:28s} {ms:7.3f} ms  {flop / ms / 1e9:5.0f} TFLOP/s  max diff to cuDNN '
              f'{(y - ref).abs().max().item():.1e}', flush=True)


# --- MLA's layout: heads inside each token's row, or heads first ---

def bench_mla(B=128, T=512, config_file='config/tinystories_moe.py'):
    """One MLAttention layer forward + backward (compiled, bf16 autocast, float32 weights as in
    training) at B x T tokens: this checkout's model.py, which keeps q, k, v as (B, T, H, D) and
    hands attention strided views, against the one in experiments/model_old_ab.py (before: q, k
    transposed to (B, H, T, D) and concatenated there). Same weights; outputs compared."""
    import importlib.util
    from config import configure, model_config_from
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'model_old_ab.py')
    if not os.path.exists(path):
        print(f'mla: {path} is missing (git show REV:model.py > experiments/model_old_ab.py)')
        return
    spec = importlib.util.spec_from_file_location('model_old_ab', path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    cfg = model_config_from(configure({}, argv=[config_file], model_config=model.ModelConfig, verbose=False,
                                      ignore_unknown_in_files=True), model.ModelConfig)
    g = torch.Generator(device='cuda').manual_seed(0)
    x = torch.randn(B, T, cfg.n_embd, device='cuda', generator=g)
    dy = torch.randn(B, T, cfg.n_embd, device='cuda', generator=g)
    print(f'mla: B={B} T={T} H={cfg.n_head} q/k {cfg.qk_nope_head_dim}+{cfg.qk_rope_head_dim}, '
          f'v {cfg.v_head_dim}; forward + backward, compiled, bf16 autocast')
    outs = {}
    for name, mod in (('heads first (before)', old), ('heads inside rows (now)', model)):
        torch.manual_seed(0)
        attn = mod.MLAttention(cfg, 0).cuda()
        rope = mod.RotaryEmbedding(cfg.qk_rope_head_dim, cfg).cuda()(torch.arange(T, device='cuda'))
        xr = x.clone().requires_grad_()

        def fwd_bwd(xr=xr, attn=attn, rope=rope):
            with torch.autocast('cuda', torch.bfloat16):
                y = attn(xr, rope=rope)
            y.backward(dy)
            return y
        step = torch.compile(fwd_bwd)
        y = step().float()
        outs[name] = (y, xr.grad.clone())
        xr.grad = None
        attn.zero_grad(set_to_none=True)

        def run():
            step()
            xr.grad = None
            attn.zero_grad(set_to_none=True)
        print(f'  {name:26s} {bench(run):7.3f} ms', flush=True)
        prof_parts(run)
    (y0, g0), (y1, g1) = outs.values()
    print(f'  max diff: output {(y0 - y1).abs().max().item():.1e} (of {y0.abs().max().item():.1e}), '
          f'dx {(g0 - g1).abs().max().item():.1e} (of {g0.abs().max().item():.1e})')


# --- the MoE's row gathers: inductor's kernels against one Triton kernel ---

@triton.jit
def _gather_sum_rows_kernel(src_ptr, index_ptr, out_ptr, n_out, C, DIV: tl.constexpr, COPIES: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[i] = sum_{j < COPIES} src[index[i * COPIES + j] // DIV], summed in float32."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < n_out
    cols = tl.arange(0, BLOCK_C)
    mask = ok[:, None] & (cols < C)[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    for j in tl.static_range(COPIES):
        src = tl.load(index_ptr + rows * COPIES + j, mask=ok, other=0) // DIV
        acc += tl.load(src_ptr + src[:, None].to(tl.int64) * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def gather_sum_rows(src, index, div, copies, dtype, block_r, warps):
    n_out = index.numel() // copies
    out = torch.empty(n_out, src.size(1), device=src.device, dtype=dtype)
    _gather_sum_rows_kernel[(triton.cdiv(n_out, block_r),)](
        src, index, out, n_out, src.size(1), DIV=div, COPIES=copies, BLOCK_R=block_r,
        BLOCK_C=triton.next_power_of_2(src.size(1)), num_warps=warps)
    return out


def bench_glue(N=65536, K=4, E=64, C=512):
    """The MoE layer's row moves at 128 x 512 tokens, each as torch.compile writes it and as
    _gather_sum_rows_kernel over a few shapes: the sort's gather of float32 token rows into bf16
    (x[order // K]), the same of bf16 rows (dy in the combine's backward), and the combine's
    gather-and-sum of K bf16 rows (also the sort's backward)."""
    g = torch.Generator(device='cuda').manual_seed(0)
    idx = torch.rand(N, E, device='cuda', generator=g).topk(K, -1).indices.reshape(-1)
    order = idx.to(torch.uint8).argsort(stable=True)
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(N * K, device='cuda'))
    x = torch.randn(N, C, device='cuda', generator=g)
    xb = x.bfloat16()
    ys = torch.randn(N * K, C, device='cuda', generator=g, dtype=torch.bfloat16)
    bf = torch.bfloat16
    cases = [
        ('gather f32 -> bf16, x[order // K]', torch.compile(lambda: x.to(bf)[order // K]),
         lambda b, w: gather_sum_rows(x, order, K, 1, bf, b, w), N * K * C * (4 + 2)),
        ('gather bf16, dy[order // K]', torch.compile(lambda: xb[order // K]),
         lambda b, w: gather_sum_rows(xb, order, K, 1, bf, b, w), N * K * C * 4),
        ('gather-sum bf16, ys[inv].view(N, K, C).sum(1)',
         torch.compile(lambda: ys[inv].view(N, K, C).sum(1, dtype=torch.float32).to(bf)),
         lambda b, w: gather_sum_rows(ys, inv, 1, K, bf, b, w), N * K * C * 2 + N * C * 2),
    ]
    print(f'glue: {N} tokens x {K} experts, C = {C} (GB/s counts each row read once and written once)')
    for name, ref, tri, nbytes in cases:
        want = ref()
        ms = bench(ref)
        print(f'  {name:48s} compiled {ms:6.3f} ms  {nbytes / ms / 1e6:5.0f} GB/s', flush=True)
        for b, w in ((1, 1), (2, 2), (4, 4), (8, 4), (8, 8), (16, 8)):
            got = tri(b, w)
            ok = torch.equal(got, want) or torch.allclose(got.float(), want.float(), atol=1e-2, rtol=1e-2)
            ms = bench(lambda: tri(b, w))
            print(f'    triton rows {b:2d} warps {w}  {ms:6.3f} ms  {nbytes / ms / 1e6:5.0f} GB/s  '
                  f'{"same" if ok else "DIFFERENT"}', flush=True)


# --- tokens per expert: a histogram of N*K expert indices into E bins ---

def bench_counts(N=65536, K=4, E=64):
    """The MoE layer's tokens per expert (the grouped GEMM's segment ends come from them), compiled:
    scatter_add of ones (atomic adds, all on E addresses), a sum over a one-hot comparison (a
    reduction), and a binary search for each expert's segment end in the sort's keys."""
    g = torch.Generator(device='cuda').manual_seed(0)
    idx = torch.rand(N, E, device='cuda', generator=g).topk(K, -1).indices.reshape(-1)
    keys = idx.to(torch.uint8)
    experts = torch.arange(E, device='cuda')
    variants = {
        'scatter_add (atomics)': torch.compile(lambda: torch.zeros(E, dtype=torch.int32, device='cuda').scatter_add_(
            0, idx, torch.ones_like(idx, dtype=torch.int32))),
        'one-hot sum': torch.compile(lambda: (idx[:, None] == experts).sum(0, dtype=torch.int32)),
        'sort + searchsorted': torch.compile(lambda: torch.searchsorted(
            keys.sort(stable=True)[0], experts.to(torch.uint8), right=True).to(torch.int32).diff(prepend=experts[:1] * 0)),
        'sort alone (for reference)': torch.compile(lambda: keys.sort(stable=True)[1]),
    }
    want = torch.bincount(idx, minlength=E)
    print(f'counts: {N * K} (token, expert) pairs into {E} bins, compiled')
    for name, fn in variants.items():
        got = fn()
        same = 'same' if got.numel() != E or torch.equal(got.long(), want) else 'DIFFERENT'
        print(f'  {name:28s} {bench(fn) * 1000:7.1f} us  {same}', flush=True)


# --- the residual stream's gradient: inductor's RMSNorm backward and the bf16 cast after it ---

def bench_normcast(N=65536, C=512, blocks=3):
    """Three pre-norm sublayers on a float32 residual stream, compiled, forward + backward, under
    inductor settings. Each norm's backward writes the stream's float32 gradient; the bf16
    sublayer output before it takes that gradient cast to bf16. Lists the backward's Triton
    kernels: is the cast its own kernel (a second read of the float32 gradient) or fused?"""
    import re
    import torch._inductor.config as inductor_config
    import torch.nn.functional as F
    from torch._inductor.utils import run_and_get_code
    g = torch.Generator(device='cuda').manual_seed(0)
    x0 = torch.randn(N, C, device='cuda', generator=g, requires_grad=True)
    mats = [(torch.randn(C, C, device='cuda', generator=g) * 0.02).requires_grad_() for _ in range(blocks + 1)]
    norms = [torch.ones(C, device='cuda', requires_grad=True) for _ in range(blocks)]

    def run(x):
        with torch.autocast('cuda', torch.bfloat16):
            h = x @ mats[0]                                   # a bf16 sublayer output
            for w, m in zip(norms, mats[1:]):
                x = x + h                                     # float32 stream + bf16 output
                h = (F.rms_norm(x, (C,), eps=1e-6) * w) @ m   # the next sublayer's bf16 output
            return (x + h).float().square().mean()

    x3 = x0.detach().view(128, N // 128, C).requires_grad_()   # the model's (B, T, C) stream
    settings = {'default': ({}, x0), 'non-strict mix order': ({'triton.mix_order_reduction_non_strict_mode': True}, x0),
                'no mix-order reduction': ({'triton.mix_order_reduction': False}, x0),
                'default, (B, T, C) stream': ({}, x3)}
    print(f'normcast: {blocks} sublayers on a ({N}, {C}) float32 stream, compiled forward + backward')
    for name, (patch, x) in settings.items():
        torch._dynamo.reset()
        try:
            with inductor_config.patch(patch):
                f = torch.compile(run)
                _, codes = run_and_get_code(lambda: f(x).backward())
                ms = bench(lambda: f(x).backward())
        except (AttributeError, RuntimeError) as e:
            print(f'  {name:26s} not run: {str(e)[:100]}')
            continue
        launches = re.findall(r'(triton_\w+)\.run\(', codes[-1])
        kernels = ', '.join(f'{k[7:]} x{launches.count(k)}' for k in dict.fromkeys(launches))
        print(f'  {name:26s} {ms:.3f} ms; backward kernels: {kernels}', flush=True)


if __name__ == '__main__':
    modes = {'ce': bench_ce, 'router': bench_router, 'lmhead': bench_lmhead, 'chunks': bench_chunks,
             'attn': bench_attn, 'grouped': bench_grouped, 'mla': bench_mla,
             'glue': bench_glue, 'counts': bench_counts, 'normcast': bench_normcast}
    which = sys.argv[1].split(',') if len(sys.argv) > 1 else ['ce', 'router']
    unknown = [m for m in which if m not in modes]
    if unknown:
        sys.exit(f'kernel_bench.py: unknown mode(s) {unknown}; choose from {",".join(modes)}')
    print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)
    for m in which:
        modes[m]()
