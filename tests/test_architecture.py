"""The DeepSeek-V3 / Kimi-K2 parts of model.py: MLA, RoPE scalings, sliding window + sinks,
MoE routing and balancing, multi-token prediction, presets."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fast_paths
from generate import generate, graph_capturable, new_cache
from fast_paths import GatherRows, expert_counts, top_k_indices
from model import (GPT, Experts, ModelConfig, MoE, RotaryEmbedding, ScalarModel, attention_mask,
                   balance_loss, count_params, softmax_scale, through_last)

MLA = dict(vocab_size=64, block_size=48, n_layer=3, n_head=4, n_embd=32, attention='mla', pos_emb='rope',
           norm='rmsnorm', mlp='swiglu', bias=False, tie_word_embeddings=False, kv_lora_rank=8,
           qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12)
MOE = dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
           scoring_func='sigmoid', routed_scaling_factor=2.5, first_k_dense_replace=1)


def build(*parts, **kw):
    """A model from config dicts merged left to right, then keywords."""
    cfg = {}
    for p in parts + (kw,):
        cfg.update(p)
    torch.manual_seed(0)
    return GPT(ModelConfig(**cfg)).eval()


def greedy_by_recompute(model, idx, n):
    for _ in range(n):
        logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


# --- packed examples ----------------------------------------------------------------------

GPT2 = dict(vocab_size=64, block_size=48, n_layer=2, n_head=4, n_embd=32)          # learned positions


@pytest.mark.parametrize('parts', [(GPT2,), (MLA, MOE), (MLA, dict(sliding_window=4, n_sink_tokens=1)),
                                   (GPT2, dict(pos_emb='rope', n_kv_head=2))], ids=['gpt2', 'mla_moe', 'window', 'gqa'])
def test_packed_examples_are_computed_as_if_each_were_alone(parts):
    """segments (sft.py's packed rows): every example's logits equal those of the example alone in
    its row (positions from its own start, no attention to the examples before it); and the MTP
    loss of packed rows is trained the same way (its modules get the same mask and positions)."""
    model = build(*parts, mtp_depth=1).eval()
    g = torch.Generator().manual_seed(0)
    examples = [torch.randint(0, 64, (n,), generator=g) for n in (7, 12, 5)]
    x = torch.cat(examples)[None]
    segments = torch.cat([torch.full((len(e),), i) for i, e in enumerate(examples)])[None]
    packed = model(x, segments=segments)[0][0]
    start = 0
    for e in examples:
        torch.testing.assert_close(packed[start:start + len(e)], model(e[None])[0][0], atol=1e-5, rtol=1e-4)
        start += len(e)
    assert not torch.allclose(packed, model(x)[0][0], atol=1e-3)          # (plain causal: other logits)
    model.train()                              # the MTP loss, no dropout: one example with the others
    y = torch.full_like(x, -1)                 # masked out equals that example alone
    y[0, 19:23] = x[0, 20:24]
    alone = torch.full((1, 5), -1)
    alone[0, :4] = examples[2][1:]
    model(x, y, segments=segments)
    mtp_packed = model.last_losses['mtp']
    model(examples[2][None], alone)
    torch.testing.assert_close(mtp_packed, model.last_losses['mtp'], atol=1e-5, rtol=1e-4)


# --- Multi-head Latent Attention ---------------------------------------------------------

@pytest.mark.parametrize('q_lora_rank', [None, 16])
def test_mla_absorbed_decode_equals_expanded_attention(q_lora_rank):
    """Also where the latent is wider than the no-RoPE head part (kv_lora_rank 16 against 8), so
    the absorbed attention's softmax scale, 1 / sqrt(qk_nope + qk_rope), is not its width's default,
    and with the query and key weights grown tenfold so that attention is far from uniform (a
    default scale passed the test without both)."""
    model = build(MLA, q_lora_rank=q_lora_rank, kv_lora_rank=16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ('q_proj', 'q_b_proj', 'kv_b_proj')):
                p.mul_(10)
    idx = torch.randint(0, 64, (2, 24))
    full, _ = model(idx)                                   # expanded keys/values, fused attention
    cache = new_cache(model, 2, 24, 'cpu')
    parts = [model(idx[:, :10], cache=cache)[0]]           # absorbed: attention over latents
    parts += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=1e-4)


def test_mla_cached_generation_equals_recomputation():
    model = build(MLA, MOE, q_lora_rank=16)
    idx = torch.randint(0, 64, (3, 6))
    assert torch.equal(generate(model, idx, 30, temperature=0), model.generate(idx, 30, temperature=0))


def test_mla_cache_holds_only_the_latent_and_the_rope_key():
    model = build(MLA)
    cache = new_cache(model, 2, 16, 'cpu')
    model(torch.randint(0, 64, (2, 16)), cache=cache)
    c = model.config
    assert cache.numel_per_token() == {i: c.kv_lora_rank + c.qk_rope_head_dim for i in range(3)}
    # under bf16 autocast both cached parts are bf16: the normed latent does not come back as float32
    cache = new_cache(model, 2, 16, 'cpu')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        model(torch.randint(0, 64, (2, 16)), cache=cache)
    assert {b.dtype for b in cache.buffers.values()} == {torch.bfloat16}
    mha = build(vocab_size=64, n_layer=2, n_head=4, n_embd=32, pos_emb='rope', n_kv_head=2)
    cache = new_cache(mha, 1, 8, 'cpu')
    mha(torch.randint(0, 64, (1, 8)), cache=cache)
    assert cache.numel_per_token() == {0: 2 * 2 * 8, 1: 2 * 2 * 8}    # k and v, 2 heads of 8


# --- RoPE scalings, each against the formula written out here ------------------------------

def reference_inv_freq(kind, dim, base, s, seq_len=None):
    i = torch.arange(0, dim, 2, dtype=torch.float64)
    inv = base ** (-i / dim)
    if kind == 'linear':
        return inv / s['factor']
    if kind == 'dynamic':                                   # NTK-aware base, grown with length
        L0, f = s['original_max_position_embeddings'], s['factor']
        L = max(seq_len, L0)
        new_base = base * (f * L / L0 - (f - 1)) ** (dim / (dim - 2))
        return new_base ** (-i / dim)
    # YaRN: wavelength lambda_i = 2 pi / theta_i; r_i = L0 / lambda_i rotations over the
    # original context; r > beta_fast keeps theta, r < beta_slow divides it by the factor,
    # linear in the dimension index between the two (bounds floored / ceiled, as transformers).
    L0, f = s['original_max_position_embeddings'], s['factor']
    d_of = lambda r: dim * math.log(L0 / (r * 2 * math.pi)) / (2 * math.log(base))   # noqa: E731
    lo, hi = max(math.floor(d_of(s['beta_fast'])), 0), min(math.ceil(d_of(s['beta_slow'])), dim - 1)
    out = []
    for j, th in enumerate(inv.tolist()):
        ramp = min(max((j - lo) / (hi - lo), 0.0), 1.0)
        out.append(th * (1 - ramp) + th / f * ramp)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize('kind', ['linear', 'dynamic', 'yarn'])
def test_rope_scalings_match_their_formulas(kind):
    s = {'type': kind, 'factor': 4.0, 'original_max_position_embeddings': 64, 'beta_fast': 32, 'beta_slow': 1,
         'mscale': 1.0, 'mscale_all_dim': 1.0}
    cfg = ModelConfig(n_head=2, n_embd=64, pos_emb='rope', rope_theta=10000.0, rope_scaling=s)
    rope = RotaryEmbedding(32, cfg)
    for seq_len in ((40, 200) if kind == 'dynamic' else (200,)):
        pos = torch.arange(seq_len)
        cos, sin = rope(pos)
        inv = reference_inv_freq(kind, 32, 10000.0, s, seq_len)
        angles = pos.double()[:, None] * inv
        torch.testing.assert_close(cos.double(), angles.cos(), atol=2e-5, rtol=0)
        torch.testing.assert_close(sin.double(), angles.sin(), atol=2e-5, rtol=0)


def test_yarn_attention_temperature():
    # cos/sin scaled by mscale(f, mscale) / mscale(f, mscale_all_dim); the softmax scale by
    # mscale(f, mscale_all_dim)^2, mscale(f, m) = 0.1 m ln f + 1 (DeepSeek-V3's YaRN)
    s = {'type': 'yarn', 'factor': 40.0, 'original_max_position_embeddings': 4096,
         'mscale': 0.8, 'mscale_all_dim': 0.6}
    cfg = ModelConfig(**{**MLA, 'rope_scaling': s})
    m = lambda k: 0.1 * k * math.log(40.0) + 1                             # noqa: E731
    cos, _ = RotaryEmbedding(4, cfg)(torch.zeros(1, dtype=torch.long))
    assert cos[0, 0].item() == pytest.approx(m(0.8) / m(0.6))
    assert softmax_scale(cfg) == pytest.approx((8 + 4) ** -0.5 * m(0.6) ** 2)
    assert softmax_scale(ModelConfig(**MLA)) == pytest.approx(12 ** -0.5)


def test_rope_gives_relative_positions():
    cfg = ModelConfig(n_head=1, n_embd=16, pos_emb='rope')
    rope = RotaryEmbedding(16, cfg)
    from model import apply_rope
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    dots = []
    for shift in (0, 7, 30):
        cq, sq = rope(torch.tensor([5 + shift]))
        ck, sk = rope(torch.tensor([2 + shift]))
        dots.append((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item())
    assert dots[0] == pytest.approx(dots[1], abs=1e-5) == pytest.approx(dots[2], abs=1e-5)


# --- sliding window with attention sinks ---------------------------------------------------

def test_window_mask():
    pos = torch.arange(8)
    m = attention_mask(pos, pos, window=3, n_sink=1)
    assert m[6].tolist() == [True, False, False, False, True, True, True, False]   # sink + 3 latest
    assert not m[2, 3] and m[2].sum() == 3


@pytest.mark.parametrize('attention', ['mha', 'mla'])
def test_sliding_window_equals_full_attention_with_the_mask(attention):
    kw = dict(MLA) if attention == 'mla' else dict(vocab_size=64, n_layer=2, n_head=4, n_embd=32,
                                                   pos_emb='rope')
    model = build(kw, sliding_window=5, n_sink_tokens=2, block_size=64)
    idx = torch.randint(0, 64, (2, 30))
    windowed, _ = model(idx)
    # the same weights with full attention, each attention layer given the explicit mask
    full = build(kw, block_size=64)
    full.load_state_dict(model.state_dict())
    pos = torch.arange(30)
    allowed = attention_mask(pos, pos, 5, 2)
    full.causal_mask = lambda T, device: (allowed, False)
    torch.testing.assert_close(full(idx)[0], windowed, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(build(kw, block_size=64)(idx)[0], windowed, atol=1e-3)


@pytest.mark.parametrize('attention', ['mha', 'mla'])
def test_streaming_generation_far_past_the_window_and_block_size(attention):
    kw = dict(MLA) if attention == 'mla' else dict(vocab_size=64, n_layer=2, n_head=4, n_embd=32,
                                                   pos_emb='rope')
    model = build(kw, sliding_window=6, n_sink_tokens=2, block_size=16)
    idx = torch.randint(0, 64, (2, 5))
    out = generate(model, idx, 45, temperature=0)                 # 50 tokens > block_size 16
    assert torch.equal(out, greedy_by_recompute(model, idx, 45))  # rolling cache == masked full
    cache = new_cache(model, 2, 10_000, 'cpu')                     # memory stays bounded
    model(idx, cache=cache)
    for t in range(300):
        model(out[:, t % 50:t % 50 + 1], cache=cache)
    assert cache.capacity == 8 and all(b.size(1 if attention == 'mla' else 2) == 8
                                       for b in cache.buffers.values())


@pytest.mark.parametrize('attention', ['mha', 'mla'])
def test_a_left_padded_row_keeps_its_sinks_in_the_rolling_cache(attention):
    """Rows of different prompt lengths, left-padded, past the window: each row decodes as it
    does alone (its own first tokens stay as sinks, not the padding's slots)."""
    kw = dict(MLA) if attention == 'mla' else dict(vocab_size=64, n_layer=2, n_head=4, n_embd=32,
                                                   pos_emb='rope')
    model = build(kw, sliding_window=4, n_sink_tokens=2, block_size=64)
    from generate import generate_tokens, pad_prompts
    prompts = [[5, 9, 11, 3, 7, 2, 8], [6, 1, 4]]
    idx, mask = pad_prompts(prompts)
    together = torch.stack(list(generate_tokens(model, idx, 20, temperature=0, prompt_mask=mask)), 1)
    for b, p in enumerate(prompts):
        alone = greedy_by_recompute(model, torch.tensor([p]), 20)[0, len(p):]
        assert torch.equal(together[b], alone), b


def test_a_window_with_learned_positions_generates_past_block_size():
    """Learned positions cannot go past block_size: no rolling cache (the window is the mask's),
    and generation restarts from the latest tokens as without a window; static steps agree."""
    model = build(vocab_size=64, n_layer=2, n_head=2, n_embd=16, pos_emb='learned', sliding_window=4,
                  n_sink_tokens=1, block_size=40)
    idx = torch.randint(0, 64, (2, 7))
    out = generate(model, idx, 45, temperature=0)
    assert out.shape == (2, 52) and torch.equal(out, generate(model, idx, 45, temperature=0, cuda_graph=True))
    assert torch.equal(out[:, :40], greedy_by_recompute(model, idx, 33))   # before the first restart


def test_rolling_cache_chunk_longer_than_the_window():
    model = build(vocab_size=64, n_layer=2, n_head=2, n_embd=16, pos_emb='rope', sliding_window=4,
                  n_sink_tokens=1, block_size=64)
    idx = torch.randint(0, 64, (1, 30))
    full, _ = model(idx)
    cache = new_cache(model, 1, 30, 'cpu')
    parts = [model(idx[:, :13], cache=cache)[0], model(idx[:, 13:14], cache=cache)[0],
             model(idx[:, 14:30], cache=cache)[0]]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


# --- mixture of experts --------------------------------------------------------------------

def moe_layer(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**MLA, **MOE, **kw})
    return MoE(cfg).train(), cfg


def test_deepseek_routing_matches_the_rule():
    moe, cfg = moe_layer(n_group=4, topk_group=2, num_experts_per_tok=3)
    torch.nn.init.normal_(moe.router.weight)
    moe.router.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(50, 32)
    w, idx, scores = moe.router(x)
    s = torch.sigmoid(x @ moe.router.weight.t())
    b = moe.router.e_score_correction_bias
    for t in range(50):
        choice = (s[t] + b).view(4, 2)
        groups = choice.sum(-1).topk(2).indices.tolist()         # 2 experts per group: top-2 = all
        allowed = [g * 2 + j for g in groups for j in range(2)]
        ranked = sorted(allowed, key=lambda e: -(s[t, e] + b[e]).item())[:3]
        assert sorted(idx[t].tolist()) == sorted(ranked)
        g = s[t, idx[t]]
        torch.testing.assert_close(w[t], 2.5 * g / g.sum())      # weights from s, not s + b


def test_group_limited_routing_scores_a_group_by_its_two_best_sigmoid_or_its_best_softmax_score():
    """DeepSeek-V3 (sigmoid) scores a group by the sum of its 2 best biased scores, DeepSeek-V2
    (softmax) by its best one: with 4 experts a group, the two rules pick other groups."""
    x = torch.randn(400, 32)
    for func in ('sigmoid', 'softmax'):
        moe, cfg = moe_layer(n_group=2, topk_group=1, num_experts_per_tok=2, scoring_func=func)
        torch.nn.init.normal_(moe.router.weight)
        moe.router.e_score_correction_bias.normal_(0, 0.1)
        _, idx, scores = moe.router(x)
        choice = (scores + moe.router.e_score_correction_bias).view(400, 2, 4)
        group = choice.topk(2, -1).values.sum(-1) if func == 'sigmoid' else choice.amax(-1)
        other = choice.amax(-1) if func == 'sigmoid' else choice.topk(2, -1).values.sum(-1)
        assert (group.argmax(-1) != other.argmax(-1)).any()        # the rules differ on these tokens
        best = group.argmax(-1)
        assert ((idx // 4) == best[:, None]).all()                 # every choice from the best group
        want = choice.gather(1, best[:, None, None].expand(-1, 1, 4))[:, 0].topk(2, -1).indices + 4 * best[:, None]
        assert torch.equal(idx.sort(-1).values, want.sort(-1).values)


def test_router_scores_and_weights_stay_float32_under_autocast():
    """Under bf16 autocast the logits' product is bf16 (as transformers' DeepseekV3's), but the
    sigmoid, the choice and the weights are float32: the same as the float32 rule applied to the
    bf16-rounded logits, not scores rounded to bf16 (steps of 2^-8 near 1, coarser than the
    balancing bias's steps of 0.001)."""
    moe, cfg = moe_layer()
    torch.nn.init.normal_(moe.router.weight)
    moe.router.e_score_correction_bias.normal_(0, 0.01)
    x = torch.randn(64, 32)
    with torch.autocast('cpu', torch.bfloat16):
        w, idx, scores = moe.router(x)
    assert w.dtype == scores.dtype == torch.float32
    logits = (x.bfloat16() @ moe.router.weight.bfloat16().t()).float()
    s = torch.sigmoid(logits)
    torch.testing.assert_close(scores, s)
    want = (s + moe.router.e_score_correction_bias).topk(cfg.num_experts_per_tok, -1).indices
    assert torch.equal(idx, want)
    g = s.gather(1, idx)
    torch.testing.assert_close(w, cfg.routed_scaling_factor * g / g.sum(-1, keepdim=True))


def test_top_k_by_argmax_rounds_equals_topk():
    """The GPU's router selection (K rounds of argmax) picks what torch.topk picks, in its order,
    with masked (-inf) experts of group-limited routing and whole rows of ties."""
    torch.manual_seed(0)
    choice = torch.randn(300, 64)
    choice[:50, ::3] = float('-inf')                          # experts outside the kept groups
    got = top_k_indices(choice, 4, by_argmax=True)
    assert torch.equal(got, choice.topk(4, dim=-1).indices)
    ties = torch.zeros(3, 8)
    assert top_k_indices(ties, 3, by_argmax=True).tolist() == [[0, 1, 2]] * 3
    assert not choice.requires_grad and top_k_indices(choice.requires_grad_(), 2).shape == (300, 2)


def test_softmax_routing_is_mixtral():
    moe, _ = moe_layer(scoring_func='softmax', routed_scaling_factor=1.0)
    x = torch.randn(20, 32)
    w, idx, _ = moe.router(x)
    logits = x @ moe.router.weight.t()
    top = logits.topk(2)
    torch.testing.assert_close(w, top.values.softmax(-1))       # softmax over the top-K logits
    assert torch.equal(idx, top.indices)


def test_top1_routing_with_normalised_weights_warns_that_the_router_cannot_learn():
    # K = 1 and norm_topk_prob: the one weight is s / s = 1, so no gradient reaches the router
    with pytest.warns(UserWarning, match='router gets no gradient'):
        moe, cfg = moe_layer(num_experts_per_tok=1)
    x = torch.randn(20, 32, requires_grad=True)
    w, _, _ = moe.router(x)
    assert torch.equal(w, torch.full_like(w, cfg.routed_scaling_factor))     # 1 x the scaling factor
    upstream = torch.randn_like(w)
    (w * upstream).sum().backward()
    stuck = moe.router.weight.grad.abs().max()        # s / (s + 1e-20): rounding only
    with warnings.catch_warnings():                   # the fix it names: the weight is the score
        warnings.simplefilter('error')
        moe, _ = moe_layer(num_experts_per_tok=1, norm_topk_prob=False)
    w, _, _ = moe.router(x)
    (w * upstream).sum().backward()
    assert stuck < 1e-5 * moe.router.weight.grad.abs().max()


def test_bias_moves_toward_balance():
    model = build(MLA, MOE, bias_update_speed=0.01)
    model.train()
    moe = model.moe_layers()[0]
    moe.tokens_per_expert.copy_(torch.tensor([10., 0, 0, 0, 0, 0, 0, 6]))
    loads = model.update_router_bias()
    b = moe.router.e_score_correction_bias
    assert b[0] == pytest.approx(-0.01) and b[1] == pytest.approx(0.01) and b[7] == pytest.approx(-0.01)
    assert loads[0].tolist() == [10, 0, 0, 0, 0, 0, 0, 6] and moe.tokens_per_expert.sum() == 0
    x = torch.randint(0, 64, (2, 16))
    model(x, x)
    assert all(m.tokens_per_expert.sum() == 2 * 16 * 2 for m in model.moe_layers())   # N * K


def test_right_padding_is_not_counted_as_expert_load():
    """A right-padded batch (reward, DPO, PPO, GRPO) with counted=through_last(scored positions)
    adds the same expert load as its rows run alone without their padding: under causal attention
    the real tokens route the same way, and the padding counts for nothing. The scalar model's
    score() counts through each row's last real token."""
    model = build(MLA, MOE).train()
    x = torch.randint(0, 64, (2, 16))
    targets = x.clone()
    targets[1, 9:] = -1                                     # row 1: 9 real tokens, then padding
    counted = through_last(targets >= 0)
    assert counted.sum(1).tolist() == [16, 9]

    def loads(*batches, **kw):
        for m in model.moe_layers():
            m.tokens_per_expert.zero_()
        for b in batches:
            model(b, **kw)
        return torch.stack([m.tokens_per_expert.clone() for m in model.moe_layers()])

    padded = loads(x, counted=counted)
    assert torch.equal(padded, loads(x[:1], x[1:, :9]))
    assert padded.sum(1).tolist() == [(16 + 9) * 2] * 2                      # tokens x K per layer
    assert loads(x).sum(1).tolist() == [32 * 2] * 2                           # without counted: all
    torch.manual_seed(0)
    scorer = ScalarModel(ModelConfig(**MLA, **MOE)).train()
    scorer(x, last=torch.tensor([15, 8]))
    assert [int(m.tokens_per_expert.sum()) for m in scorer.moe_layers()] == [(16 + 9) * 2] * 2


def test_expert_counts_equal_bincount_and_leave_empty_experts_at_zero():
    """expert_counts (a sum over a one-hot comparison, which torch.compile makes one reduction) is
    the histogram of the chosen experts, experts no token chose included."""
    torch.manual_seed(0)
    indices = torch.randint(0, 12, (50, 3))                          # experts 12..15 never chosen
    counts = expert_counts(indices, 16)
    assert counts.dtype == torch.int32
    assert torch.equal(counts.long(), torch.bincount(indices.reshape(-1), minlength=16))
    assert counts[12:].eq(0).all() and counts.sum() == 150


def test_balance_loss():
    E, K = 4, 1
    # uniform scores and perfectly even routing -> 1
    scores = torch.full((8, E), 0.5)
    idx = torch.arange(8)[:, None] % E
    assert balance_loss(scores, idx, K, 1).item() == pytest.approx(1.0)
    # everything to expert 0 with all affinity there -> E
    scores = torch.tensor([[1.0, 1e-9, 1e-9, 1e-9]]).repeat(8, 1)
    assert balance_loss(scores, torch.zeros(8, 1, dtype=torch.long), K, 1).item() == pytest.approx(4.0, rel=1e-6)
    # per sequence: each sequence is unbalanced on its own even when the batch is balanced
    idx = torch.tensor([0, 0, 1, 1])[:, None]
    scores = torch.eye(E)[idx[:, 0]] + 1e-9
    assert balance_loss(scores, idx, K, 2).item() > balance_loss(scores, idx, K, 1).item()


def test_balance_loss_leaves_out_the_padding():
    """A right-padded batch's balance loss is the loss of its real tokens alone (sft.py with
    packing=False pads its rows; the padding's expert choices are no load)."""
    torch.manual_seed(0)
    E, K, T = 8, 2, 6
    scores = torch.rand(2 * T, E)
    indices = scores.topk(K, dim=-1).indices
    counted = torch.tensor([[True] * T, [True] * 3 + [False] * 3])
    real = torch.cat([torch.arange(T), torch.arange(T, T + 3)])
    per_sequence = (balance_loss(scores[:T], indices[:T], K, 1) + balance_loss(scores[T:T + 3], indices[T:T + 3], K, 1)) / 2
    torch.testing.assert_close(balance_loss(scores, indices, K, 2, counted), per_sequence)
    torch.testing.assert_close(balance_loss(scores, indices, K, 1, counted), balance_loss(scores[real], indices[real], K, 1))
    assert not torch.allclose(balance_loss(scores, indices, K, 2), per_sequence)    # the padding did count
    # and the model passes its counted tokens on to it
    model = build(MLA, MOE, aux_loss_alpha=0.1).train()
    x = torch.randint(0, 64, (2, 16))
    aux = {}
    for name, c in (('all', None), ('real', torch.arange(16) < torch.tensor([[16], [9]]))):
        model(x, x, counted=c)
        aux[name] = model.last_losses['aux']
    assert not torch.allclose(aux['all'], aux['real'])


def test_balance_loss_enters_the_training_loss():
    model = build(MLA, MOE, aux_loss_alpha=0.1).train()
    x = torch.randint(0, 64, (2, 16))
    _, loss = model(x, x)
    parts = model.last_losses
    assert parts['aux'] > 0 and loss.item() == pytest.approx((parts['lm'] + parts['aux']).item(), rel=1e-6)
    # a forward without targets has no loss, so no parts: a training loop that logs them (dpo.py, a
    # hacked stage adding a term) must not see the last forward's with targets
    model(x)
    assert model.last_losses == {}


def test_grouped_experts_equal_the_loop():
    torch.manual_seed(0)
    results = {}
    for impl in ('loop', 'grouped'):
        model = build(MLA, MOE, moe_impl=impl, n_group=2, topk_group=1).train()
        x = torch.randint(0, 64, (3, 20))
        _, loss = model(x, x)
        loss.backward()
        results[impl] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                         if p.grad is not None})
    torch.testing.assert_close(results['loop'][0], results['grouped'][0])
    for n, g in results['loop'][1].items():
        torch.testing.assert_close(results['grouped'][1][n], g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('path', ['grouped', 'grouped_fused', 'gathered'])
def test_fast_expert_paths_equal_the_loop(path):
    """The grouped path with gate and up as one grouped GEMM over [gate ; up] (training, where the
    float32 weights are cast anyway) or as two, and the sort-free gathered path of decoding: the
    loop's outputs and gradients, also with an expert that gets no token."""
    torch.manual_seed(0)
    experts = Experts(E=6, C=16, I=8, std=0.3)
    x = torch.randn(11, 16, requires_grad=True)
    weights = torch.rand(11, 3, requires_grad=True)
    indices = torch.stack([torch.randperm(5)[:3] for _ in range(11)])    # expert 5 never chosen
    fast = {'grouped': lambda: fast_paths.experts_grouped(experts, x, weights, indices, fuse_gate_up=False),
            'grouped_fused': lambda: fast_paths.experts_grouped(experts, x, weights, indices, fuse_gate_up=True),
            'gathered': lambda: fast_paths.experts_gathered(experts, x, weights, indices)}[path]
    results = []
    for run in (lambda: experts(x, weights, indices), fast):
        out = run()
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, 16)).sum(),
                                    [x, weights] + list(experts.parameters()))
        results.append((out, grads))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for g_fast, g_loop in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g_fast, g_loop, atol=1e-5, rtol=1e-5)
    # no token at all (the grouped path could not reshape 0 elements to (0, K, -1))
    x, weights, indices = x[:0], weights[:0], indices[:0]
    assert fast().shape == experts(x, weights, indices).shape == (0, 16)


def test_fused_gate_up_gradients_are_contiguous():
    """float32 experts computed in bf16 (as under autocast): gate and up run as one grouped GEMM,
    and their float32 gradients come out as two contiguous tensors, not strided views of one
    [gate ; up] buffer that autograd would have to copy into each parameter's layout."""
    torch.manual_seed(0)
    experts = Experts(E=4, C=16, I=8, std=0.3)
    x = torch.randn(10, 16).bfloat16()
    indices = torch.stack([torch.randperm(4)[:2] for _ in range(10)])
    out = fast_paths.experts_grouped(experts, x, torch.rand(10, 2), indices)
    g_gate, g_up = torch.autograd.grad(out.float().sum(), [experts.gate_proj, experts.up_proj])
    assert g_gate.dtype == torch.float32 and g_gate.is_contiguous() and g_up.is_contiguous()


def test_moe_auto_takes_the_gathered_path_for_few_tokens():
    """'auto': N * K <= E pairs (one decoding token per row) go the sort-free way, more the grouped
    (or loop) way; the layer's output is the same either way."""
    model = build(MLA, MOE)                            # E = 8, K = 2
    moe = model.layers[1].mlp
    x = torch.randn(1, 4, 32)                          # 4 tokens x 2 = 8 pairs <= 8: gathered
    assert moe.expert_impl(x.view(-1, 32)) == 'gathered'
    assert moe.expert_impl(torch.randn(5, 32)) in ('grouped', 'loop')     # 10 pairs > 8
    auto = moe(x)[0]
    moe.impl = 'loop'
    torch.testing.assert_close(moe(x)[0], auto, atol=1e-5, rtol=1e-5)


def test_graph_capturable_follows_the_moe_path(monkeypatch):
    """A decode step can be a CUDA graph unless an MoE layer takes the loop (it asks the host which
    tokens each expert got): 'gathered' always can; 'auto' can where the grouped GEMM runs, or at a
    batch small enough for the gathered path (batch * K <= E)."""
    import generate as generate_module
    assert not graph_capturable(build(MLA, MOE, moe_impl='loop'), batch_size=1)
    assert graph_capturable(build(MLA, MOE, moe_impl='gathered'), batch_size=64)
    auto = build(MLA, MOE)                                         # E = 8, K = 2
    monkeypatch.setattr(generate_module, 'grouped_mm_supported', lambda *a: False)
    assert graph_capturable(auto, batch_size=4) and not graph_capturable(auto, batch_size=5)
    assert not graph_capturable(auto)


def test_gather_rows_gradient_is_autograd_indexing():
    """GatherRows' gather-and-sum backward equals autograd's scatter-add for the same indexing."""
    torch.manual_seed(0)
    N, K, C = 7, 3, 5
    order = torch.randperm(N * K)
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(N * K))
    x = torch.randn(N, C, requires_grad=True)
    g = torch.randn(N * K, C)
    ours, = torch.autograd.grad((GatherRows.apply(x, order // K, inv, K) * g).sum(), x)
    ref, = torch.autograd.grad((x[order // K] * g).sum(), x)
    torch.testing.assert_close(ours, ref)
    y = torch.randn(N * K, C, requires_grad=True)              # copies=1: a permutation
    ours, = torch.autograd.grad((GatherRows.apply(y, inv, order, 1) * g).sum(), y)
    ref, = torch.autograd.grad((y[inv] * g).sum(), y)
    torch.testing.assert_close(ours, ref)


def test_compiled_moe_on_the_cpu_in_float32():
    """torch.compile's shape rule for the grouped GEMM takes bf16 only, so under compile a float32
    model on the CPU routes through the loop ('auto') and gives eager's loss."""
    model = build(MLA, MOE).train()
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    eager = model(x, x)[1]
    compiled = torch.compile(model)(x, x)[1]
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_compiled_fused_loss_on_the_cpu_equals_eager():
    """loss_impl='fused' under torch.compile without Triton: dynamo traces linear_cross_entropy's
    PyTorch math (fast_paths leaves it out of the graph only where the Triton row kernel runs), and
    the loss and the gradients are eager's."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=256, n_layer=1, n_head=2, n_embd=32, block_size=16, loss_impl='fused'))
    x, y = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    losses, grads = [], []
    assert model.use_fused_loss(torch.zeros(1), return_logits=False)
    for m in (model, torch.compile(model)):
        loss = m(x, y, return_logits=False)[1]
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.lm_head.weight.grad.clone())
        model.zero_grad()
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_dense_first_layers_and_shared_experts():
    model = build(MLA, MOE, first_k_dense_replace=2)
    kinds = [type(layer.mlp).__name__ for layer in model.layers]
    assert kinds == ['MLP', 'MLP', 'MoE']
    assert model.layers[2].mlp.shared_experts.up_proj.weight.shape == (16, 32)


# --- multi-token prediction ----------------------------------------------------------------

def test_mtp_loss_and_targets():
    model = build(MLA, mtp_depth=2, mtp_loss_weight=0.5).train()
    idx = torch.randint(0, 64, (2, 16))
    targets = torch.roll(idx, -1, 1)
    _, loss = model(idx, targets)
    parts = model.last_losses
    assert loss.item() == pytest.approx((parts['lm'] + 0.5 * parts['mtp']).item(), rel=1e-6)
    # depth 1 by hand: [enorm(emb(t_{i+1})) ; hnorm(h_i)] -> block -> head, target t_{i+2}
    with torch.no_grad():
        x = model.tok_emb(idx)
        rope = model.rope(torch.arange(16))
        for layer in model.layers:
            x, _ = layer(x, rope)
        m = model.mtp[0]
        h, _ = m(x[:, :15], model.tok_emb(idx[:, 1:]), (rope[0][:15], rope[1][:15]), (None, True))
        loss1 = F.cross_entropy(model.lm_head(m.norm(h)).reshape(-1, 64), targets[:, 1:].reshape(-1))
        h2, _ = model.mtp[1](h[:, :14], model.tok_emb(idx[:, 2:]), (rope[0][:14], rope[1][:14]), (None, True))
        loss2 = F.cross_entropy(model.lm_head(model.mtp[1].norm(h2)).reshape(-1, 64), targets[:, 2:].reshape(-1))
    assert parts['mtp'].item() == pytest.approx(((loss1 + loss2) / 2).item(), rel=1e-5)


def test_mtp_is_off_at_generation_and_evaluation():
    with_mtp = build(MLA, mtp_depth=1)
    without = build(MLA)
    without.load_state_dict({k: v for k, v in with_mtp.state_dict().items() if not k.startswith('mtp.')})
    idx = torch.randint(0, 64, (2, 8))
    assert torch.equal(generate(with_mtp, idx, 10, temperature=0), generate(without, idx, 10, temperature=0))
    _, l1 = with_mtp(idx, idx)
    _, l2 = without(idx, idx)
    assert l1.item() == l2.item() and 'mtp' not in with_mtp.last_losses


# --- presets -------------------------------------------------------------------------------

def hand_count(c, dense_layers, moe_layers):
    """Parameters of a DeepSeek-V3-shaped model, counted term by term."""
    H, C = c.n_head, c.n_embd
    attn = (C * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * (c.qk_nope_head_dim + c.qk_rope_head_dim)
            + C * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
            + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim) + H * c.v_head_dim * C)
    norms = 2 * C
    dense = 3 * C * c.intermediate_size
    expert = 3 * C * c.moe_intermediate_size
    moe_total = c.n_routed_experts * expert + c.n_shared_experts * expert + c.n_routed_experts * C
    moe_active = c.num_experts_per_tok * expert + c.n_shared_experts * expert + c.n_routed_experts * C
    emb = c.vocab_size * C
    total = 2 * emb + C + (dense_layers + moe_layers) * (attn + norms) + dense_layers * dense + moe_layers * moe_total
    active = emb + C + (dense_layers + moe_layers) * (attn + norms) + dense_layers * dense + moe_layers * moe_active
    return total, active


@pytest.mark.parametrize('name,published_total,published_active,dense', [
    ('deepseek_v3', 671e9, 37e9, 3),      # DeepSeek-V3 report: 671B total, 37B activated
    ('kimi_k2', 1.04e12, 32e9, 1),        # Kimi-K2 report: 1.04T total, 32B activated
])
def test_real_size_presets(name, published_total, published_active, dense):
    c = ModelConfig.from_preset(name)
    n = count_params(c)                                   # built on the meta device
    total, active = hand_count(c, dense, c.n_layer - dense)
    assert (n['total'], n['active']) == (total, active)
    assert abs(n['total'] / published_total - 1) < 0.015      # 671.0B; 1,026.4B (reported "1.04T")
    assert round(n['active'] / 1e9) == published_active / 1e9  # 36.6B -> 37B; 31.7B -> 32B


def test_other_presets():
    assert count_params(ModelConfig.from_preset('gpt2'))['total'] == 124_475_904
    assert round(count_params(ModelConfig.from_preset('llama3_8b'))['total'] / 1e9, 2) == 8.03
    mix = count_params(ModelConfig.from_preset('mixtral_8x7b'))
    assert round(mix['total'] / 1e9, 1) == 46.7 and round(mix['active'] / 1e9, 1) == 12.7
    with pytest.raises(ValueError, match='unknown preset'):
        ModelConfig.from_preset('gpt5')


def test_config_validation():
    with pytest.raises(ValueError, match="set pos_emb='rope'"):
        ModelConfig(attention='mla')
    with pytest.raises(ValueError, match='num_experts_per_tok=9'):
        ModelConfig(n_routed_experts=8, num_experts_per_tok=9)
    with pytest.raises(ValueError, match='n_group'):
        ModelConfig(n_routed_experts=8, n_group=3)
    with pytest.raises(ValueError, match="rope_scaling type 'ntk'"):
        ModelConfig(pos_emb='rope', rope_scaling={'type': 'ntk', 'factor': 2})
    for key in ('kv_lora_rank', 'v_head_dim'):                  # zero-width values: refused
        with pytest.raises(ValueError, match=f'{key}=0 must be positive'):
            ModelConfig(**{**MLA, key: 0})


def test_q_lora_rank_0_means_no_query_bottleneck_as_in_deepseeks_configs():
    """DeepSeek's configs (and transformers') write q_lora_rank 0 or null for direct queries; 0
    must not build a 0-wide bottleneck, whose queries are all zero (uniform attention)."""
    torch.manual_seed(0)
    direct = GPT(ModelConfig(**MLA))
    torch.manual_seed(0)
    zero = GPT(ModelConfig(**MLA, q_lora_rank=0))
    assert zero.config.q_lora_rank is None and hasattr(zero.layers[0].attn, 'q_proj')
    idx = torch.randint(64, (2, 16))
    torch.testing.assert_close(zero(idx)[0], direct(idx)[0])
