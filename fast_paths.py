"""
The fast paths of model.py, each one equal to a plain reference path there (the tests hold them
equal). model.py calls into this file the way DeepSeek-V3's inference model calls its kernel.py:
a line that says "this is the fast way to do X" and keeps the reading of the model short.

  fused_linear          several projections of one input as one GEMM     ref: [l(x) for l in linears]
  top_k_indices         K rounds of argmax (fused by torch.compile)      ref: Tensor.topk
  expert_counts         tokens per expert as a one-hot sum               ref: torch.bincount
  experts_grouped       MoE experts as grouped GEMMs over sorted tokens  ref: Experts.forward (the loop)
  experts_gathered      MoE experts as gathered matrix-vector products   ref: Experts.forward (the loop)
  linear_cross_entropy  the output layer and the loss in chunks, with    ref: masked_cross_entropy(
                        the gradients taken in the forward (Triton)           lm_head(h), targets)

Triton kernels run on CUDA; without Triton (PyTorch's CPU build) each falls back to the same
math in PyTorch, which is what the CPU tests compare with the references.

(Not named kernels.py: transformers imports Hugging Face's `kernels` package, and a kernels.py in
the folder a script runs from would stand in for it.)
"""

import torch
import torch.nn.functional as F

try:                                     # the two hand-written kernels (the experts' SwiGLU backward,
    import triton                        # the loss's row pass) are Triton; the CPU build of
    import triton.language as tl         # PyTorch comes without it, and takes the same math in
    HAVE_TRITON = True                   # PyTorch instead
except ImportError:
    HAVE_TRITON = False


# -----------------------------------------------------------------------------
# Projections

def fused_linear(x, linears):
    """[l(x) for l in linears], as ONE matrix multiply over the stacked weights when autocast
    copies the weights anyway (float32 weights cast to bf16 at every training step: the cast
    writes them side by side, and under torch.compile that is one kernel). Weights already in
    the compute dtype (decoding in bf16) would be copied by the stacking, so then one each."""
    dev = x.device.type
    w = linears[0].weight
    if not (torch.is_autocast_enabled(dev) and w.dtype != torch.get_autocast_dtype(dev)):
        return [l(x) for l in linears]
    bias = None
    if any(l.bias is not None for l in linears):
        bias = torch.cat([l.bias if l.bias is not None else w.new_zeros(l.out_features) for l in linears])
    y = F.linear(x, torch.cat([l.weight for l in linears]), bias)
    return y.split([l.weight.size(0) for l in linears], dim=-1)


# -----------------------------------------------------------------------------
# Routing

def top_k_indices(choice, K, by_argmax=None):
    """choice.topk(K, dim=-1).indices for a few experts per row. On a GPU, torch.topk is a radix
    select plus a sort per row; K rounds of argmax, each masking the last pick, are row reductions that torch.compile fuses with the
    router's sigmoid and bias into one kernel. The same indices in the same order (the largest
    first; on ties the lower index, where topk's order is unspecified). by_argmax: None = on CUDA."""
    if not (choice.is_cuda if by_argmax is None else by_argmax):
        return choice.topk(K, dim=-1).indices
    choice = choice.detach()
    cols = torch.arange(choice.size(-1), device=choice.device)
    picks = []
    for _ in range(K):
        i = choice.argmax(-1, keepdim=True)                                  # (N, 1)
        picks.append(i)
        choice = torch.where(cols == i, float('-inf'), choice)               # not again
    return torch.cat(picks, -1)


def expert_counts(indices, E):
    """(E,) int32: how many (token, expert) pairs in indices (N, K) went to each expert. A sum over
    the one-hot comparison, which torch.compile writes as one reduction over the indices; a
    scatter_add of N*K ones into E counters is atomic adds that queue on the same E addresses."""
    return (indices.reshape(-1, 1) == torch.arange(E, device=indices.device)).sum(0, dtype=torch.int32)


# -----------------------------------------------------------------------------
# Experts: grouped GEMMs (training, prefill) and gathered products (decoding)

def _grouped_mm_dtype(x):
    """bf16 under CUDA autocast (the grouped GEMM kernels are bf16 on Hopper), else x's dtype."""
    if x.is_cuda and torch.is_autocast_enabled('cuda'):
        return torch.get_autocast_dtype('cuda')
    return x.dtype


def grouped_mm_supported(x, C, I):
    """torch._grouped_mm runs here: bf16 on CUDA compute capability >= 9.0 (Hopper), or float32
    / bf16 on CPU (float32 not under torch.compile), with 16-byte aligned rows."""
    if not hasattr(torch, '_grouped_mm'):
        return False
    dtype = _grouped_mm_dtype(x)
    align = 128 // torch.finfo(dtype).bits if dtype.is_floating_point else 0   # elements per 16 bytes
    if not align or C % align or I % align:
        return False
    if dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return False                 # torch.compile's shape rule for _grouped_mm takes bf16 only
    if x.is_cuda:
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return x.device.type == 'cpu' and dtype in (torch.float32, torch.bfloat16)


def experts_grouped(experts, x, weights, indices, fuse_gate_up=None):
    """Experts.forward (model.py) for many tokens: sort the N*K (token, expert) pairs by expert, run each projection as ONE
    grouped matrix multiply over the contiguous per-expert segments, then unsort and sum the
    K outputs of each token. No host syncs, no Python loop over experts.
    fuse_gate_up (None: whenever the weights are cast to the compute dtype anyway, i.e. float32
    weights under autocast): gate and up as one grouped GEMM over [gate ; up] (E, 2I, C),
    written side by side by that cast; with weights already in the compute dtype (decoding)
    the concatenation would be an extra copy of every expert per step, so two GEMMs."""
    N, K = indices.shape
    E = experts.gate_proj.size(0)
    flat = indices.reshape(-1)                                            # (N*K,)
    # pairs by expert. The sort's keys in the narrowest integer that holds E: a GPU radix sort
    # makes one pass per byte of key (8 for int64); the stable order is the same
    order = flat.to(torch.uint8 if E <= 256 else torch.int16).argsort(stable=True)
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(N * K, device=x.device))  # pair p is at inv[p]
    offs = expert_counts(indices, E).cumsum(0, dtype=torch.int32)         # segment ends
    dtype = _grouped_mm_dtype(x)
    xs = GatherRows.apply(x.to(dtype), order // K, inv, K)                # (N*K, C) sorted; cast
    # first (float32 x under autocast): the gather and its backward move bf16 rows, not float32
    if fuse_gate_up is None:
        fuse_gate_up = experts.gate_proj.dtype != dtype
    # the gate weight enters before the down projection, which is linear: g W_down h = W_down (g h).
    # Then the combine is a plain gather-and-sum, and its backward a gather of dy: no read of
    # the experts' outputs for dg (that comes from h, in the SwiGLU's backward)
    g = GatherRows.apply(weights.reshape(-1, 1), order, inv, 1)         # (N*K, 1) sorted
    if fuse_gate_up:
        # cast, then concatenate: the backward's float32 gradients of gate and up are then
        # two contiguous tensors, not strided views of one (E, 2I, C) buffer that autograd
        # would have to copy into each parameter's layout
        w13 = torch.cat([experts.gate_proj.to(dtype), experts.up_proj.to(dtype)], 1)   # (E, 2I, C)
        h = WeightedSwiGLU.apply(torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs), g, dtype)
    else:
        gate = torch._grouped_mm(xs, experts.gate_proj.to(dtype).transpose(1, 2), offs=offs)
        up = torch._grouped_mm(xs, experts.up_proj.to(dtype).transpose(1, 2), offs=offs)
        h = (F.silu(gate) * up * g).to(dtype)                            # g h
    ys = torch._grouped_mm(h, experts.down_proj.to(dtype).transpose(1, 2), offs=offs)
    # unsort and sum the K outputs of each token: y_t = sum_k g_tk y_tk (float32 sum, written
    # in the compute dtype like any autocast layer's output: its backward reads dy in bf16)
    return GatherRows.apply(ys, inv, order, 1).view(N, K, ys.size(-1)).sum(1, dtype=torch.float32).to(dtype)

def experts_gathered(experts, x, weights, indices):
    """For a few tokens (decoding at a small batch): every (token, k) pair reads its expert's
    matrices directly, as matrix-vector products over the gathered weights,
        h_tk = silu(W_gate[e] x_t) * (W_up[e] x_t),   y_t = sum_k g_tk W_down[e] h_tk,  e = indices[t, k]
    with no sort, no segment offsets and no host sync. Written as multiply-and-sum (float32
    accumulation) so that torch.compile makes each product one kernel that reads the chosen
    rows in place. It reads N*K expert matrices, no more than all E when N*K <= E (MoE's rule)."""
    xf = x.float()[:, None, None, :]                                      # (N, 1, 1, C)
    gate = (experts.gathered('gate_proj', indices).float() * xf).sum(-1)     # (N, K, I)
    up = (experts.gathered('up_proj', indices).float() * xf).sum(-1)
    h = (F.silu(gate) * up)[:, :, None, :]                                # (N, K, 1, I)
    y = (experts.gathered('down_proj', indices).float() * h).sum(-1)         # (N, K, C)
    return (y * weights[..., None].float()).sum(1).to(x.dtype)


class WeightedSwiGLU(torch.autograd.Function):
    """h = g * silu(a) * b for the sorted (token, expert) rows: gate_up = [a ; b] (M, 2I) from the
    fused gate/up GEMM, g (M, 1) the gate weights, h (M, I) in dtype. Its backward,
        dh' = g dh,   da = dh' b sigmoid(a) (1 + a (1 - sigmoid(a))),   db = dh' silu(a),
        dg = sum_i dh_i silu(a_i) b_i,
    is one Triton kernel on CUDA: one read of gate_up and dh, one write of d gate_up, with dg
    from the same rows (torch.compile writes the reduction as a second kernel that reads gate_up
    again). The same math in PyTorch elsewhere."""

    @staticmethod
    def forward(ctx, gate_up, g, dtype):
        ctx.save_for_backward(gate_up, g)
        a, b = gate_up.chunk(2, dim=-1)
        return (F.silu(a) * b * g).to(dtype)

    @staticmethod
    def backward(ctx, dh):
        gate_up, g = ctx.saved_tensors
        if gate_up.is_cuda and HAVE_TRITON:
            d_gate_up, dg = swiglu_weighted_backward(gate_up, g, dh.contiguous())
            return d_gate_up, dg.view_as(g).to(g.dtype), None
        a, b = gate_up.float().chunk(2, dim=-1)
        dh = dh.float()
        sig = torch.sigmoid(a)
        dg = (dh * a * sig * b).sum(-1, keepdim=True)
        dh = dh * g
        da = dh * b * sig * (1 + a * (1 - sig))
        return torch.cat([da, dh * a * sig], -1).to(gate_up.dtype), dg.to(g.dtype), None


if HAVE_TRITON:
    @triton.jit
    def _swiglu_weighted_backward_kernel(gate_up_ptr, g_ptr, dh_ptr, d_gate_up_ptr, dg_ptr, M, I,
                                         BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
        """WeightedSwiGLU's backward for BLOCK_M rows (all I columns at once)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_I)
        row_ok = rows < M
        mask = row_ok[:, None] & (cols < I)[None, :]
        at = rows[:, None].to(tl.int64) * (2 * I) + cols[None, :]           # a at [row, i], b at + I
        a = tl.load(gate_up_ptr + at, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(gate_up_ptr + at + I, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + rows[:, None].to(tl.int64) * I + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        sig = tl.sigmoid(a)
        silu = a * sig
        tl.store(dg_ptr + rows, tl.sum(dh * silu * b, 1), mask=row_ok)       # dg = sum_i dh silu(a) b
        dh = dh * g[:, None]
        da = dh * b * sig * (1 + a * (1 - sig))
        tl.store(d_gate_up_ptr + at, da.to(d_gate_up_ptr.dtype.element_ty), mask=mask)
        tl.store(d_gate_up_ptr + at + I, (dh * silu).to(d_gate_up_ptr.dtype.element_ty), mask=mask)

    @torch.library.triton_op('nano_kimi::swiglu_weighted_backward', mutates_args=())
    def swiglu_weighted_backward(gate_up: torch.Tensor, g: torch.Tensor,
                                 dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d gate_up, dg (M,) float32) of WeightedSwiGLU; a custom op, so that torch.compile
        keeps the kernel inside its graph (no graph break)."""
        M, I = dh.shape
        d_gate_up = torch.empty_like(gate_up)
        dg = torch.empty(M, device=dh.device, dtype=torch.float32)
        block_i = triton.next_power_of_2(I)
        block_m = max(1, 4096 // block_i)
        torch.library.wrap_triton(_swiglu_weighted_backward_kernel)[(triton.cdiv(M, block_m),)](
            gate_up, g.reshape(-1).float(), dh, d_gate_up, dg, M, I, BLOCK_M=block_m, BLOCK_I=block_i,
            num_warps=4)
        return d_gate_up, dg


class GatherRows(torch.autograd.Function):
    """y = x[index], where index names every row of x exactly `copies` times, and inverse lists
    where those copies landed: row t of x is at y[inverse[t * copies + j]], j < copies. Autograd's
    own gradient of indexing is a scatter-add (atomic adds on a GPU); knowing the inverse makes
    it a gather and a sum: grad_x[t] = sum_j grad_y[inverse[t * copies + j]]."""

    @staticmethod
    def forward(ctx, x, index, inverse, copies):
        ctx.save_for_backward(inverse)
        ctx.copies = copies
        return x[index]

    @staticmethod
    def backward(ctx, grad_y):
        inverse, = ctx.saved_tensors
        grad_x = grad_y[inverse].view(-1, ctx.copies, grad_y.size(-1)).sum(1)
        return grad_x, None, None, None


# -----------------------------------------------------------------------------
# --- the output layer and the loss in one: no (B, T, V) logits (the training step's fast path) ---
#
# With V = 50,304 the logits are the largest tensor of a small model's step (64 x 512 tokens:
# 3.3 GB in bf16), and the plain path reads or writes them four times: the output GEMM writes
# them, the loss reads them, its backward reads them again and writes dlogits. Here, per chunk of
# rows (Liger-Kernel's FusedLinearCrossEntropy, Hsu et al. 2024), the loss and its gradient are
# taken together in the forward:
#     z = h W^T                       (n, V) bf16, one chunk at a time
#     loss_i = logsumexp(z_i) - z_i[y_i]        (0 where y_i = -1)
#     dz_i = softmax(z_i) - onehot(y_i)
#     dh = dz W,  dW += dz^T h                   the output layer's backward, done now
# and backward only scales dh and dW by the incoming gradient. Rows where y = -1 get dz = 0.
# The row pass reads each row of z once: the softmax's normaliser S_i is known only at the row's
# end, so it writes z_i <- P_i = exp(z_i - c_i) - S_i onehot(y_i), unnormalised (c_i: an offset
# near the row's max), and the division by S_i moves to the (n, C) side of the two GEMMs:
#     dz_i = P_i / S_i,   dh_i = (P_i W) / S_i,   dW += P^T (h / S)
# which costs two small (n, C) scalings instead of a second read of the (n, V) logits.

if HAVE_TRITON:
    @triton.jit
    def _cross_entropy_row(z_row, y, loss_at, inv_sum_at, V, BLOCK: tl.constexpr,
                           RESCALE_AT: tl.constexpr = 32.0):
        """One row of logits at z_row with target y, read once and written once:
        *loss_at = logsumexp(z) - z[y],  z <- exp(z - c) - S onehot(y),  *inv_sum_at = 1 / S,
        S = sum exp(z - c); loss and 1/S are 0 where y = -1. The offset c is the first block's
        max, raised (and the blocks already written rescaled by exp(c_old - c_new)) whenever a
        later block's max passes c + RESCALE_AT: exp(z - c) <= e^32 and S <= V e^32 stay far below
        float32's 3e38, and the entries that underflow (z < c - 87 <= max - 87) carry no
        probability to speak of."""
        valid = y >= 0
        z_y = tl.load(z_row + tl.maximum(y, 0)).to(tl.float32)
        c = float('-inf')                                # the offset
        s = 0.0                                          # sum of exp(z - c) so far
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(z_row + cols, mask=cols < V, other=float('-inf')).to(tl.float32)
            m = tl.max(z, 0)
            if m > c + RESCALE_AT:                       # the first block, then rarely
                scale = tl.exp(c - m)
                tl.debug_barrier()                       # this row's earlier stores are visible
                for prev in range(0, start, BLOCK):
                    pcols = prev + tl.arange(0, BLOCK)
                    p = tl.load(z_row + pcols).to(tl.float32) * scale
                    tl.store(z_row + pcols, p.to(z_row.dtype.element_ty))
                s = s * scale
                c = m
            p = tl.exp(z - c)
            s += tl.sum(p, 0)
            tl.store(z_row + cols, p.to(z_row.dtype.element_ty), mask=cols < V)
        tl.store(loss_at, tl.where(valid, c + tl.log(s) - z_y, 0.0))
        tl.store(inv_sum_at, tl.where(valid, 1.0 / s, 0.0))
        tl.debug_barrier()                               # the block's store of P[y] lands first
        if valid:
            tl.store(z_row + y, (tl.exp(z_y - c) - s).to(z_row.dtype.element_ty))

    @triton.jit
    def _cross_entropy_rows_kernel(z_ptr, stride, targets_ptr, loss_ptr, inv_sum_ptr, V,
                                   BLOCK: tl.constexpr):
        """One program per row."""
        row = tl.program_id(0).to(tl.int64)
        _cross_entropy_row(z_ptr + row * stride, tl.load(targets_ptr + row), loss_ptr + row,
                           inv_sum_ptr + row, V, BLOCK)


def cross_entropy_rows_(z, targets):
    """The loss's row pass over logits z (n, V) with targets (n,), -1 = no loss. Returns the
    per-row loss (float32) and 1 / S (float32; both 0 where the target is -1), and overwrites z
    with P = exp(z - c) - S onehot(y), so that the gradient d loss_sum / dz = P / S (see above).
    Triton on CUDA; elsewhere the same contract in PyTorch with c = the row's max (the reference
    the CUDA test compares the kernel with)."""
    if z.is_cuda and HAVE_TRITON:
        loss = torch.empty(z.size(0), device=z.device, dtype=torch.float32)
        inv_sum = torch.empty_like(loss)
        _cross_entropy_rows_kernel[(z.size(0),)](z, z.stride(0), targets, loss, inv_sum, z.size(1),
                                                 BLOCK=4096, num_warps=8)
        return loss, inv_sum
    valid = targets >= 0
    y = targets.clamp(min=0)[:, None]
    zf = z.float()
    c = zf.max(-1, keepdim=True).values
    p = torch.exp(zf - c)
    s = p.sum(-1)
    loss = (c[:, 0] + torch.log(s) - zf.gather(1, y)[:, 0]) * valid
    p.scatter_add_(1, y, -s[:, None])                       # P[y] -= S
    z.copy_(p)
    return loss, valid / s


_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, 'dtype')     # torch.mm(bf16, bf16, out_dtype=float32)


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T, y_i) with the gradients of h and W computed in the forward, chunk by chunk
    (see the comment above). Under autocast the products run in its dtype, as nn.Linear's would."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows):
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        with torch.autocast(h.device.type, enabled=False):
            hc, w = h.to(dtype), weight.to(dtype)
            dh = torch.empty_like(hc)
            dw = None
            total = torch.zeros((), device=h.device, dtype=torch.float32)
            n = h.size(0)
            chunk_rows = -(-n // -(-n // chunk_rows))                    # equal chunks, none tiny
            fp32_out = hc.is_cuda and dtype != torch.float32 and _MM_OUT_DTYPE
            for start in range(0, n, chunk_rows):
                h_c = hc[start:start + chunk_rows]
                z = h_c @ w.t()                                          # (n, V)
                loss, inv_sum = cross_entropy_rows_(z, targets[start:start + chunk_rows])  # z <- P
                total = total + loss.sum()
                dh_c = torch.mm(z, w, out=dh[start:start + chunk_rows])  # P W
                dh_c.mul_(inv_sum[:, None])                              # dh = dz W = (P W) / S
                h_s = (h_c * inv_sum[:, None]).to(dtype)                 # h / S
                if fp32_out:              # dW += dz^T h = P^T (h / S), accumulated in float32
                    dw = torch.mm(z.t(), h_s, out_dtype=torch.float32) if dw is None else \
                        torch.addmm(dw, z.t(), h_s, out_dtype=torch.float32, out=dw)
                else:
                    dw_c = z.t() @ h_s                                   # (V, C)
                    dw = dw_c.float() if dw is None else dw.add_(dw_c)
        ctx.save_for_backward(dh, dw)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        dh, dw = ctx.saved_tensors
        return (dh * grad_total).to(ctx.h_dtype), (dw * grad_total).to(ctx.w_dtype), None, None


def linear_cross_entropy(h, weight, targets, chunk_bytes=1 << 30):
    """masked_cross_entropy(h @ weight.T, targets) without the (.., V) logits held whole: h (B, T, C)
    or (N, C), weight (V, C), targets (B, T) or (N,) with -1 where no loss is wanted. Chunks of
    rows whose logits take at most chunk_bytes, counted at 2 bytes a logit (1 GiB: 7 chunks of at most
    10,672 rows at 128 x 512 tokens, V = 50,304; a float32 run's chunks take 2 GiB)."""
    h2, t = h.reshape(-1, h.size(-1)), targets.reshape(-1).contiguous()
    rows = max(1, chunk_bytes // (weight.size(0) * 2))
    total = LinearCrossEntropy.apply(h2, weight, t, rows)
    return total / (t >= 0).sum().clamp(min=1)


if HAVE_TRITON:   # eager between compiled graphs: dynamo does not trace the Triton row kernel. Without
    # Triton it traces the same math in PyTorch (the same loss and gradients as eager: a test), and
    # importing torch._dynamo (what the decorator does) would add about 1.5 s to the start of every
    # script on a CPU-only build
    linear_cross_entropy = torch.compiler.disable(linear_cross_entropy)

