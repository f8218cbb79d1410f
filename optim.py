"""
Optimizers for every training stage: AdamW with decoupled weight decay on the right parameters.

build_optimizer(model, name, ...) returns a torch optimizer whose param groups carry 'base_lr';
set_lr(optimizer, lr_now / learning_rate) applies the schedule to every group.
"""

import inspect

import torch

OPTIMIZERS = ('adamw',)


def adamw_param_groups(params, weight_decay):
    """Decay the matrices (weights of linear layers, embeddings); not biases or norm gains.
    Decoupled weight decay (Loshchilov & Hutter 2019): theta <- theta - lr * wd * theta."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]


def build_optimizer(model, name='adamw', learning_rate=3e-4, weight_decay=0.1, betas=(0.9, 0.95),
                    eps=1e-8, device_type='cpu'):
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer='{name}'; valid: {', '.join(OPTIMIZERS)}")
    params = [p for p in model.parameters() if p.requires_grad]
    groups = adamw_param_groups(params, weight_decay)
    extra = {}
    if device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters:
        extra['fused'] = True                       # one kernel for all parameters
    opt = torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(betas), eps=eps, **extra)
    for g in opt.param_groups:
        g['base_lr'] = learning_rate
    return opt


def set_lr(optimizer, scale):
    """lr of every group = its base_lr * scale (the schedule's lr_now / learning_rate)."""
    for g in optimizer.param_groups:
        g['lr'] = g['base_lr'] * scale
