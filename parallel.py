"""Expert parallelism (EP) for the MoE layers of model.py, over a torch.distributed process group.

With N ranks in the group, rank r keeps routed experts [r E/N, (r+1) E/N) of every MoE layer; the
rest of the model (attention, router, shared experts, embeddings, ...) is replicated, as in data
parallelism. A forward step on each rank:
    route its own tokens (the router is replicated, so every rank sees all E experts' scores)
    -> all_to_all: each (token, chosen expert) pair's hidden state goes to the expert's owner
    -> the owner runs its local experts on what it received
    -> all_to_all back: each pair's expert output returns to the token's rank
    -> combine there: y_t = sum_k g_tk FFN_e(x_t) (+ the shared experts), as MoE.forward does.
Both exchanges are differentiable (AllToAll: its backward is the reverse exchange), so the
backward sends each pair's output gradient to the owner and the input gradient back.

The training step around it (EP size == world size here, so no expert has a replica):
    loss = model(x_local, y_local)[1]; loss.backward()          # the mean over this rank's tokens
    sync_gradients(model)          # replicated grads averaged; expert grads / N (see there)
    clip_grad_norm(model, 1.0)     # optional: the global norm, expert slices from every rank
    optimizer.step()
    update_router_bias(model)      # expert loads summed over ranks: the same bias step everywhere
training.Run does exactly this when train.py runs with expert_parallel=N under torchrun, and saves
checkpoints in the single-process layout (full_state_dict, full_optimizer_state).
Every rank must build the same model (same seed) or load the same full state dict
(load_full_state_dict), and every forward and backward must run on all ranks together: the
exchanges are collectives. model.py stays the single-process reference.
"""

import torch
import torch.distributed as dist
import torch.nn as nn

import fast_paths
from model import MoE

EXPERT_WEIGHTS = ('gate_proj', 'up_proj', 'down_proj')     # Experts' (E, ., .) parameter stacks


class AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single over rows: this rank's rows x[sum(send[:j]):sum(send[:j+1])]
    go to rank j; rank i's rows arrive in block i of the output (recv[i] rows). The backward is
    the same exchange reversed: each row's gradient goes back to where the row came from."""

    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_out.new_empty((sum(ctx.send),) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(grad_x, grad_out.contiguous(), output_split_sizes=ctx.send,
                               input_split_sizes=ctx.recv, group=ctx.group)
        return grad_x, None, None, None


class ExpertParallelMoE(MoE):
    """An MoE whose `experts` hold this rank's E/N experts only (made by shard_experts, not built
    directly). The router, the shared experts, the token counts and the balance loss are those of
    MoE.forward, computed on this rank's tokens; the routed experts run where they live
    (routed_experts)."""

    def routed_experts(self, flat, weights, indices):
        """MoE.routed_experts across the ranks: this rank's (token, expert) pairs go to the ranks
        that hold their experts and the outputs come back. The rest of MoE.forward (the replicated
        router, the load count, summed over ranks later, and the balance loss, on this rank's
        tokens: exact per sequence with seq_aux, per rank's batch without) runs as it is."""
        K = indices.size(1)
        # the N*K (token, expert) pairs, sorted by expert; experts are contiguous per rank, so
        # this also sorts them by owner: block j of the sorted pairs goes to rank j
        expert = indices.reshape(-1)
        order = expert.argsort(stable=True)
        token = order // K                                                    # pair p = (token p // K, slot p % K)
        owner = expert[order] // self.E_local
        send = torch.bincount(owner, minlength=self.ep_size)                  # pairs for each rank
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.ep_group)               # exchange the counts first
        send, recv = send.tolist(), recv.tolist()                             # the splits (a host sync)
        local_id = expert[order] - owner * self.E_local                       # expert index on its owner
        recv_id = local_id.new_empty(sum(recv))
        dist.all_to_all_single(recv_id, local_id, output_split_sizes=recv, input_split_sizes=send,
                               group=self.ep_group)
        # hidden states out, expert outputs back; the routing weights g stay here: they multiply
        # the returned outputs, so the router's gradient needs no exchange
        recv_x = AllToAll.apply(flat[token], send, recv, self.ep_group)       # (M, C) for my experts
        recv_y = self.local_experts(recv_x, recv_id)                          # (M, C) unweighted FFN_e(x)
        y_pairs = AllToAll.apply(recv_y, recv, send, self.ep_group)           # (N*K, C) in `order`
        g = weights.reshape(-1)[order, None].to(flat.dtype)                   # g of each sorted pair
        # y_t = sum_k g_tk FFN_e(x_t), summed in the tokens' dtype (the experts' output may be
        # autocast's bf16)
        return torch.zeros_like(flat).index_add_(0, token, y_pairs.to(flat.dtype) * g)

    def local_experts(self, x, ids):
        """FFN_e(x_m) for received rows m, e = ids[m] a local expert: each row as a token with one
        chosen expert of weight 1, through the grouped GEMMs where they run, else the loop."""
        if x.size(0) == 0:
            return x * 0          # nothing came, but the backward's exchange still needs this rank
        ones = torch.ones(x.size(0), 1, dtype=torch.float32, device=x.device)
        impl = self.impl
        if impl not in ('grouped', 'loop'):   # 'auto' / 'gathered': grouped where it runs
            impl = 'grouped' if fast_paths.grouped_mm_supported(x, self.C, self.I) else 'loop'
        if impl == 'grouped':
            return fast_paths.experts_grouped(self.experts, x, ones, ids[:, None])
        return self.experts(x, ones, ids[:, None])


def expert_parallel_layers(model):
    return [m for m in model.modules() if isinstance(m, ExpertParallelMoE)]


def expert_parameter_names(model):
    """Names (as in model.state_dict()) of the expert stacks that differ between ranks."""
    names = []
    for prefix, m in model.named_modules():
        if isinstance(m, ExpertParallelMoE):
            names += [f'{prefix}.experts.{w}' for w in EXPERT_WEIGHTS]
    return names


def shard_experts(model, group=None):
    """Turn every MoE layer of `model` (in place) into an ExpertParallelMoE over `group` (None:
    the default group): rank r keeps the slice [r E/N, (r+1) E/N) of each expert stack. The model
    must be the same on every rank before this (same seed, or the same loaded state)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    for m in model.modules():
        if type(m) is not MoE:
            continue
        if m.E % size:
            raise ValueError(f'expert parallelism over {size} ranks needs the routed experts ({m.E}) '
                             f'divisible by {size}')
        E_local = m.E // size
        lo = rank * E_local
        for w in EXPERT_WEIGHTS:                                   # this rank's experts only
            setattr(m.experts, w, nn.Parameter(getattr(m.experts, w).detach()[lo:lo + E_local].clone()))
        m.__class__ = ExpertParallelMoE
        m.ep_group, m.ep_size, m.ep_rank, m.E_local = group, size, rank, E_local
    return model


def sync_gradients(model, group=None):
    """After backward, before the optimizer step. Each rank's loss L_r is the mean over its own
    tokens, and the global loss is L = (1/N) sum_r L_r (equal batches per rank). Then
      replicated parameters: dL/dw = (1/N) sum_r dL_r/dw, an all-reduce of the gradients / N;
      expert parameters: the reverse exchange already summed every rank's contribution into the
        owner's gradient, sum_r dL_r/dw, so only the / N is left (no replica to reduce with)."""
    size = dist.get_world_size(group)
    experts = set(expert_parameter_names(model))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:               # unused here: a zero, so that every rank joins the reduce
            p.grad = torch.zeros_like(p)
        if name not in experts:
            dist.all_reduce(p.grad, group=group)
        p.grad.div_(size)


@torch.no_grad()
def clip_grad_norm(model, max_norm, group=None):
    """Clip the gradients (after sync_gradients) to a global norm of max_norm; returns the norm
    before clipping, that of the single-process model:
        |g|^2 = sum over replicated parameters (the same on every rank, counted once)
              + sum over ranks of this rank's expert slices (all-reduced)."""
    experts = set(expert_parameter_names(model))
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    shared = sum((g.float().square().sum() for n, g in grads.items() if n not in experts), torch.zeros(()))
    local = sum((g.float().square().sum() for n, g in grads.items() if n in experts), torch.zeros(()))
    dist.all_reduce(local, group=group)
    norm = (shared + local).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)          # torch's clip_grad_norm_ rule
    for g in grads.values():
        g.mul_(scale.to(g.dtype))
    return norm


def update_router_bias(model, group=None):
    """GPT.update_router_bias with each MoE layer's token counts summed over the ranks: every rank
    moves its replicated router biases by the same sign(mean load - load_i) step."""
    return model.update_router_bias(reduce=lambda t: dist.all_reduce(t, group=group))


@torch.no_grad()
def full_state_dict(model, group=None):
    """The single-process state dict of an expert-parallel model: each expert stack gathered from
    all ranks into the full (E, ., .) tensor (rank j's experts at rows [j E/N, (j+1) E/N)). Every
    rank joins; every rank gets it (rank 0 saves it: it loads in one process as a plain GPT)."""
    size = dist.get_world_size(group)
    experts = set(expert_parameter_names(model))
    state = {}
    for k, v in model.state_dict().items():
        if k in experts:
            parts = [torch.empty_like(v) for _ in range(size)]
            dist.all_gather(parts, v.contiguous(), group=group)
            v = torch.cat(parts, 0)
        state[k] = v.detach().clone()
    return state


@torch.no_grad()
def load_full_state_dict(model, state, group=None):
    """Load a single-process state dict into an expert-parallel model: each rank takes its slice
    of every expert stack, and everything else whole."""
    experts = set(expert_parameter_names(model))
    layers = {f'{prefix}.experts.': m for prefix, m in model.named_modules() if isinstance(m, ExpertParallelMoE)}
    local = {}
    for k, v in state.items():
        if k in experts:
            m = layers[k.rsplit('.', 1)[0] + '.']
            lo = m.ep_rank * m.E_local
            v = v[lo:lo + m.E_local]
        local[k] = v
    model.load_state_dict(local)


def expert_state_owners(model, optimizer):
    """{index of a parameter in optimizer.state_dict()['state']: the ExpertParallelMoE whose
    expert stack it is}, for every expert stack the optimizer holds."""
    owner = {id(getattr(m.experts, w)): m for m in expert_parallel_layers(model) for w in EXPERT_WEIGHTS}
    params = [p for g in optimizer.param_groups for p in g['params']]
    return {i: owner[id(p)] for i, p in enumerate(params) if id(p) in owner}


@torch.no_grad()
def full_optimizer_state(model, optimizer, group=None):
    """optimizer.state_dict() in the single-process layout: the state of each expert stack
    (AdamW's moments, Muon's momentum: tensors shaped like the stack, (E/N, ., .)) gathered from
    every rank into (E, ., .). Every rank joins; the optimizer itself is left as it is."""
    state = optimizer.state_dict()
    state = {'state': {i: dict(s) for i, s in state['state'].items()}, 'param_groups': state['param_groups']}
    for i, m in expert_state_owners(model, optimizer).items():
        for k, v in state['state'].get(i, {}).items():
            if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == m.E_local:
                parts = [torch.empty_like(v) for _ in range(m.ep_size)]
                dist.all_gather(parts, v.contiguous(), group=group)
                state['state'][i][k] = torch.cat(parts, 0)
    return state


def local_optimizer_state(model, optimizer, state):
    """The inverse of full_optimizer_state: a single-process optimizer state with this rank's
    slice [r E/N, (r+1) E/N) of each expert stack's state, for optimizer.load_state_dict."""
    state = {'state': {i: dict(s) for i, s in state['state'].items()}, 'param_groups': state['param_groups']}
    for i, m in expert_state_owners(model, optimizer).items():
        for k, v in state['state'].get(i, {}).items():
            if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == m.E:
                lo = m.ep_rank * m.E_local
                state['state'][i][k] = v[lo:lo + m.E_local].clone()
    return state

