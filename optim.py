"""
Optimizers for every training stage:

  adamw     AdamW (Loshchilov & Hutter 2019), weight decay on matrices only
  muon      Muon (Jordan et al. 2024) on the hidden layers' matrices, with Moonlight's update
            scale (Liu et al. 2025) so AdamW's learning rate and weight decay carry over; AdamW
            for embeddings, the output head, norms and biases
  muonclip  Muon + QK-Clip (Kimi-K2 report, 2025): after each step, every attention head whose
            largest logit q.k exceeded qk_clip_tau has its query/key weights scaled back

build_optimizer(model, name, ...) returns one torch optimizer whose param groups carry
'base_lr'; set_lr(optimizer, lr_now / learning_rate) applies the schedule to every group.
qk_clip(model, tau) runs after optimizer.step() (train.py does it when optimizer='muonclip').
All three work on parameters sharded by FSDP2 too (fsdp=True; see "parameters sharded by FSDP2").
"""

import inspect
import math
import sys

import torch

OPTIMIZERS = ('adamw', 'muon', 'muonclip')

# the quintic Newton-Schulz coefficients of Muon: a fast rise of small singular values toward 1
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G, steps=5, eps=1e-7):
    """Approximately orthogonalise G (..., m, n): return ~U V^T where G = U S V^T, i.e. G with
    every singular value moved near 1 (in roughly [0.7, 1.2], see tests). Each iteration
        X <- a X + b (X X^T) X + c (X X^T)^2 X
    applies p(s) = a s + b s^3 + c s^5 to the singular values; after scaling G to spectral norm
    <= 1 (by its Frobenius norm), 5 iterations push into that band every singular value not far
    below the largest (p grows a small one about a = 3.4x an iteration, 490x in five, so one under
    about 1e-3 of the Frobenius norm stays small: a near-rank-deficient direction is not blown up).
    Runs in bf16, on the wide orientation (m <= n) so X X^T is the smaller Gram matrix; leading
    dimensions are a batch (one matrix per expert)."""
    a, b, c = NS_COEFFICIENTS
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    batch = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])                       # (matrices, m, n): a view here
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT                                       # (matrices, m, m)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)        # b A + c A A: one GEMM, the sum in its epilogue
        X = torch.baddbmm(X, B, X, beta=a)                 # a X + B X: likewise
    X = X.reshape(*batch, *X.shape[-2:])
    return X.mT if tall else X


# --- parameters sharded by FSDP2 (fsdp=True) ---------------------------------------------------
# fully_shard turns every parameter into a DTensor split along dim 0 across the ranks of a 1-D
# mesh, as torch.chunk splits: each rank holds ceil(rows / world) consecutive rows (the last
# ranks fewer, or none). Elementwise updates (momentum, AdamW, weight decay) work on the shards as
# they are; what mixes rows needs the helpers below.

def is_sharded(t):
    """True for an FSDP2-sharded parameter (or its gradient, or a state tensor made like it)."""
    tensor = sys.modules.get('torch.distributed.tensor')   # a DTensor exists only once FSDP imported this
    return tensor is not None and isinstance(t, tensor.DTensor)   # (importing it here would cost ~0.7 s)


def shard_rows(t):
    """(start, stop): the rows of dim 0 of the full tensor that this rank holds of the sharded t."""
    from torch.distributed.tensor import Shard
    if t.device_mesh.ndim != 1 or t.placements != (Shard(0),):
        raise NotImplementedError(f'parameters sharded as {t.placements} over a {t.device_mesh.ndim}-D mesh; '
                                  f'only FSDP2 row sharding (Shard(0), one mesh dimension) is supported')
    n, world, rank = t.shape[0], t.device_mesh.size(), t.device_mesh.get_local_rank()
    per_rank = math.ceil(n / world)
    start = min(rank * per_rank, n)
    return start, min(start + per_rank, n)


def scale_rows_(w, s):
    """w[i] *= s[i] for every row i along dim 0, in place (QK-Clip's per-head rescaling). For a
    sharded w only the rows this rank holds; s is the same on every rank, so no communication."""
    if is_sharded(w):
        start, stop = shard_rows(w)
        w, s = w.to_local(), s[start:stop]
    w.mul_(s.to(w.dtype).view(-1, *[1] * (w.dim() - 1)))


def newton_schulz_input(u):
    """The matrices Newton-Schulz must see for the momentum update u of one parameter, as a plain
    tensor: u itself; for a sharded 2-D u the full matrix (an all-gather: orthogonalisation mixes
    all rows, so every rank orthogonalises the whole matrix, redundantly but identically); for a
    sharded stack of expert matrices (E, m, n) this rank's whole experts (rows of dim 0 are
    experts, each orthogonalised on its own: no communication)."""
    if not is_sharded(u):
        return u
    return u.full_tensor() if u.dim() == 2 else u.to_local()


def add_update_(p, o, alpha):
    """p += alpha * o, where o is Newton-Schulz's output for newton_schulz_input(p's update): for
    a sharded 2-D p only the rows this rank holds are added."""
    if is_sharded(p):
        if p.dim() == 2:
            start, stop = shard_rows(p)
            o = o[start:stop]
        p = p.to_local()
    p.add_(o.view(p.shape), alpha=alpha)              # bf16 o into float32 p: no float32 copy of o


def muon_update_scale(shape):
    """Moonlight: 0.2 * sqrt(max(fan_out, fan_in)) gives the orthogonalised update the RMS of a
    typical AdamW update (about 0.2), so the same learning rate and weight decay work."""
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


def is_muon_param(name, p):
    """Muon takes the matrices of the hidden layers (2-D weights, and 3-D expert stacks, one
    matrix per expert); AdamW keeps embeddings, the output heads, norms and biases (also inside a
    container, e.g. '1.lm_head.weight' of PPO's [policy, value model])."""
    return p.ndim >= 2 and not set(name.split('.')) & {'tok_emb', 'pos_emb', 'lm_head', 'score_head'}


class Muon(torch.optim.Optimizer):
    """One optimizer, two update rules chosen per param group by group['use_muon'].

    Muon group (momentum mu, Nesterov):   M <- mu M + G;   U = G + mu M (Nesterov) or M
        W <- W - lr * (wd * W + muon_update_scale * NewtonSchulz(U))
    AdamW group (betas, eps):   the usual AdamW with bias correction and decoupled decay."""

    def __init__(self, param_groups, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_steps=5, betas=(0.9, 0.95), eps=1e-8):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, betas=tuple(betas), eps=eps, use_muon=False)
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group['params'] if p.grad is not None]
            if not params:
                continue
            if group['use_muon']:
                self._muon_step(group, params)
            else:
                self._adamw_step(group, params)
        return loss

    def _muon_step(self, group, params):
        """Momentum for every matrix at once (foreach kernels), then ONE batched Newton-Schulz per
        matrix shape: e.g. all q_b_proj weights of all layers, or the gate and up stacks of every
        MoE layer (E matrices each), go through the same 5 iterations as one (n, m, k) batch.
        Each matrix is still normalised and orthogonalised on its own, so this equals the loop
        over matrices; it just launches ~15 kernels per shape instead of per matrix."""
        lr, wd, mu = group['lr'], group['weight_decay'], group['momentum']
        grads = [p.grad for p in params]
        bufs = []
        for p, g in zip(params, grads):
            state = self.state[p]
            if 'momentum_buffer' not in state:
                state['momentum_buffer'] = torch.zeros_like(g)
            bufs.append(state['momentum_buffer'])
        torch._foreach_mul_(bufs, mu)                                    # M <- mu M + G
        torch._foreach_add_(bufs, grads)
        updates = torch._foreach_add(grads, bufs, alpha=mu) if group['nesterov'] else bufs  # G + mu M
        torch._foreach_mul_(params, 1 - lr * wd)                         # decoupled decay
        updates = [newton_schulz_input(u) for u in updates]             # FSDP: plain tensors
        by_shape = {}                                                    # (m, n) -> indices
        for i, u in enumerate(updates):
            by_shape.setdefault((tuple(u.shape[-2:]), u.device), []).append(i)
        for ((m, n), _), ix in by_shape.items():
            stacked = torch.cat([updates[i].reshape(-1, m, n) for i in ix])   # (matrices, m, n)
            ortho = newton_schulz(stacked, group['ns_steps'])
            sizes = [updates[i].numel() // (m * n) for i in ix]
            for i, o in zip(ix, ortho.split(sizes)):
                p = params[i]
                add_update_(p, o.view(updates[i].shape), -lr * muon_update_scale(p.shape))

    def _adamw_step(self, group, params):
        """AdamW (Loshchilov & Hutter 2019) for embeddings, head, norms and biases, as foreach
        kernels over the group:  m <- b1 m + (1-b1) g,  v <- b2 v + (1-b2) g^2,
        p <- p (1 - lr wd) - lr / (1-b1^t) * m / (sqrt(v / (1-b2^t)) + eps)."""
        lr, wd, eps = group['lr'], group['weight_decay'], group['eps']
        beta1, beta2 = group['betas']
        grads, exp_avgs, exp_avg_sqs, steps = [], [], [], []
        for p in params:
            state = self.state[p]
            if 'step' not in state:
                state['step'] = torch.zeros((), dtype=torch.float32)    # on the CPU: no device sync
                state['exp_avg'] = torch.zeros_like(p)
                state['exp_avg_sq'] = torch.zeros_like(p)
            state['step'] += 1
            grads.append(p.grad)
            exp_avgs.append(state['exp_avg'])
            exp_avg_sqs.append(state['exp_avg_sq'])
            steps.append(state['step'].item())
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denoms = torch._foreach_div(exp_avg_sqs, [1 - beta2 ** t for t in steps])
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, eps)
        torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_addcdiv_(params, exp_avgs, denoms, [-lr / (1 - beta1 ** t) for t in steps])


def adamw_param_groups(params, weight_decay):
    """Decay the matrices (weights of linear layers, embeddings); not biases or norm gains.
    Decoupled weight decay (Loshchilov & Hutter 2019): theta <- theta - lr * wd * theta."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]


def split_by_lr_scale(groups, lr_scale):
    """Each param group split by the learning-rate multiplier of its parameters (lr_scale: id of a
    parameter -> multiplier, 1 where absent), the multiplier kept in the group as 'lr_scale'."""
    out = []
    for g in groups:
        scales = sorted({lr_scale.get(id(p), 1.0) for p in g['params']}) or [1.0]
        out += [dict(g, params=[p for p in g['params'] if lr_scale.get(id(p), 1.0) == s], lr_scale=s)
                for s in scales]
    return out


def build_optimizer(model, name='adamw', learning_rate=3e-4, weight_decay=0.1, betas=(0.9, 0.95),
                    eps=1e-8, device_type='cpu', momentum=0.95, nesterov=True, ns_steps=5, capturable=False,
                    lr_scale=None):
    """capturable: the step may be captured in a CUDA graph (runtime.CUDAGraphStep): AdamW keeps
    its step counts on the device and never reads them on the host (Muon cannot yet).
    lr_scale: {id(parameter): multiplier} for parameters that learn at learning_rate * multiplier
    (PPO's value model: a fresh head learns faster than the policy may move)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer='{name}'; valid: {', '.join(OPTIMIZERS)}")
    if capturable and name != 'adamw':
        raise ValueError(f"optimizer='{name}' cannot be captured in a CUDA graph (its step reads the step "
                         "count on the host); use optimizer='adamw'")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if name == 'adamw':
        groups = adamw_param_groups([p for _, p in named], weight_decay)
        if lr_scale:
            groups = split_by_lr_scale(groups, lr_scale)
        extra = {}
        if device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters:
            extra['fused'] = True                   # one kernel for all parameters
        if capturable:
            extra['capturable'] = True
        opt = torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(betas), eps=eps, **extra)
    else:
        muon = [p for n, p in named if is_muon_param(n, p)]
        rest = [p for n, p in named if not is_muon_param(n, p)]
        groups = [{'params': muon, 'use_muon': True, 'weight_decay': weight_decay}]
        groups += [dict(g, use_muon=False) for g in adamw_param_groups(rest, weight_decay)]
        if lr_scale:
            groups = split_by_lr_scale(groups, lr_scale)
        opt = Muon(groups, lr=learning_rate, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                   betas=betas, eps=eps)
    for g in opt.param_groups:
        g['base_lr'] = g['lr'] = learning_rate * g.get('lr_scale', 1.0)
    return opt


def clip_grad_norm_(optimizer, params, max_norm, defer_to_optimizer=True):
    """torch.nn.utils.clip_grad_norm_: every gradient times min(1, max_norm / (norm + 1e-6)), norm
    the total 2-norm, which is returned. With a fused AdamW (and defer_to_optimizer) the scaling is
    not a pass of its own: the optimizer's kernel divides each gradient by its `grad_scale`,
        grad_scale = max(1, (norm + 1e-6) / max_norm),
    as it does for GradScaler's loss scale, so the gradients are read once less per step.
    defer_to_optimizer must be False where a GradScaler steps
    the optimizer (it sets grad_scale itself) and for sharded (FSDP) gradients."""
    params = [p for p in params if p.grad is not None]
    if defer_to_optimizer and isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get('fused'):
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0).float()
        return norm
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def set_lr(optimizer, scale):
    """lr of every group = its base_lr * scale (the schedule's lr_now / learning_rate)."""
    for g in optimizer.param_groups:
        if torch.is_tensor(g['lr']):         # a step captured in a CUDA graph reads it from the device
            g['lr'].fill_(g['base_lr'] * scale)
        else:
            g['lr'] = g['base_lr'] * scale


# --- QK-Clip (Kimi-K2 report, section 2.1) ----------------------------------------------------
# Each attention module keeps `max_logit`, per head the largest pre-softmax logit
# max_{t,l} q_t . k_l * scale seen in training forwards (record_max_logit, called from the
# module's forward while track_max_logit is on). After each optimizer step qk_clip reads them
# and, for every head h whose S_h exceeded tau, rescales the head's query and key weights so its
# logits shrink by gamma_h = tau / S_h.

@torch.no_grad()
def record_max_logit(attn, q, k, attn_mask, is_causal):
    """attn.max_logit <- max(attn.max_logit, per-head max of q k^T * attn.scale over the batch,
    masked entries excluded). q: (B, H, T, D), k: (B, H or Hkv, L, D): one extra q k^T, in the
    compute dtype."""
    if k.size(1) != q.size(1):
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    s = torch.matmul(q, k.transpose(-2, -1))                               # (B, H, T, L)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float('-inf'))
    elif is_causal:
        T, L = s.shape[-2:]
        keep = torch.ones(T, L, dtype=torch.bool, device=s.device).tril(L - T)
        s = s.masked_fill(~keep, float('-inf'))
    m = s.amax(dim=(0, 2, 3)).float() * attn.scale                         # scale > 0
    attn.max_logit.copy_(torch.maximum(attn.max_logit, m))


@torch.no_grad()
def rescale_qk_(attn, gamma):
    """Multiply head h's logits by gamma[h] (<= 1) by rescaling weights, row by row (so FSDP
    shards work too).
    MHA / GQA (model.CausalSelfAttention): a key head serves a group of query heads, so it takes
      sqrt(min gamma of its group) and each query head the rest, gamma[h] / sqrt(min): every
      head's logits scale by exactly its own gamma, and heads of the group under tau keep theirs.
    MLA (model.MLAttention), as the Kimi-K2 report does it: the head's q_nope and k_nope rows by
      sqrt(gamma) (their product carries gamma), its q_rope rows by gamma, and the shared k_rope
      (used by every head) not at all."""
    if hasattr(attn, 'kv_b_proj'):                                          # MLA
        H, dn, dr, dv = attn.n_head, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim
        g = gamma.to(attn.kv_b_proj.weight.dtype).view(H, 1)
        # per head, q's rows are [q_nope (dn) ; q_rope (dr)] and kv_b's are [k_nope (dn) ; v (dv)]
        q_rows = torch.cat([g.sqrt().expand(H, dn), g.expand(H, dr)], 1).reshape(-1)
        kv_rows = torch.cat([g.sqrt().expand(H, dn), torch.ones_like(g).expand(H, dv)], 1).reshape(-1)
        scale_rows_((attn.q_proj if attn.q_lora_rank is None else attn.q_b_proj).weight, q_rows)
        scale_rows_(attn.kv_b_proj.weight, kv_rows)
        return
    H, Hkv, D = attn.n_head, attn.n_kv_head, attn.head_dim
    g = gamma.to(attn.q_proj.weight.dtype).view(Hkv, H // Hkv)
    k_scale = g.min(dim=1).values.sqrt()                                    # (Hkv,)
    q_scale = (g / k_scale[:, None]).reshape(H)                             # (H,)
    for proj, scale in ((attn.q_proj, q_scale), (attn.k_proj, k_scale)):
        rows = scale.repeat_interleave(D)                                   # head h: rows hD..hD+D-1
        scale_rows_(proj.weight, rows)
        if proj.bias is not None:
            scale_rows_(proj.bias, rows)


@torch.no_grad()
def max_logits(model, reset=True, reduce=None):
    """(n_attention_layers, n_head) largest attention logits recorded since the last reset
    (reduced across ranks by `reduce`, e.g. an all-reduce with MAX), or None if not tracked."""
    mods = model.attention_modules()
    if not mods or not mods[0].track_max_logit:
        return None
    m = torch.stack([a.max_logit for a in mods])
    if reduce is not None:
        reduce(m)
    if reset:
        for a in mods:
            a.max_logit.fill_(float('-inf'))
    return m


@torch.no_grad()
def qk_clip(model, tau=100.0, reduce=None):
    """QK-Clip, after optimizer.step(): for every head whose recorded max logit S exceeded tau,
    gamma = tau / S and the head's query/key weights are rescaled so its logits shrink by gamma
    (rescale_qk_). Under DDP pass reduce= an all-reduce(MAX) so every
    replica clips identically. Returns (max logits before clipping, number of heads clipped as a
    0-d tensor, so the step needs no host sync)."""
    m = max_logits(model, reset=True, reduce=reduce)
    if m is None:
        raise RuntimeError('qk_clip needs model.track_max_logits(True) before the forward passes')
    gamma = torch.where(m > tau, tau / m, torch.ones_like(m))
    for a, g in zip(model.attention_modules(), gamma):
        rescale_qk_(a, g)
    return m, (m > tau).sum()


# --- the learning-rate schedule ----------------------------------------------------------------

LR_SCHEDULES = ('cosine', 'wsd', 'constant')


def lr_at(step, lr, min_lr, warmup_iters, decay_iters, schedule='cosine', decay_frac=0.2):
    """Learning rate at `step` (0-based).
    warmup: linear from lr/(warmup+1) to lr over `warmup_iters` steps, then
    cosine:   min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * t)),  t = progress in [0, 1] to decay_iters
    wsd:      lr (stable) until the last `decay_frac` of decay_iters, then linear down to min_lr
    constant: lr (decay_iters and min_lr unused)
    cosine and wsd: after decay_iters the rate stays at min_lr, also when the warmup would go on
    past it (a warmup longer than the run: the rate never reaches lr)."""
    if schedule == 'constant':
        return lr * (step + 1) / (warmup_iters + 1) if step < warmup_iters else lr
    if step >= decay_iters:
        return min_lr
    if step < warmup_iters:
        return lr * (step + 1) / (warmup_iters + 1)
    if schedule == 'cosine':
        t = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == 'wsd':
        decay_start = max(warmup_iters, int(decay_iters * (1 - decay_frac)))
        if step < decay_start:
            return lr
        t = (step - decay_start) / max(1, decay_iters - decay_start)
        return lr + (min_lr - lr) * t
    raise ValueError(f"lr_schedule='{schedule}'; valid: {', '.join(LR_SCHEDULES)}")
