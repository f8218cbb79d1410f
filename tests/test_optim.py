"""Muon, MuonClip's QK-Clip, and the parameter split between Muon and AdamW."""

import math

import pytest
import torch

from model import GPT, ModelConfig
from optim import Muon, build_optimizer, is_muon_param, max_logits, newton_schulz, qk_clip

MLA = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, attention='mla', pos_emb='rope',
           norm='rmsnorm', mlp='swiglu', bias=False, tie_word_embeddings=False, kv_lora_rank=8,
           q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
           n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, n_shared_experts=1,
           scoring_func='sigmoid', first_k_dense_replace=1)
GQA = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, pos_emb='rope',
           norm='rmsnorm', mlp='swiglu', bias=True)


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return GPT(ModelConfig(**cfg))


# --- Newton-Schulz -------------------------------------------------------------------------

@pytest.mark.parametrize('shape', [(64, 16), (16, 64), (128, 512), (512, 128), (8, 96, 40)])
def test_newton_schulz_singular_values_near_one(shape):
    torch.manual_seed(0)
    s = torch.linalg.svdvals(newton_schulz(torch.randn(shape)).float())
    # the band of 5 quintic steps in bf16 for Gaussian matrices (measured: 0.67 .. 1.14)
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())


def test_newton_schulz_square_and_scale_invariance():
    torch.manual_seed(0)
    G = torch.randn(32, 32)
    s = torch.linalg.svdvals(newton_schulz(G).float())
    assert s.max() < 1.25 and s.median() > 0.6     # tiny singular values of a square matrix stay small
    torch.testing.assert_close(newton_schulz(1000 * G).float(), newton_schulz(G).float(), atol=5e-2, rtol=0)  # bf16


# --- Muon against a plain reference ----------------------------------------------------------

def reference_ns(G, steps=5):
    """Newton-Schulz written out for one matrix: bf16, transposed when tall."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16()
    if G.size(0) > G.size(1):
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)      # b A + c A A, rounded once (as optim.py does)
        X = torch.addmm(X, B, X, beta=a)               # a X + B X
    return X.T if G.size(0) > G.size(1) else X


def test_muon_equals_a_plain_reference():
    cfg = dict(MLA)
    model, ref = build(cfg), build(cfg)
    lr, wd, mu = 0.02, 0.1, 0.95
    opt = build_optimizer(model, 'muon', lr, wd)
    names = [n for n, p in ref.named_parameters() if is_muon_param(n, p)]
    ref_params = dict(ref.named_parameters())
    other = [p for n, p in ref.named_parameters() if n not in names]
    ref_adam = torch.optim.AdamW([{'params': [p for p in other if p.dim() >= 2], 'weight_decay': wd},
                                  {'params': [p for p in other if p.dim() < 2], 'weight_decay': 0.0}],
                                 lr=lr, betas=(0.9, 0.95), eps=1e-8)
    bufs = {n: torch.zeros_like(ref_params[n]) for n in names}
    for step in range(3):
        x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(step))
        _, loss = model(x, x)
        loss.backward()
        # both optimizers get the same gradients: otherwise float rounding differences of 1e-9
        # between the two update orders change the next gradient, and bf16 Newton-Schulz turns
        # that into 1e-3 within three steps (a test of the optimizer, not of bf16 chaos)
        for (_, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            q.grad = p.grad.clone()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():                         # the reference, one matrix at a time
            for n in names:
                p, g = ref_params[n], ref_params[n].grad
                bufs[n] = mu * bufs[n] + g
                u = g + mu * bufs[n]
                mats = u.reshape(-1, *u.shape[-2:])
                o = torch.stack([reference_ns(m_) for m_ in mats]).reshape(u.shape).float()
                scale = 0.2 * math.sqrt(max(u.shape[-2], u.shape[-1]))
                p.mul_(1 - lr * wd).add_(-lr * scale * o)
        ref_adam.step()
        ref.zero_grad()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=n)


def test_parameter_assignment():
    model = build(dict(MLA, tie_word_embeddings=True, mtp_depth=1))
    opt = build_optimizer(model, 'muonclip')
    assert isinstance(opt, Muon)
    ids = {id(p): n for n, p in model.named_parameters()}
    muon = {ids[id(p)] for g in opt.param_groups if g['use_muon'] for p in g['params']}
    adam = {ids[id(p)] for g in opt.param_groups if not g['use_muon'] for p in g['params']}
    assert 'tok_emb.weight' in adam                            # embedding (= tied head)
    assert all(n in muon for n in ['layers.0.attn.q_a_proj.weight', 'layers.0.attn.kv_b_proj.weight',
                                   'layers.0.mlp.gate_proj.weight', 'layers.1.mlp.experts.down_proj',
                                   'layers.1.mlp.router.weight', 'mtp.0.eh_proj.weight'])
    assert all(n in adam for n in ['layers.0.attn_norm.weight', 'layers.0.attn.kv_a_layernorm.weight',
                                   'norm.weight', 'mtp.0.enorm.weight'])
    assert not muon & adam and muon | adam == set(ids.values())
    assert 'layers.1.mlp.router.e_score_correction_bias' not in ids     # a buffer, not trained
    untied = build(MLA)
    opt = build_optimizer(untied, 'muon')
    adam = {n for n, p in untied.named_parameters()
            if any(p is q for g in opt.param_groups if not g['use_muon'] for q in g['params'])}
    assert 'lm_head.weight' in adam
    with pytest.raises(ValueError, match='valid: adamw, muon, muonclip'):
        build_optimizer(untied, 'sgd')


@pytest.mark.parametrize('name', ['adamw', 'muonclip'])
def test_lr_scale_gives_some_parameters_their_own_rate_under_the_schedule(name):
    """lr_scale (PPO's value_learning_rate): those parameters' groups start at learning_rate x their
    multiplier, and the schedule (optim.set_lr) scales every group alike; the rest keep learning_rate."""
    from optim import set_lr
    policy, value = build(MLA), build(GQA, seed=1)
    both = torch.nn.ModuleList([policy, value])
    opt = build_optimizer(both, name, learning_rate=1e-3, lr_scale={id(p): 10.0 for p in value.parameters()})
    rate = {id(p): g['lr'] for g in opt.param_groups for p in g['params']}
    assert all(rate[id(p)] == pytest.approx(1e-3) for p in policy.parameters())
    assert all(rate[id(p)] == pytest.approx(1e-2) for p in value.parameters())
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(both.parameters()))
    set_lr(opt, 0.5)                                        # halfway down a schedule
    rate = {id(p): g['lr'] for g in opt.param_groups for p in g['params']}
    assert rate[id(next(value.parameters()))] == pytest.approx(5e-3)
    assert rate[id(next(policy.parameters()))] == pytest.approx(5e-4)


# --- QK-Clip -------------------------------------------------------------------------------

def head_max_logits(model, x):
    model.train()
    model.track_max_logits(True)
    max_logits(model)                                       # reset
    with torch.no_grad():
        model(x, x)
    return max_logits(model, reset=False).clone()


@pytest.mark.parametrize('cfg', [MLA, GQA, dict(GQA, n_kv_head=None)], ids=['mla', 'gqa', 'mha'])
def test_qk_clip_brings_a_hot_head_under_tau_and_leaves_the_rest(cfg):
    model = build(cfg)
    attn = model.layers[1].attn
    with torch.no_grad():                                   # make head 2 of layer 1 very hot
        w = (attn.q_b_proj if cfg is MLA else attn.q_proj).weight
        d = w.size(0) // 4
        w[2 * d:3 * d] *= 3000.0
    x = torch.randint(0, 64, (4, 16))
    before = head_max_logits(model, x)
    tau = 20.0
    assert before[1, 2] > tau and (before.flatten().sort().values[-2] < tau)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    m, n_clipped = qk_clip(model, tau)
    assert int(n_clipped) == 1 and torch.equal(m, before)
    after = head_max_logits(model, x)
    assert after[1, 2] == pytest.approx(tau, rel=1e-3)      # exactly tau on the same batch
    mask = torch.ones_like(before, dtype=torch.bool)
    mask[1, 2] = False
    torch.testing.assert_close(after[mask], before[mask], rtol=1e-5, atol=1e-5)   # others untouched
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, weights[n])}
    if cfg is MLA:
        assert changed == {'layers.1.attn.q_b_proj.weight', 'layers.1.attn.kv_b_proj.weight'}
        kv = model.layers[1].attn.kv_b_proj.weight.view(4, 16, -1)          # (H, nope + v, r)
        kv0 = weights['layers.1.attn.kv_b_proj.weight'].view(4, 16, -1)
        assert torch.equal(kv[:, 8:], kv0[:, 8:]) and torch.equal(kv[[0, 1, 3]], kv0[[0, 1, 3]])
    else:
        prefix = 'layers.1.attn.'
        assert changed <= {prefix + s for s in ('q_proj.weight', 'q_proj.bias', 'k_proj.weight', 'k_proj.bias')}
        q, q0 = model.layers[1].attn.q_proj.weight, weights[prefix + 'q_proj.weight']
        other_group = [0, 1] if cfg.get('n_kv_head') else [0, 1, 3]
        d = q.size(0) // 4
        for h in other_group:
            assert torch.equal(q[h * d:(h + 1) * d], q0[h * d:(h + 1) * d])


def test_qk_clip_needs_tracking():
    with pytest.raises(RuntimeError, match='track_max_logits'):
        qk_clip(build(GQA), 100.0)


@pytest.mark.parametrize('max_norm', [0.5, 1e4])      # clipping every step / never
def test_clipping_left_to_fused_adamw_equals_clip_grad_norm(max_norm):
    """optim.clip_grad_norm_ with a fused AdamW hands the scaling to the optimizer's kernel
    (grad_scale); the weights and the returned norms are those of torch's clip_grad_norm_ followed
    by the same optimizer."""
    from optim import clip_grad_norm_
    torch.manual_seed(0)
    shapes = [(16, 8), (8,), (4, 4, 3)]
    start = [torch.randn(s) for s in shapes]
    runs = {}
    for deferred in (True, False):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)
        g = torch.Generator().manual_seed(1)
        norms = []
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g) * 3
            norms.append(float(clip_grad_norm_(opt, params, max_norm, defer_to_optimizer=deferred)))
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs[deferred] = (params, norms)
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-6)
    assert max(runs[True][1]) > 0.5 * 4                     # (so with max_norm 0.5 every step clips)
    for a, b in zip(runs[True][0], runs[False][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_clip_grad_norm_without_a_fused_optimizer_scales_the_gradients():
    from optim import clip_grad_norm_
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    opt = torch.optim.SGD([p], lr=0.1)
    assert float(clip_grad_norm_(opt, [p], 1.0)) == pytest.approx(5.0)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8, 0.0]), rtol=1e-5, atol=1e-6)
