"""engine.py: continuous batching over a paged cache. Requests that arrive at different steps,
with prompts of different lengths read in chunks beside other requests' decoding, get exactly the
greedy tokens they get alone; blocks all go back to the pool; a request that does not fit waits."""

import pytest
import torch

from engine import Engine, cache_numbers_per_token, static_forward
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
    idx = torch.tensor([prompt], device=next(model.parameters()).device)
    return generate(model, idx, n, temperature=0, **kw)[0, len(prompt):].tolist()


def mixed_arrivals(engine):
    """Five requests of 1 to 40 prompt tokens: two, then (request 1 still reading its prompt) two
    more, then one; stepped until all are done. Returns the requests and their prompts."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 23, 1, 40, 9)]
    requests = [engine.add(prompts[0], 20), engine.add(prompts[1], 12)]
    for _ in range(3):                                 # the first two run (request 1 still reading)
        engine.step()
    requests += [engine.add(prompts[2], 30), engine.add(prompts[3], 8)]
    engine.step()
    requests.append(engine.add(prompts[4], 15))
    engine.run()
    return requests, prompts


@pytest.mark.parametrize('variant', VARIANTS)
def test_mixed_arrivals_give_each_request_its_tokens_alone_and_return_every_block(variant):
    model = build(**VARIANTS[variant])
    engine = Engine(model, n_blocks=40, tokens_per_block=8, prefill_chunk=16)
    requests, prompts = mixed_arrivals(engine)
    for r, p in zip(requests, prompts):
        assert r.done and r.output == alone(model, p, r.max_new_tokens), (variant, r.id)
    assert engine.pool.available() == 40 and not any(engine.pool.ref) and not engine.running
    assert engine.stats['static_steps'] == 0 < engine.stats['eager_steps']   # cuda_graph=False: every step eager


def test_a_request_that_does_not_fit_waits_and_one_that_never_fits_is_refused():
    model = build(**VARIANTS['mla'])
    engine = Engine(model, n_blocks=6, tokens_per_block=8)
    a, b = engine.add([1, 2, 3], 30), engine.add([4, 5, 6], 30)        # 33 tokens: 5 blocks each
    events = engine.step()
    assert [e[0] for e in events] == [a] and engine.waiting == [b]   # b waits for a's blocks
    engine.run()
    assert a.output == alone(model, [1, 2, 3], 30) and b.output == alone(model, [4, 5, 6], 30)
    with pytest.raises(ValueError, match='the pool has 6'):
        engine.add([1] * 40, 20)
    with pytest.raises(ValueError, match="exceeds the model's block_size 96"):
        engine.add([1] * 90, 10)
    with pytest.raises(ValueError, match='tokens_per_block=0 must be a whole number >= 1'):   # not a division by 0
        Engine(model, n_blocks=6, tokens_per_block=0)
    for bad in (-1, model.config.vocab_size, 2.0):     # -1 would stand for the last step's token 0
        with pytest.raises(ValueError, match=r'prompt token ids must be whole numbers in 0\.\.'):
            engine.add([5, bad], 4)


def test_stop_tokens_end_a_request_and_mla_pages_only_the_latent_and_rope_key():
    model = build(**VARIANTS['mla'])
    first = alone(model, [7, 8, 9], 4)
    engine = Engine(model, n_blocks=20, tokens_per_block=4)
    r = engine.add([7, 8, 9], 50 - 3, stop_ids=[first[2]])
    engine.run()
    assert r.output == first[:first.index(first[2]) + 1]    # up to the stop token, which ends it
    c = model.config
    assert engine.pool.numbers_per_token() == c.n_layer * (c.kv_lora_rank + c.qk_rope_head_dim) == cache_numbers_per_token(c)
    # one pool a layer: the latent and the RoPE key share a row, so a step gathers once a layer
    assert sorted(engine.pool.tensors) == [(i, 'latent_rope') for i in range(c.n_layer)]
    gqa = build(**VARIANTS['gqa_rope'])
    engine = Engine(gqa, n_blocks=10, tokens_per_block=4)
    engine.add([1, 2], 3)
    engine.run()
    assert engine.pool.numbers_per_token() == 2 * 2 * 2 * 8 == cache_numbers_per_token(gqa.config)   # layers x (k, v) x Hkv x D


def test_sampled_requests_follow_their_own_seeds():
    model = build(**VARIANTS['gqa_rope'])
    runs = []
    for order in ((0, 1), (1, 0)):                     # the same seeds, admitted in another order
        engine = Engine(model, n_blocks=30, tokens_per_block=8)
        reqs = {i: engine.add([3, 1, 4, 1, 5][:i + 3], 12, temperature=1.0, top_k=20, seed=10 + i) for i in order}
        engine.run()
        runs.append({i: r.output for i, r in reqs.items()})
    assert runs[0] == runs[1] and runs[0][0] != runs[0][1]
    # and they do sample: one prompt under two seeds gives two answers, neither the greedy one
    # (with the sampling branch skipped, every request decoded greedily and the lines above held)
    engine = Engine(model, n_blocks=30, tokens_per_block=8)
    a, b = (engine.add([3, 1, 4], 12, temperature=1.0, top_k=20, seed=s) for s in (10, 11))
    engine.run()
    assert a.output != b.output and alone(model, [3, 1, 4], 12) not in (a.output, b.output)


@pytest.mark.parametrize('cuda_graph,overlap', [(False, False), (True, True)])
def test_logprobs_of_each_new_token_are_the_models_beside_requests_that_ask_none(cuda_graph, overlap):
    """A request with logprobs=k records each new token's log-probability and the k most likely
    tokens', those of one forward pass over its prompt and answer (the model's distribution: a
    sampled request's too, whatever its temperature); the requests beside it, which ask none (or
    another k), keep their tokens. generate.prompt_logprobs scores the prompt's own tokens so."""
    from generate import prompt_logprobs
    model = build(**VARIANTS['mla_moe'])
    engine = Engine(model, n_blocks=40, tokens_per_block=8, prefill_chunk=16, cuda_graph=cuda_graph, overlap=overlap)
    prompts = [[5, 9, 2], [1] * 20, [4, 4]]
    greedy = engine.add(prompts[0], 10, logprobs=3)
    plain = engine.add(prompts[1], 6)                                  # reads its prompt beside greedy's decoding
    hot = engine.add(prompts[2], 8, temperature=1.5, seed=3, logprobs=0)
    engine.run()
    assert plain.output == alone(model, prompts[1], 6) and plain.token_logprobs == []
    assert greedy.output == alone(model, prompts[0], 10)
    for r, p, k in ((greedy, prompts[0], 3), (hot, prompts[2], 0)):
        ids = p + r.output
        ref = torch.log_softmax(model(torch.tensor([ids]))[0][0, len(p) - 1:-1].float(), -1)   # (new, V)
        assert len(r.token_logprobs) == len(r.output)
        for t, (lp, top), row in zip(r.output, r.token_logprobs, ref):
            assert abs(lp - row[t].item()) < 1e-4 and len(top) == k
            assert [i for i, _ in top] == row.topk(k).indices.tolist()
            assert all(abs(v - row[i].item()) < 1e-4 for i, v in top)
        if k:                                                         # greedy: the chosen one is the most likely
            assert all(top[0][0] == t for t, (_, top) in zip(r.output, r.token_logprobs))
        scored = prompt_logprobs(model, ids, k)
        assert len(scored) == len(ids) - 1
        assert all(abs(a[0] - b[0]) < 1e-4 for a, b in zip(scored[len(p) - 1:], r.token_logprobs))
    assert min(lp for lp, _ in hot.token_logprobs) < -1                 # sampled: not only the likeliest tokens
    with pytest.raises(ValueError, match='logprobs=-1 must be None or a whole number >= 0'):
        engine.add([1], 2, logprobs=-1)


def test_prompt_logprobs_of_a_prompt_longer_than_its_256_position_chunks():
    """generate.prompt_logprobs scores 256 positions at a time: a 300-token prompt's scores (and top
    k) are one forward pass's, across the chunk boundary, over the tokenizer's ids (vocab_limit)."""
    from generate import prompt_logprobs
    model = build(**VARIANTS['gqa_rope'], block_size=320)
    ids = torch.randint(0, 90, (300,), generator=torch.Generator().manual_seed(2)).tolist()
    scored = prompt_logprobs(model, ids, 2, vocab_limit=90)
    ref = torch.log_softmax(model(torch.tensor([ids]))[0][0, :-1, :90].float(), -1)
    assert len(scored) == 299
    assert all(abs(lp - ref[t, ids[t + 1]].item()) < 1e-4 and [i for i, _ in top] == ref[t].topk(2).indices.tolist()
               for t, (lp, top) in enumerate(scored))


@pytest.mark.parametrize('cuda_graph,overlap', [(False, False), (True, True)])
def test_a_request_scores_its_prompt_as_its_prefill_reads_it_beside_other_requests(cuda_graph, overlap):
    """prompt_logprobs=k: the engine's prefill scores each prompt token after the first, given the
    ones before it, across its chunks (those of generate.prompt_logprobs: one forward pass over the
    prompt, and its top k), all of them by its first token; it reads its whole prompt though a
    shared prefix is cached; the requests beside it, reading prompts and decoding, keep their
    tokens, and so does it."""
    from generate import prompt_logprobs
    model = build(**VARIANTS['mla_moe'])
    engine = Engine(model, n_blocks=40, tokens_per_block=8, prefill_chunk=16, cuda_graph=cuda_graph, overlap=overlap)
    g = torch.Generator().manual_seed(4)
    shared = torch.randint(0, 97, (24,), generator=g).tolist()
    first = engine.add(shared + [3, 1], 5)                             # caches the 3 shared blocks
    while not first.done:
        engine.step()
    prompts = [shared + torch.randint(0, 97, (17,), generator=g).tolist(), [7, 7, 2] * 6, [8]]
    scorer = engine.add(prompts[0], 4, prompt_logprobs=2)            # 41 tokens: chunks of 16, 16, 9
    plain = engine.add(prompts[1], 9)                                  # its prompt read beside the scorer's
    engine.step()
    short = engine.add(prompts[2], 6, prompt_logprobs=0)              # one token: nothing to score
    steps = 0
    while not scorer.output:
        engine.step()
        steps += 1
    assert steps < 5 and len(scorer.prompt_scores) == 40               # every score by its first token
    engine.run()
    assert engine.stats['reused_tokens'] == 0                         # the scorer read its cached prefix again
    for r, p, n in ((scorer, prompts[0], 4), (plain, prompts[1], 9), (short, prompts[2], 6)):
        assert r.output == alone(model, p, n)
    ref = prompt_logprobs(model, prompts[0], 2)
    assert all(abs(a[0] - b[0]) < 1e-4 and [i for i, _ in a[1]] == [i for i, _ in b[1]] and
               all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a[1], b[1])) for a, b in zip(scorer.prompt_scores, ref))
    assert short.prompt_scores == [] and plain.prompt_scores == []
    assert engine.pool.available() == 40
    for bad in (1.5, True):                                          # (a bool is no number of tokens)
        with pytest.raises(ValueError, match=f'prompt_logprobs={bad} must be None or a whole number >= 0'):
            engine.add([1], 2, prompt_logprobs=bad)


def test_prompt_scoring_rows_share_one_budget_of_prefill_chunk_tokens_a_step():
    """Rows that score their prompt run in an eager pass whose logits are (B, T, V): together they
    read at most prefill_chunk prompt tokens a step, the first admitted first, and their scores and
    tokens stay those of each request alone."""
    from generate import prompt_logprobs
    model = build(**VARIANTS['gqa_rope'])
    engine = Engine(model, n_blocks=40, tokens_per_block=8, prefill_chunk=16)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 97, (39,), generator=g).tolist() for _ in range(2)]
    a, b = (engine.add(p, 3, prompt_logprobs=1) for p in prompts)
    engine.step()
    assert engine.stats['prefill_tokens'] == 16 and len(b.pending) == 39     # a read 16, b waited
    engine.run()
    for r, p in ((a, prompts[0]), (b, prompts[1])):
        assert r.output == alone(model, p, 3)
        ref = prompt_logprobs(model, p, 1)
        assert len(r.prompt_scores) == 38 and all(abs(x[0] - y[0]) < 1e-4 for x, y in zip(r.prompt_scores, ref))


def test_penalised_requests_get_their_tokens_alone_beside_plain_ones():
    """A request with OpenAI's frequency / presence penalties counts its own tokens on the device
    (nothing waits for the host) and gets what generate_tokens gives it alone."""
    model = build(**VARIANTS['mla_moe'])
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (6, 19, 2)]
    settings = [dict(frequency_penalty=0.8), dict(), dict(presence_penalty=1.5, frequency_penalty=-0.2)]
    for overlap in (False, True):
        engine = Engine(model, n_blocks=40, tokens_per_block=8, prefill_chunk=8, overlap=overlap)
        requests = [engine.add(p, 24, **kw) for p, kw in zip(prompts, settings)]
        engine.run()
        for r, p, kw in zip(requests, prompts, settings):
            assert r.output == alone(model, p, 24, **kw), (overlap, kw)
    assert alone(model, prompts[0], 24, frequency_penalty=0.8) != alone(model, prompts[0], 24)


# Prefix sharing: requests whose prompts begin alike share the cached blocks of that prefix.

def shared_prefix_prompts(n_prefix, suffix_lengths, seed=2):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 97, (n_prefix,), generator=g).tolist()
    return [prefix + torch.randint(0, 97, (n,), generator=g).tolist() for n in suffix_lengths]


def check_pool(engine):
    """The pool's bookkeeping: each block is free, held (its count = the block tables it is in,
    never twice in one) or cached nobody holding it; named blocks are those in the table."""
    pool, held = engine.pool, {}
    for r in engine.running:
        assert len(set(r.blocks)) == len(r.blocks), r.blocks
        for b in r.blocks:
            held[b] = held.get(b, 0) + 1
    assert pool.ref == [held.get(b, 0) for b in range(pool.n_blocks)]
    free, idle = set(pool.free), set(pool.evictable)
    assert len(free) == len(pool.free) and not free & idle and not (free | idle) & set(held)
    assert len(free | idle | set(held)) == pool.n_blocks and not free & set(pool.name)
    assert idle <= set(pool.name) and {pool.cached[h]: h for h in pool.cached} == pool.name
    assert pool.scratch == pool.n_blocks and pool.scratch not in free | idle | set(held)   # never handed out


def run(engine):
    while engine.waiting or engine.running:
        engine.step()
        check_pool(engine)


def run_arrivals(model, prompts, n_new, arrive_at, **engine_kw):
    """Add prompts[i] before step arrive_at[i]; step until all are done."""
    engine = Engine(model, **engine_kw)
    requests, step = [None] * len(prompts), 0
    while any(r is None or not r.done for r in requests):
        for i, at in enumerate(arrive_at):
            if at == step:
                requests[i] = engine.add(prompts[i], n_new[i])
        engine.step()
        check_pool(engine)
        step += 1
    return engine, requests


@pytest.mark.parametrize('variant', VARIANTS)
def test_a_shared_prefix_is_computed_once_and_every_request_gets_its_tokens_alone(variant):
    model = build(**VARIANTS[variant])
    prompts = shared_prefix_prompts(29, (3, 11, 1, 20, 6))   # 3 full blocks of 8 shared, then 5 more tokens
    n_new, arrive_at = [15, 9, 20, 6, 12], [0, 0, 4, 5, 9]   # request 1 arrives beside 0: nothing cached yet
    kw = dict(n_blocks=40, tokens_per_block=8, prefill_chunk=16)
    on, shared = run_arrivals(model, prompts, n_new, arrive_at, **kw)
    off, unshared = run_arrivals(model, prompts, n_new, arrive_at, prefix_sharing=False, **kw)
    for i, p in enumerate(prompts):
        assert shared[i].output == unshared[i].output == alone(model, p, n_new[i]), (variant, i)
    total = sum(map(len, prompts))
    assert off.stats['reused_tokens'] == 0 and off.stats['prefill_tokens'] == total
    # requests 2, 3, 4 each reuse the three blocks of the prefix (request 3 also has more than
    # prefill_chunk tokens, so some of its suffix runs in a second step)
    assert on.stats['reused_tokens'] == 3 * 24 and on.stats['prompt_tokens'] == total
    assert on.stats['prefill_tokens'] == total - 3 * 24 < off.stats['prefill_tokens']
    assert on.hit_rate() == 72 / total
    # all done: every block is free or cached: the prefix's 3 blocks and the requests' own full
    # prompt blocks past it (1 + 2 + 0 + 3 + 1; request 1's copy of the prefix is not named twice)
    assert on.pool.available() == 40 and not any(on.pool.ref)
    assert len(on.pool.evictable) == len(on.pool.cached) == 10 and len(off.pool.free) == 40


def test_a_small_pool_evicts_cached_blocks_least_recently_used_tail_first_and_stays_exact():
    model = build(**VARIANTS['gqa_rope'])
    a, c = shared_prefix_prompts(12, (2, 3))           # 3 full blocks of 4 shared
    b = shared_prefix_prompts(20, (0,), seed=3)[0]     # another prompt: 5 full blocks
    engine = Engine(model, n_blocks=12, tokens_per_block=4, prefill_chunk=8)
    ra = engine.add(a, 10)                             # 24 tokens: 6 blocks
    run(engine)
    assert len(engine.pool.evictable) == 3 and len(engine.pool.free) == 9
    head = [engine.pool.cached[h] for h in ra.hashes]  # a's three prompt blocks, cached
    rb = engine.add(b, 20)                             # 40 tokens: 10 blocks = 9 free + 1 evicted
    engine.step()
    check_pool(engine)
    assert rb.blocks[-1] == head[2] and head[2] not in engine.pool.name   # the prefix's tail went first
    run(engine)
    rc = engine.add(c, 9)                              # reuses the prefix's 2 blocks still cached
    run(engine)
    assert rc.blocks == [] and engine.stats['reused_tokens'] == 8
    for r, p in ((ra, a), (rb, b), (rc, c)):
        assert r.output == alone(model, p, r.max_new_tokens)
    assert engine.pool.available() == 12 and not any(engine.pool.ref)
    rd = engine.add(b[:8] + [5] * 30, 8)               # 46 tokens: 12 blocks, every cached one is evicted
    run(engine)                                        # ... but first its own 2 cached prefix blocks are reused
    assert rd.output == alone(model, rd.prompt, 8) and engine.stats['reused_tokens'] == 16
    assert engine.pool.available() == 12


@pytest.mark.parametrize('variant', ['gpt2', 'mla'])
def test_a_prompt_made_only_of_cached_blocks_recomputes_its_last_block_for_its_first_token(variant):
    model = build(**VARIANTS[variant])
    p = shared_prefix_prompts(16, (0,))[0]             # exactly 2 blocks of 8
    engine = Engine(model, n_blocks=20, tokens_per_block=8)
    first = engine.add(p, 6)
    run(engine)
    assert len(engine.pool.cached) == 2
    again = engine.add(p, 6)                           # all cached: reuses block 0, recomputes block 1
    one = engine.add(p[:8], 6)                         # one cached block: nothing reused, all computed
    run(engine)
    assert again.output == first.output == alone(model, p, 6)
    assert one.output == alone(model, p[:8], 6)
    assert engine.stats['reused_tokens'] == 8 and engine.stats['prefill_tokens'] == 16 + 8 + 8
    # twice at once while cached: both reuse block 0; the recomputed copies of block 1 are theirs
    x, y = engine.add(p, 5), engine.add(p, 5)
    engine.step()
    assert x.blocks[0] == y.blocks[0] and engine.pool.ref[x.blocks[0]] == 2 and x.blocks[1] != y.blocks[1]
    run(engine)
    assert x.output == y.output == first.output[:5]
    assert engine.pool.available() == 20 and len(engine.pool.cached) == 2   # p's blocks (p[:8] is p's block 0)
    engine.forget_prefixes()                           # e.g. new weights: nothing is reused
    z = engine.add(p, 5)
    engine.step()
    check_pool(engine)
    assert z.length == 16 and engine.stats['reused_tokens'] == 8 + 8 + 8
    run(engine)
    assert z.output == first.output[:5] and len(engine.pool.free) == 18 and len(engine.pool.cached) == 2


def test_dynamic_ntk_rope_of_one_request_does_not_depend_on_the_others():
    """Dynamic NTK grows the RoPE base with the longest position in view: each row's own, so a
    short request beside a long one (past the original 16 positions) gets its tokens alone, in the
    engine and in a left-padded generate batch."""
    model = build(**VARIANTS['gqa_rope'], rope_scaling={'type': 'dynamic', 'factor': 4.0,
                                                        'original_max_position_embeddings': 16},
                  init_std=0.3)                        # large weights: tokens that follow the angles
    short, long = shared_prefix_prompts(0, (6, 70), seed=3)
    engine = Engine(model, n_blocks=40, tokens_per_block=8)
    a, b = engine.add(short, 12), engine.add(long, 12)
    run(engine)
    assert a.output == alone(model, short, 12) and b.output == alone(model, long, 12)
    from generate import pad_prompts
    idx, valid = pad_prompts([short, long])
    both = generate(model, idx, 12, temperature=0, prompt_mask=valid)[:, -12:].tolist()
    assert both == [a.output, b.output]


def test_forget_prefixes_while_a_prompt_is_read_names_none_of_its_later_blocks():
    """forget_prefixes() (the weights changed) while a request is still reading its prompt: the
    prompt blocks it reads after that sit on top of blocks of the old weights, so they are never
    offered for reuse; later requests with the same prompt get the new weights' tokens."""
    model = build(**VARIANTS['gqa_rope'])
    p = shared_prefix_prompts(40, (0,))[0]             # 5 blocks of 8
    engine = Engine(model, n_blocks=40, tokens_per_block=8, prefill_chunk=8)
    engine.add(p, 4)
    engine.step()                                      # block 0 read with the old weights
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():                              # new weights (an RL update, a reload) ...
        for w in model.parameters():
            w.add_(0.5 * w.std(unbiased=False) * torch.randn(w.shape, generator=g))
    engine.forget_prefixes()                           # ... so nothing computed so far is reused
    run(engine)
    assert not engine.pool.cached                      # its blocks 1-4 were read after the change
    second = engine.add(p, 8)                          # computes and names every block afresh
    run(engine)
    third = engine.add(p, 8)                           # reuses the second's blocks 0-3
    run(engine)
    assert engine.stats['reused_tokens'] == 32
    assert second.output == third.output == alone(model, p, 8)


@pytest.mark.parametrize('how', ['finish', 'cancel'])
def test_a_block_two_running_requests_share_is_kept_until_both_let_go(how):
    model = build(**VARIANTS['mla_moe'])
    a, b = shared_prefix_prompts(16, (3, 5))           # 2 full blocks of 8 shared
    engine = Engine(model, n_blocks=13, tokens_per_block=8, prefill_chunk=32)
    ra = engine.add(a, 3 if how == 'finish' else 30)   # 22 or 49 tokens: 3 or 7 blocks
    engine.step()                                      # a's prompt read: its blocks named
    rb = engine.add(b, 40)                             # 61 tokens: 8 blocks, 2 of them a's, 6 new
    engine.step()
    shared = ra.blocks[:2]
    assert rb.blocks[:2] == shared and [engine.pool.ref[s] for s in shared] == [2, 2]
    if how == 'cancel':
        engine.cancel(ra)
    else:
        engine.step()                                  # a's third token: it finishes
    assert ra.done and not ra.blocks and [engine.pool.ref[s] for s in shared] == [1, 1]
    assert not set(shared) & (set(engine.pool.free) | set(engine.pool.evictable))
    # a request that takes every block left: if a shared block had been freed it would overwrite it
    rd = engine.add(shared_prefix_prompts(20, (0,), seed=5)[0], 20)   # 40 tokens: the 5 blocks left
    engine.step()
    assert not engine.waiting and engine.pool.available() == 0
    run(engine)
    assert rb.output == alone(model, b, 40) and rd.output == alone(model, rd.prompt, 20)
    if how == 'finish':
        assert ra.output == alone(model, a, 3)
    assert engine.pool.available() == 13 and not any(engine.pool.ref)


def test_a_request_waits_when_the_only_room_is_its_own_cached_prefix():
    model = build(**VARIANTS['gqa_rope'])
    a, c = shared_prefix_prompts(8, (1, 1))            # 2 full blocks of 4 shared
    engine = Engine(model, n_blocks=10, tokens_per_block=4)
    ra = engine.add(a, 3)                              # 12 tokens: 3 blocks
    run(engine)
    rb = engine.add([9] * 20, 8)                       # 28 tokens: 7 blocks, 1 free left + a's 2 cached
    engine.step()
    rc = engine.add(c, 7)                              # 16 tokens: 4 blocks, 2 of them a's cached ones
    engine.step()                                      # the 2 new ones are not there: reusing its prefix
    check_pool(engine)                                 # does not make room
    assert engine.waiting == [rc] and len(engine.pool.evictable) == 2
    run(engine)
    assert engine.stats['reused_tokens'] == 8
    for r, p in ((ra, a), (rb, rb.prompt), (rc, c)):
        assert r.output == alone(model, p, r.max_new_tokens)


# Steps in fixed shapes (cuda_graph=True): the rows padded to a bucket, the columns to a token
# bucket (1 for a decode step), full-width block tables, the inputs copied into tensors made once
# per (rows, columns) bucket; on the CPU they run eagerly. With prompt_rows=True a prompt's tokens
# are rows of the one-column pass instead.

STATIC_VARIANTS = {k: VARIANTS[k] for k in ('gpt2', 'gqa_rope', 'mla_moe')}
STATIC_VARIANTS['window'] = dict(VARIANTS['gqa_rope'], sliding_window=12, n_sink_tokens=2)


def spy_on_static_steps(engine):
    """Record (rows, rows bucket, longest row's tokens, columns bucket) of every static step,
    checking that the scratch block is in no request's table and every block is where the pool says."""
    sizes, real = [], engine.static_step

    def static_step(rows, feed, starts=None):
        assert all(engine.pool.scratch not in r.blocks for r in engine.running)
        check_pool(engine)
        # prompt chunks and one-token rows never share a pass (no decoding row padded to a chunk)
        assert all(len(f) > 1 for f in feed) or all(len(f) == 1 for f in feed), [len(f) for f in feed]
        T = max(map(len, feed))
        sizes.append((len(rows), engine.bucket(len(rows)), T, engine.token_bucket(T)))
        return real(rows, feed, starts)
    engine.static_step = static_step
    return sizes


def first_alone_then_mixed_arrivals(model, **engine_kw):
    """A 1-token prompt alone (its first step is a decode step, before any step has made the pools),
    then mixed_arrivals. Returns the engine, its static steps (see spy_on_static_steps), the
    requests, the prompts."""
    engine = Engine(model, n_blocks=40, tokens_per_block=8, prefill_chunk=16, **engine_kw)
    sizes = spy_on_static_steps(engine)
    first = engine.add([7], 10)
    engine.run()
    requests, prompts = mixed_arrivals(engine)
    return engine, sizes, [first] + requests, [[7]] + prompts


def assert_same_blocks(engine, eager):
    """Every pool block but the scratch one as the eager engine leaves it: the padding rows' and
    padding columns' writes landed in the scratch block only."""
    n = engine.pool.n_blocks
    assert eager.pool.tensors.keys() == engine.pool.tensors.keys()
    for key, pool in engine.pool.tensors.items():
        torch.testing.assert_close(pool[:n], eager.pool.tensors[key][:n])


@pytest.mark.parametrize('variant', STATIC_VARIANTS)
def test_static_steps_give_each_request_its_tokens_alone(variant):
    """cuda_graph=True, prompt_rows=False on the CPU: the static path, eagerly, for every step: decode steps and
    steps with prompt chunks (prompts of 23 and 40 tokens read in chunks of 16, the last 7 of the
    23 padded to 8 columns, two prompts' chunks in one pass), each run apart from the step's
    decoding rows, with batches of 3 and 5 rows (padded to 4 and 8) and lengths crossing block
    boundaries (blocks of 8)."""
    model = build(**STATIC_VARIANTS[variant])
    engine, sizes, requests, prompts = first_alone_then_mixed_arrivals(model, cuda_graph=True, prompt_rows=False)
    for r, p in zip(requests, prompts):
        assert r.done and r.output == alone(model, p, r.max_new_tokens), (variant, r.id)
    s = engine.stats
    assert s['static_steps'] == len(sizes) >= 10 and s['eager_steps'] == 0     # every step in fixed shapes
    assert s['static_prefill_steps'] == sum(Tb > 1 for *_, Tb in sizes) >= 4
    assert {(3, 4), (5, 8)} <= {(B, Bb) for B, Bb, _, _ in sizes}              # padding rows
    assert (1, 1, 7, 8) in sizes and (2, 2, 16, 16) in sizes   # padding columns (23 = 16 + 7); two chunks
    assert engine.token_buckets == (1, 8, 16) and {(1, 1), (1, 8), (2, 16), (8, 1)} <= set(engine.static)
    assert s['graph_captures'] == 0                                            # no graph off CUDA
    assert engine.pool.available() == 40 and not any(engine.pool.ref) and not engine.running
    eager, no_static, _, _ = first_alone_then_mixed_arrivals(model)
    assert not no_static and eager.stats['static_steps'] == eager.stats['static_prefill_steps'] == 0
    assert_same_blocks(engine, eager)
    assert sorted(engine.pool.take(40)) == list(range(40))            # every block, not the scratch one


@pytest.mark.parametrize('variant', STATIC_VARIANTS)
def test_prompt_tokens_as_rows_of_one_column_steps_give_each_request_its_tokens_alone(variant):
    """prompt_rows (the default with cuda_graph) on the CPU: every step one one-column pass whose rows are the decoding
    requests' tokens and up to prefill_chunk (16) prompt tokens in all, each at its own slot:
    prompts of 5 and 23 tokens arriving together read as 5 + 11, then 12 beside the first one's
    decoding; a 1-token prompt and a 40-token one as 1 + 15, then 16, then 9 beside the first 7 of
    a 9-token prompt, whose last 2 come next (the budget is shared, first come first served);
    batches of 3, 5, 13, 16 and 19 rows padded to 4, 8, 16 and 32; lengths crossing block
    boundaries (blocks of 8). The pool ends as the eager engine
    leaves it. Refused without fixed shapes, and for dynamic NTK RoPE (whose default is the chunk passes)."""
    model = build(**STATIC_VARIANTS[variant])
    engine, sizes, requests, prompts = first_alone_then_mixed_arrivals(model, cuda_graph=True)   # (the default)
    for r, p in zip(requests, prompts):
        assert r.done and r.output == alone(model, p, r.max_new_tokens), (variant, r.id)
    s = engine.stats
    assert s['static_steps'] == len(sizes) >= 10 and s['eager_steps'] == s['static_prefill_steps'] == 0
    assert s['prompt_row_steps'] == 7 and engine.max_rows == 64 + 16       # (two 1-token prompts among them)
    assert {T for _, _, T, _ in sizes} == {1} and {Tb for _, Tb in engine.static} == {1}   # one column
    assert {(3, 4), (5, 8), (13, 16), (16, 16), (19, 32)} <= {(B, Bb) for B, Bb, _, _ in sizes}
    assert max(B for B, *_ in sizes) <= len(requests) - 1 + 16
    assert engine.pool.available() == 40 and not any(engine.pool.ref) and not engine.running
    eager, _, _, _ = first_alone_then_mixed_arrivals(model)
    assert_same_blocks(engine, eager)
    dynamic = build(**VARIANTS['gqa_rope'], rope_scaling={'type': 'dynamic', 'factor': 4.0,
                                                          'original_max_position_embeddings': 16})
    assert not Engine(dynamic, cuda_graph=True).prompt_rows and not Engine(model).prompt_rows
    for bad in (dict(model=model), dict(model=dynamic, cuda_graph=True)):
        with pytest.raises(ValueError, match='prompt_rows puts prompt tokens in the fixed-shape'):
            Engine(**bad, prompt_rows=True)


def test_prompt_rows_read_at_most_prefill_chunk_prompt_tokens_a_step_in_all():
    """The budget counts every prompt being read, one-token prompts too: five 1-token prompts and a
    20-token one with prefill_chunk=2 read 2 prompt tokens a step (first come, first served), and
    every request gets its tokens alone."""
    model = build(**VARIANTS['gqa_rope'], init_std=0.3)
    engine = Engine(model, n_blocks=40, tokens_per_block=4, prefill_chunk=2, cuda_graph=True)
    sizes = spy_on_static_steps(engine)
    prompts = [[3], [14], [15], [92], [65], list(range(30, 50))]
    requests = [engine.add(p, 6) for p in prompts]
    engine.run()
    for r, p in zip(requests, prompts):
        assert r.output == alone(model, p, 6)
    assert [B for B, *_ in sizes[:3]] == [2, 2 + 2, 2 + 4]    # 2 prompt tokens beside 0, 2, 4 decoding
    assert engine.stats['prompt_row_steps'] == 3 + 20 // 2 - 1 + 1


@pytest.mark.parametrize('prompt_rows', [False, True])
@pytest.mark.parametrize('variant', ['gpt2', 'mla_moe', 'window'])
def test_static_steps_with_prefix_sharing_start_rows_past_their_reused_blocks(variant, prompt_rows):
    """Prefix sharing with cuda_graph=True: rows whose prompt chunks start at a nonzero length
    (3 reused blocks of 8), a suffix longer than prefill_chunk, prompts made of a cached prefix;
    the prompts read in passes of their own, or (prompt_rows) as rows of the one-column pass."""
    model = build(**STATIC_VARIANTS[variant])
    prompts = shared_prefix_prompts(29, (3, 11, 1, 20, 6))
    n_new, arrive_at = [15, 9, 20, 6, 12], [0, 0, 4, 5, 9]
    kw = dict(n_blocks=40, tokens_per_block=8, prefill_chunk=16)
    static, graphed = run_arrivals(model, prompts, n_new, arrive_at, cuda_graph=True, prompt_rows=prompt_rows, **kw)
    eager, plain = run_arrivals(model, prompts, n_new, arrive_at, **kw)
    for i, p in enumerate(prompts):
        assert graphed[i].output == plain[i].output == alone(model, p, n_new[i]), (variant, i)
    assert static.stats['reused_tokens'] == eager.stats['reused_tokens'] == 3 * 24
    prompt_steps = static.stats['prompt_row_steps' if prompt_rows else 'static_prefill_steps']
    assert static.stats['eager_steps'] == 0 < prompt_steps < static.stats['static_steps']
    assert_same_blocks(static, eager)


def test_a_static_step_fills_each_row_left_padded_and_writes_padding_to_the_scratch_block():
    """The inputs of one (4 rows, 8 columns) step, read back: row 0 feeds 5 tokens from slot 3
    (crossing into its second block), row 1 one token from slot 8 (its second block's first slot),
    rows 2 and 3 are padding."""
    from engine import Request, StaticPagedCache
    engine = Engine(build(), n_blocks=10, tokens_per_block=4, prefill_chunk=8)
    a = Request([1], 8, blocks=[5, 2, 9], length=3)
    b = Request([1], 8, blocks=[4, 7, 0], length=8)
    cache = StaticPagedCache(engine.pool, 4, 8, engine.width, 'cpu')
    cache.fill([a, b], [[11, 12, 13, 14, 15], [16]])
    s = engine.pool.scratch
    assert cache.tokens.tolist() == [[0, 0, 0, 11, 12, 13, 14, 15], [0] * 7 + [16], [0] * 8, [0] * 8]
    assert cache.length.tolist() == [3, 8, 0, 0] and cache.n.tolist() == [5, 1, 0, 0]
    assert cache.table.tolist() == [[5, 2, 9] + [s] * 21, [4, 7, 0] + [s] * 21] + [[s] * 24] * 2
    assert cache.block.tolist() == [[s, s, s, 5, 2, 2, 2, 2], [s] * 7 + [0], [s] * 8, [s] * 8]
    assert cache.offset.tolist()[:2] == [[0, 0, 0, 3, 0, 1, 2, 3], [0] * 8]
    cache.fill([])                                     # every row parked on the scratch block
    assert cache.table.unique().tolist() == cache.block.unique().tolist() == [s] and not cache.n.any()
    # one column, a's three prompt tokens as rows from slots 3, 4, 5 (crossing into its second
    # block) beside b's one token (prompt_rows): each row its own slot, one new token, its request's table
    rows = StaticPagedCache(engine.pool, 8, 1, engine.width, 'cpu')
    rows.fill([a, a, a, b], [[11], [12], [13], [16]], starts=[3, 4, 5, 8])
    assert rows.tokens[:, 0].tolist() == [11, 12, 13, 16, 0, 0, 0, 0]
    assert rows.length.tolist()[:4] == [3, 4, 5, 8] and rows.n.tolist() == [1] * 4 + [0] * 4
    assert rows.block[:, 0].tolist() == [5, 2, 2, 0] + [s] * 4 and rows.offset[:4, 0].tolist() == [3, 0, 1, 0]
    assert rows.table[:3].tolist() == [[5, 2, 9] + [s] * 21] * 3
    rows.end()
    assert (a.length, b.length) == (6, 9)


def test_sampling_with_static_steps_follows_the_same_seeds():
    """Seeded sampling, prompts of 3 to 5 tokens read in one step of 8 columns, then decode steps,
    and a request arriving while the others decode (a prompt chunk of 9 beside them); the same
    with the prompt tokens as rows of the one-column steps (prompt_rows)."""
    model = build(**VARIANTS['mla_moe'])
    outputs = {}
    for graph in (False, True, 'prompt_rows'):
        engine = Engine(model, n_blocks=30, tokens_per_block=8, cuda_graph=bool(graph),
                        prompt_rows=graph == 'prompt_rows')
        reqs = [engine.add([3, 1, 4, 1, 5][:i + 3], 12, temperature=1.0, top_k=20, seed=10 + i) for i in range(3)]
        reqs.append(engine.add([2, 7], 12))                           # a greedy row beside them
        for _ in range(4):
            engine.step()
        reqs.append(engine.add([9, 2, 6, 5, 3, 5, 8, 9, 7], 10, temperature=0.8, top_p=0.9, seed=3))
        engine.run()
        outputs[graph] = [r.output for r in reqs]
        s = engine.stats
        assert (s['static_steps'] > 0) == (s['eager_steps'] == 0) == bool(graph)
        assert s['static_prefill_steps'] == 2 * (graph is True) and s['prompt_row_steps'] == 2 * (graph == 'prompt_rows')
    assert outputs[True] == outputs[False] == outputs['prompt_rows'] and outputs[True][0] != outputs[True][1]


def test_compiled_static_steps_give_each_request_its_tokens_alone():
    """compile_step=True: the fixed-shape steps through torch.compile (on the CPU without graphs):
    a prompt read in an 8-column step, then decode steps of 1 and 2 rows (a second request arriving
    with its prompt chunk beside the first's decoding): every request gets its tokens alone, in
    fixed shapes. Refused without cuda_graph (there are no fixed shapes to compile)."""
    model = build(**VARIANTS['gqa_rope'])
    torch._dynamo.utils.counters.clear()
    engine = Engine(model, n_blocks=20, tokens_per_block=8, prefill_chunk=8, cuda_graph=True, compile_step=True,
                    prompt_rows=False)
    prompts = [[5, 3, 9, 1, 4], [7, 7, 2]]
    first = engine.add(prompts[0], 6)
    engine.step()
    second = engine.add(prompts[1], 5)
    engine.run()
    for r, p in zip((first, second), prompts):
        assert r.done and r.output == alone(model, p, r.max_new_tokens)
    assert engine.stats['static_steps'] > 0 and engine.stats['eager_steps'] == 0
    assert engine.static_forward is not static_forward
    buckets = set(engine.static)                                        # the (rows, columns) shapes used,
    assert len(buckets) >= 2 and torch._dynamo.utils.counters['stats']['unique_graphs'] >= len(buckets)   # each compiled
    with pytest.raises(ValueError, match='needs cuda_graph=True'):
        Engine(model, n_blocks=20, tokens_per_block=8, compile_step=True)


# Overlap: each step's tokens stay on the device and are read back one step late.

@pytest.mark.parametrize('variant', ['gqa_rope', 'mla_moe'])
@pytest.mark.parametrize('cuda_graph', [False, True])
def test_overlap_reads_tokens_a_step_late_and_each_request_gets_its_tokens_alone(variant, cuda_graph):
    """With overlap the first step returns no token (its tokens are still on the device) and a
    one-token prompt's first token comes with the second step; mixed arrivals (prompt chunks
    beside decoding, eager or fixed-shape steps) give every request its tokens alone, and every
    block goes back; the decoding rows' inputs come from the step before's tokens on the device."""
    model = build(**VARIANTS[variant])
    engine = Engine(model, n_blocks=40, tokens_per_block=8, prefill_chunk=16, cuda_graph=cuda_graph, overlap=True)
    first = engine.add([7], 3)
    assert engine.step() == [] and first.in_flight == 1 and not first.output
    assert engine.step() == [(first, alone(model, [7], 1)[0], False)]
    engine.run()
    requests, prompts = mixed_arrivals(engine)
    for r, p in zip([first] + requests, [[7]] + prompts):
        assert r.done and r.in_flight == 0 and r.output == alone(model, p, r.max_new_tokens), (variant, r.id)
    assert engine.pool.available() == 40 and not any(engine.pool.ref) and not engine.running
    assert engine.stats['decode_tokens'] == sum(r.max_new_tokens - 1 for r in [first] + requests)   # none wasted


def test_overlap_a_stop_token_read_late_drops_the_extra_token_and_the_blocks_serve_the_next_request():
    """A stop token is seen a step after it was sampled, when the request has already fed it
    once more: that step's token is dropped, its blocks go back, and the request waiting for
    them (admitted into the blocks the extra step wrote) gets its tokens alone."""
    model = build(**VARIANTS['mla'], tie_word_embeddings=False)          # (tied, it repeats its input)
    ref = alone(model, [7, 8, 9], 12)
    k = next(k for k in range(2, 12) if ref[k] not in ref[:k])          # a token first sampled at step k
    engine = Engine(model, n_blocks=6, tokens_per_block=4, cuda_graph=True, overlap=True)
    a = engine.add([7, 8, 9], 20, stop_ids=[ref[k]])                     # 23 tokens: all 6 blocks
    b = engine.add([5, 6], 20)
    most = 0
    while engine.waiting or engine.running:
        engine.step()
        most = max(most, a.in_flight + len(a.output))
        check_pool(engine)
    assert a.output == ref[:k + 1] and a.in_flight == 0                  # the stop token ends it
    assert most == k + 2                                                 # after one step more
    assert b.output == alone(model, [5, 6], 20) and engine.pool.available() == 6


def test_overlap_sampling_and_cancelling_a_request_while_its_token_is_on_the_device():
    """Seeded sampling gives the same tokens with and without overlap; a request cancelled while
    its next token is still on the device gives its blocks back and no more tokens."""
    model = build(**VARIANTS['mla_moe'])
    outputs = {}
    for overlap in (False, True):
        engine = Engine(model, n_blocks=30, tokens_per_block=8, cuda_graph=True, overlap=overlap)
        reqs = [engine.add([3, 1, 4, 1, 5][:i + 3], 12, temperature=1.0, top_k=20, seed=10 + i) for i in range(3)]
        reqs.append(engine.add([2, 7], 12))
        for _ in range(4):
            engine.step()
        gone = engine.add([9, 2, 6], 10)
        engine.step()
        engine.step()
        assert gone.in_flight == int(overlap)
        engine.cancel(gone)
        check_pool(engine)
        seen = len(gone.output)
        engine.run()
        assert len(gone.output) == seen and engine.pool.available() == 30
        outputs[overlap] = [r.output for r in reqs]
    assert outputs[True] == outputs[False] and outputs[True][0] != outputs[True][1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('variant', ['gqa_rope', 'mla_moe'])
def test_cuda_graph_steps_equal_the_eager_engine_and_are_captured_once_per_bucket(variant, monkeypatch):
    """prompt_rows=False on CUDA in float32: every step replays one captured graph per (rows, columns) bucket,
    decode steps and steps with prompt chunks alike, captured at its first use (the first one
    before any step has made the pools) and reused by later requests: the tokens of the eager
    engine and of the same static steps without a graph. capture_graphs() captures every rows
    bucket's decode step at once (the prompt-chunk buckets still at their first use), with
    prefill=True every pair; model.cpu().cuda() (new tensors, same values) captures again. With
    overlap (tokens read back a step late, through pinned buffers) the tokens are the same."""
    import engine as engine_module
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    model = build(**VARIANTS[variant]).cuda()

    def capturable(pairs):
        return {(Bb, Tb) for Bb, Tb in pairs if engine_module.graph_capturable(model, Bb * Tb)}

    def serve(cuda_graph, upfront=None, overlap=False):
        engine = Engine(model, n_blocks=40, tokens_per_block=8, max_batch=8, prefill_chunk=16, cuda_graph=cuda_graph,
                        overlap=overlap, prompt_rows=False if cuda_graph else None)
        if upfront is not None:
            engine.capture_graphs(prefill=upfront)
        first = engine.add([7], 10)                    # alone: its first step is a decode step
        engine.run()
        requests, _ = mixed_arrivals(engine)
        assert engine.pool.available() == 40
        return engine, [r.output for r in [first] + requests]

    _, eager = serve(False)
    engine, graphed = serve(True)
    assert graphed == eager and engine.stats['eager_steps'] == 0
    _, overlapped = serve(True, overlap=True)          # read back a step late: pinned buffers, events
    assert overlapped == eager
    used = capturable(engine.static)
    # a prompt-chunk bucket replayed as a graph (for the MoE in float32 on CUDA only steps of at
    # most E / K tokens are capturable: the gathered experts; grouped_mm takes bf16)
    assert {(Bb, Tb) for Bb, Tb in used if Tb > 1} or variant == 'mla_moe'
    assert {key for key, c in engine.static.items() if c.graph is not None} == used
    assert engine.stats['graph_captures'] == len(used) < engine.stats['static_steps']
    with monkeypatch.context() as m:                   # the same static steps, no graph
        m.setattr(engine_module, 'graph_capturable', lambda *a, **kw: False)
        without, static = serve(True)
    assert static == graphed and without.stats['graph_captures'] == 0
    upfront, again = serve(True, upfront=False)        # decode buckets up front, the rest at first use
    decode = capturable((Bb, 1) for Bb in (1, 2, 4, 8))
    assert again == graphed and upfront.stats['graph_captures'] == len(decode | used)
    every, all_pairs = serve(True, upfront=True)       # every pair up front: none captured later
    pairs = capturable((Bb, Tb) for Bb in (1, 2, 4, 8) for Tb in (1, 8, 16))
    assert all_pairs == graphed and every.stats['graph_captures'] == len(pairs)
    model.cpu().cuda()                                 # a move: captured again (even at reused addresses)
    r = upfront.add([7], 10)
    upfront.run()
    n = len(decode | used)
    assert r.output == eager[0] and upfront.stats['graph_captures'] == n + 1
    r = upfront.add([7, 8, 9], 10)                     # a prompt chunk of 3: bucket (1, 8) again
    upfront.run()
    assert r.output == alone(model, [7, 8, 9], 10)
    assert upfront.stats['graph_captures'] == n + 1 + len(capturable([(1, 8)]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('variant', ['gqa_rope', 'mla_moe'])
def test_cuda_graph_steps_with_prompt_tokens_as_rows_equal_the_eager_engine(variant, monkeypatch):
    """prompt_rows=True on CUDA in float32: every step is one one-column pass; capture_graphs()
    captures all of them up front, one graph per rows bucket up to max_batch + prefill_chunk
    (8 + 16), and none is captured later; with and without overlap the tokens are the eager
    engine's, and so is every pool block (weights large enough that the tokens follow the context)."""
    import engine as engine_module
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    model = build(**VARIANTS[variant], init_std=0.3).cuda()
    outputs, engines, kw = {}, {}, dict(n_blocks=40, tokens_per_block=8, max_batch=8, prefill_chunk=16)
    for graph, overlap in ((False, False), (True, False), (True, True)):
        engine = engines[graph, overlap] = Engine(model, cuda_graph=graph, overlap=overlap, prompt_rows=graph, **kw)
        engine.capture_graphs()
        captured = engine.stats['graph_captures']
        requests, _ = mixed_arrivals(engine)
        outputs[graph, overlap] = [r.output for r in requests]
        assert engine.pool.available() == 40 and engine.stats['graph_captures'] == captured
    for key, pool in engines[True, False].pool.tensors.items():           # every block but the scratch one
        torch.testing.assert_close(pool[:40], engines[False, False].pool.tensors[key][:40], rtol=1e-4, atol=1e-4)
    buckets = {(Bb, 1) for Bb in (1, 2, 4, 8, 16, 24)}
    assert set(engine.static) == buckets and engine.stats['eager_steps'] == engine.stats['static_prefill_steps'] == 0
    assert captured == len({k for k in buckets if engine_module.graph_capturable(model, k[0])}) > 0
    assert engine.stats['prompt_row_steps'] > 0
    assert outputs[True, False] == outputs[True, True] == outputs[False, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('variant', ['gqa_rope', 'mla_moe'])
def test_compiled_graphed_steps_give_the_eager_engines_tokens(variant, monkeypatch):
    """compile_step=True on CUDA in float32: each bucket's step fused by torch.compile, then
    captured and replayed; mixed arrivals get the eager engine's tokens, every step in a graph
    where one can hold it."""
    import engine as engine_module
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    model = build(**VARIANTS[variant]).cuda()
    outputs = {}
    for compiled in (None, True):
        engine = Engine(model, n_blocks=40, tokens_per_block=8, max_batch=8, prefill_chunk=16,
                        cuda_graph=compiled is not None, compile_step=bool(compiled))
        requests, _ = mixed_arrivals(engine)
        outputs[compiled] = [r.output for r in requests]
        assert engine.pool.available() == 40
    used = {k for k in engine.static if engine_module.graph_capturable(model, k[0] * k[1])}
    assert outputs[True] == outputs[None] and engine.stats['graph_captures'] == len(used) > 0
