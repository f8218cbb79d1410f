import math

import pytest
import torch

from generate import KVCache, generate, pad_prompts, sample_next
from fast_paths import cross_entropy_rows_, fused_linear, linear_cross_entropy
from model import GPT, ModelConfig

VARIANTS = {
    'gpt2': dict(),
    'llama': dict(pos_emb='rope', norm='rmsnorm', mlp='swiglu', bias=False, tie_word_embeddings=False),
    'gqa': dict(pos_emb='rope', norm='rmsnorm', mlp='swiglu', n_kv_head=2),
    'mqa': dict(pos_emb='rope', n_kv_head=1),
    'sinusoidal': dict(pos_emb='sinusoidal'),
    'nope': dict(pos_emb='none'),
}


def tiny(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32), **kw})
    return GPT(cfg).eval()


def greedy_by_recompute(model, idx, n):
    """The reference: run the whole sequence through the model for every new token."""
    for _ in range(n):
        logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize('variant', VARIANTS)
def test_cached_generation_equals_recomputation(variant):
    model = tiny(**VARIANTS[variant])
    idx = torch.randint(0, 61, (3, 7))
    fast = generate(model, idx, 25, temperature=0)                 # the KV-cache engine
    assert torch.equal(fast, greedy_by_recompute(model, idx, 25))
    assert torch.equal(fast, model.generate(idx, 25, temperature=0))  # model.py's plain reference


@pytest.mark.parametrize('variant', ['gpt2', 'gqa'])
def test_cached_logits_equal_full_forward(variant):
    model = tiny(**VARIANTS[variant])
    idx = torch.randint(0, 61, (2, 20))
    full, _ = model(idx)
    cache = KVCache(2, 20, 'cpu')
    parts = [model(idx[:, :12], cache=cache)[0]]                   # prefill 12, then 1 at a time
    parts += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('variant', ['gpt2', 'gqa'])
def test_left_padded_batch_equals_one_prompt_at_a_time(variant):
    model = tiny(**VARIANTS[variant])
    prompts = [[5, 9, 2, 7, 1, 3], [8, 4], [11]]
    idx, mask = pad_prompts(prompts)
    batched = generate(model, idx, 12, temperature=0, prompt_mask=mask)[:, idx.size(1):]
    for row, p in zip(batched, prompts):
        alone = generate(model, torch.tensor([p]), 12, temperature=0)[0, len(p):]
        assert torch.equal(row, alone)


def test_generation_continues_past_block_size():
    model = tiny(block_size=16)
    out = generate(model, torch.randint(0, 61, (2, 20)), 40, temperature=1.0, top_k=5)
    assert out.shape == (2, 60)                                    # prompt cropped internally
    assert model.generate(torch.randint(0, 61, (2, 20)), 30, temperature=1.0, top_k=5).shape == (2, 50)


def test_generation_stops_at_eot_and_pads_finished_rows():
    model = tiny()
    idx = torch.randint(0, 61, (1, 5))
    first = int(generate(model, idx, 1, temperature=0)[0, -1])
    out = generate(model, idx, 10, temperature=0, stop_ids=first)
    assert out.shape == (1, 6) and out[0, -1] == first
    two = torch.cat([idx, torch.randint(0, 61, (1, 5))])
    new = generate(model, two, 8, temperature=0, stop_ids=first)[:, 5:]
    hit = (new[0] == first).nonzero()
    if len(hit) and new.size(1) > 1:                               # after EOT the row stays at EOT
        assert (new[0, hit[0, 0]:] == first).all()


def test_sampling_filters():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits, 0), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 1.0, top_k=1), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-6), logits.argmax(-1))
    for _ in range(20):
        s = sample_next(logits, 2.0, top_k=3)
        assert all(x in row.topk(3).indices for x, row in zip(s, logits))
        assert (sample_next(logits, 1.0, vocab_limit=10) < 10).all()
    assert torch.equal(sample_next(logits, 0, vocab_limit=10), logits[:, :10].argmax(-1))
    # top-p keeps the smallest set whose probability reaches top_p, a mass landing on it exactly
    # included (it kept one token more then): {0} at 0.5, {0, 1} at 0.75 (as transformers and vLLM do)
    tie = torch.tensor([[0.5, 0.25, 0.25 - 2 ** -10, 2 ** -10]]).log().expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(tie, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    assert set(sample_next(tie, 1.0, top_p=0.75, generator=g).tolist()) == {0, 1}
    assert set(sample_next(tie, 1.0, top_p=0.76, generator=g).tolist()) == {0, 1, 2}
    before = logits.clone()
    sample_next(logits, 1.0, top_k=5, vocab_limit=10)
    assert torch.equal(logits, before)                 # the caller's logits are not modified
    assert torch.equal(sample_next(logits.bfloat16(), 0), logits.bfloat16().float().argmax(-1))


def test_initial_loss_is_near_uniform():
    model = tiny(**VARIANTS['llama'])             # untied: small random logits at init
    x = torch.randint(0, 61, (4, 32))
    _, loss = model(x, x)
    assert abs(loss.item() - math.log(61)) < 0.1


def test_loss_without_logits_is_the_same_loss_and_gradient():
    """return_logits=False (training steps): the same loss and gradients, no (B, T, V) output."""
    model = tiny(**VARIANTS['llama']).train()
    x = torch.randint(0, 61, (2, 16))
    grads = []
    for keep in (True, False):
        model.zero_grad()
        logits, loss = model(x, x, return_logits=keep)
        assert (logits is None) != keep
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cross_entropy_rows_gives_the_loss_and_its_gradient_in_place():
    """The row pass of the fused loss: per-row cross entropy, and z overwritten with its gradient
    unnormalised, P = exp(z - c) - S onehot(y) with 1/S returned (softmax - onehot = P / S; 0 on
    rows whose target is -1), against autograd through F.cross_entropy."""
    torch.manual_seed(0)
    z = torch.randn(6, 37) * 3
    y = torch.tensor([0, 36, 5, -1, 12, 12])
    ref = z.clone().requires_grad_()
    ref_loss = torch.nn.functional.cross_entropy(ref, y, ignore_index=-1, reduction='none')
    ref_loss.sum().backward()
    loss, inv_sum = cross_entropy_rows_(z, y)
    torch.testing.assert_close(loss, ref_loss.detach())
    torch.testing.assert_close(z * inv_sum[:, None], ref.grad)
    assert inv_sum[3] == 0 and (inv_sum[[0, 1, 2, 4, 5]] > 0).all()


@pytest.mark.parametrize('tied', [False, True])
def test_linear_cross_entropy_equals_the_plain_loss(tied):
    """The output layer + loss in chunks (loss_impl='fused', on by default only on CUDA): the same
    loss and gradients as logits followed by F.cross_entropy, with masked targets, chunks that do
    not divide the rows, MTP, a tied head, and under bf16 autocast."""
    cfg = dict(**VARIANTS['llama'], mtp_depth=1) if not tied else dict(pos_emb='rope', norm='rmsnorm')
    x = torch.randint(0, 61, (3, 16))
    y = x.clone()
    y[0, :5] = -1
    for autocast in (False, True):
        out = {}
        for impl in ('plain', 'fused'):
            model = tiny(**cfg, loss_impl=impl).train()
            with torch.autocast('cpu', torch.bfloat16, enabled=autocast):
                logits, loss = model(x, y, return_logits=False)
            assert logits is None
            loss.backward()
            out[impl] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
        tol = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out['fused'][0], out['plain'][0], **tol)
        for n, g in out['plain'][1].items():
            torch.testing.assert_close(out['fused'][1][n], g, **tol, msg=lambda m: f'{n}: {m}')
    # chunks of 7 rows for 48 (the last one short), gradient scaled by the outer factor
    torch.manual_seed(1)
    h = torch.randn(48, 32, requires_grad=True)
    w = torch.randn(61, 32, requires_grad=True)
    t = torch.randint(-1, 61, (48,))
    (3 * linear_cross_entropy(h, w, t, chunk_bytes=7 * 61 * 2)).backward()
    ref_h, ref_w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (3 * torch.nn.functional.cross_entropy(ref_h @ ref_w.t(), t, ignore_index=-1)).backward()
    torch.testing.assert_close(h.grad, ref_h.grad)
    torch.testing.assert_close(w.grad, ref_w.grad)
    with pytest.raises(ValueError, match='loss_impl'):
        ModelConfig(loss_impl='chunked')


def test_fused_linear_equals_separate_projections():
    """Under autocast with float32 weights, x's projections (q/k/v, gate/up, MLA's q_a/kv_a, here
    with and without bias) run as one GEMM over the stacked weights: same values and gradients as
    one GEMM each; outside autocast (weights already in the compute dtype) nothing is stacked."""
    torch.manual_seed(0)
    linears = [torch.nn.Linear(32, 24), torch.nn.Linear(32, 8, bias=False), torch.nn.Linear(32, 16)]
    x = torch.randn(3, 5, 32, requires_grad=True)
    outs, grads = [], []
    for fused in (True, False):
        with torch.autocast('cpu', torch.bfloat16):
            ys = fused_linear(x, linears) if fused else [l(x) for l in linears]
        outs.append(ys)
        loss = sum((y.float() * (i + 1)).sum() for i, y in enumerate(ys))
        grads.append(torch.autograd.grad(loss, [x] + [p for l in linears for p in l.parameters()]))
    for a, b in zip(*outs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
    ys = fused_linear(x, linears)                    # no autocast: the modules themselves
    for y, l in zip(ys, linears):
        torch.testing.assert_close(y, l(x), rtol=0, atol=0)


def test_loss_ignores_minus_one_targets():
    model = tiny()
    x = torch.randint(0, 61, (2, 16))
    y = x.clone()
    y[:, :8] = -1
    _, masked = model(x, y)
    logits, _ = model(x)
    ref = torch.nn.functional.cross_entropy(logits[:, 8:].reshape(-1, 61), x[:, 8:].reshape(-1))
    torch.testing.assert_close(masked, ref)


def test_gpt2_preset_size_and_flops():
    with torch.device('meta'):
        model = GPT(ModelConfig())
    assert model.num_params() == 124_475_904                       # nanoGPT's GPT-2 with vocab 50304
    assert model.num_params(exclude_embeddings=True) == 123_689_472
    c = model.config
    n_matmul = c.n_layer * 12 * c.n_embd ** 2 + c.n_embd * c.vocab_size   # attn 4C^2 + mlp 8C^2, head
    assert model.active_matmul_params() == n_matmul
    assert model.flops_per_token(1024) == 6 * n_matmul + 12 * c.n_layer * c.n_head * 64 * 1024


@pytest.mark.parametrize('kw', [{}, {'mtp_depth': 2}, {'pos_emb': 'rope', 'mlp': 'swiglu', 'n_routed_experts': 8,
                                'n_shared_experts': 1, 'num_experts_per_tok': 2, 'moe_intermediate_size': 16,
                                'first_k_dense_replace': 1, 'mtp_depth': 1, 'moe_impl': 'loop'}],
                         ids=['gpt', 'mtp2', 'moe_mtp'])
def test_flops_per_token_counts_the_matmuls_a_training_step_runs(kw):
    """6 x active_matmul_params against torch's FlopCounterMode over a forward and backward: the
    weights' FLOPs (its CPU flash-attention kernel is not counted, so the attention term is left
    out; MLA's unequal head widths take the math kernel, which is, hence no MLA case here).
    Each MTP depth runs the output head again and covers T - k of the T tokens (the formula counts
    T): within k/T."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=128, block_size=64, n_layer=2, n_head=4, n_embd=32, **kw)).train()
    x, y = torch.randint(0, 128, (2, 64)), torch.randint(0, 128, (2, 64))
    with FlopCounterMode(display=False) as counter:
        model(x, y)[1].backward()
    counted = counter.get_total_flops() / x.numel()
    formula = 6 * model.active_matmul_params()
    assert abs(counted / formula - 1) <= model.config.mtp_depth / 64, (counted, formula)
    if model.config.mtp_depth:                         # mtp=False: the model as run without them
        assert model.active_matmul_params(mtp=False) < formula / 6


def test_config_errors():
    with pytest.raises(ValueError, match="pos_emb='alibi'; valid: learned, sinusoidal, rope, none"):
        ModelConfig(pos_emb='alibi')
    with pytest.raises(ValueError, match='multiple of n_kv_head'):
        ModelConfig(n_head=6, n_kv_head=4)
    with pytest.raises(ValueError, match='not divisible'):
        ModelConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match='every prompt needs at least one token'):
        pad_prompts([[1], []])
    model = tiny(pos_emb='rope')
    with pytest.raises(ValueError, match='segments .* not with a cache'):
        x = torch.zeros(1, 4, dtype=torch.long)
        model(x, cache=KVCache(1, 8, 'cpu'), segments=x)


def test_training_reduces_loss():
    model = tiny(**VARIANTS['llama']).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 61, (8, 32))
    first = None
    for _ in range(30):
        _, loss = model(x[:, :-1], x[:, 1:])
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_the_fused_loss_is_never_taken_in_float16():
    """Under float16 autocast the fused loss's row buffer overflowed (p_y - S above 65,504 with a
    vocabulary over 65k and near-uniform logits): gradients inf. The model takes the plain path there."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=70_000, n_layer=1, n_head=2, n_embd=8, block_size=8, loss_impl='fused',
                            init_std=1e-4)).train()
    x = torch.randint(0, 70_000, (1, 8))
    assert model.use_fused_loss(model.tok_emb(x), return_logits=False)
    with torch.autocast('cpu', torch.float16):
        assert not model.use_fused_loss(model.tok_emb(x), return_logits=False)
        _, loss = model(x, x, return_logits=False)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_the_reference_generate_never_chooses_the_vocabulary_padding():
    """GPT.generate's vocab_limit, as generate.sample_next's: ids past the tokenizer (the padding of
    padded_vocab_size) are never chosen, even where the head favours them."""
    model = tiny()
    model.lm_head.register_forward_hook(lambda m, x, out: out.index_add(   # padding ids 50.. win
        -1, torch.arange(50, 61), torch.full((*out.shape[:-1], 11), 100.0)))
    idx = torch.randint(0, 50, (2, 5))
    assert (model.generate(idx, 8, temperature=0)[:, 5:] >= 50).all()      # without the limit
    for temperature in (0, 1.0):
        out = model.generate(idx, 8, temperature=temperature, top_k=5, vocab_limit=50)[:, 5:]
        assert (out < 50).all()
