"""engine.py: continuous batching over a paged cache. Requests that arrive at different steps,
with prompts of different lengths read in chunks beside other requests' decoding, get exactly the
greedy tokens they get alone; blocks all go back to the pool; a request that does not fit waits."""

import pytest
import torch

from engine import Engine, cache_numbers_per_token
from generate import generate
from model import GPT, ModelConfig

BASE = dict(vocab_size=97, block_size=96, n_layer=2, n_head=4, n_embd=32)
VARIANTS = {
    'gpt2': dict(),                                                       # learned positions, MHA
    'gqa_rope': dict(pos_emb='rope', norm='rmsnorm', mlp='swiglu', n_kv_head=2, bias=False),
    'mla': dict(attention='mla', pos_emb='rope', norm='rmsnorm', mlp='swiglu', bias=False, q_lora_rank=16,
                kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
}
VARIANTS['mla_moe'] = dict(VARIANTS['mla'], n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                           moe_intermediate_size=16, scoring_func='sigmoid', first_k_dense_replace=1)


def build(**kw):
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**BASE, **kw})).eval()


def alone(model, prompt, n, **kw):
    return generate(model, torch.tensor([prompt]), n, temperature=0, **kw)[0, len(prompt):].tolist()


@pytest.mark.parametrize('variant', VARIANTS)
def test_mixed_arrivals_give_each_request_its_tokens_alone_and_return_every_block(variant):
    model = build(**VARIANTS[variant])
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 23, 1, 40, 9)]
    engine = Engine(model, n_blocks=40, block_size=8, prefill_chunk=16)
    requests = [engine.add(prompts[0], 20), engine.add(prompts[1], 12)]
    for _ in range(3):                                 # the first two run (request 1 still reading)
        engine.step()
    requests += [engine.add(prompts[2], 30), engine.add(prompts[3], 8)]
    engine.step()
    requests.append(engine.add(prompts[4], 15))
    engine.run()
    for r, p in zip(requests, prompts):
        assert r.done and r.output == alone(model, p, r.max_new_tokens), (variant, r.id)
    assert len(engine.pool.free) == 40 and not engine.running


def test_a_request_that_does_not_fit_waits_and_one_that_never_fits_is_refused():
    model = build(**VARIANTS['mla'])
    engine = Engine(model, n_blocks=6, block_size=8)
    a, b = engine.add([1, 2, 3], 30), engine.add([4, 5, 6], 30)        # 33 tokens: 5 blocks each
    events = engine.step()
    assert [e[0] for e in events] == [a] and engine.waiting == [b]   # b waits for a's blocks
    engine.run()
    assert a.output == alone(model, [1, 2, 3], 30) and b.output == alone(model, [4, 5, 6], 30)
    with pytest.raises(ValueError, match='the pool has 6'):
        engine.add([1] * 40, 20)
    with pytest.raises(ValueError, match="exceeds the model's block_size 96"):
        engine.add([1] * 90, 10)


def test_stop_tokens_end_a_request_and_mla_pages_only_the_latent_and_rope_key():
    model = build(**VARIANTS['mla'])
    first = alone(model, [7, 8, 9], 4)
    engine = Engine(model, n_blocks=20, block_size=4)
    r = engine.add([7, 8, 9], 50 - 3, stop_ids=[first[2]])
    engine.run()
    assert r.output == first[:first.index(first[2]) + 1]    # up to the stop token, which ends it
    c = model.config
    assert engine.pool.numbers_per_token() == c.n_layer * (c.kv_lora_rank + c.qk_rope_head_dim) == cache_numbers_per_token(c)
    gqa = build(**VARIANTS['gqa_rope'])
    engine = Engine(gqa, n_blocks=10, block_size=4)
    engine.add([1, 2], 3)
    engine.run()
    assert engine.pool.numbers_per_token() == 2 * 2 * 2 * 8 == cache_numbers_per_token(gqa.config)   # layers x (k, v) x Hkv x D


def test_sampled_requests_follow_their_own_seeds():
    model = build(**VARIANTS['gqa_rope'])
    runs = []
    for order in ((0, 1), (1, 0)):                     # the same seeds, admitted in another order
        engine = Engine(model, n_blocks=30, block_size=8)
        reqs = {i: engine.add([3, 1, 4, 1, 5][:i + 3], 12, temperature=1.0, top_k=20, seed=10 + i) for i in order}
        engine.run()
        runs.append({i: r.output for i, r in reqs.items()})
    assert runs[0] == runs[1] and runs[0][0] != runs[0][1]
