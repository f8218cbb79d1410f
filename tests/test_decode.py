"""The fast decode path: the static KV cache (what a CUDA graph replays) against the growing one,
generation with cuda_graph=True (static steps; a graph only on CUDA, see test_cuda.py), and the
model in bf16 for inference with its float32 buffers kept."""

import pytest
import torch

import copy

from generate import KVCache, decode_graphs, generate_tokens, new_cache, pad_prompts, penalize
from model import GPT, ModelConfig

BASE = dict(vocab_size=96, block_size=48, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
CONFIGS = {
    'gqa': dict(BASE, n_kv_head=2, pos_emb='rope', norm='rmsnorm', mlp='swiglu'),
    'gpt2': dict(BASE, pos_emb='learned', norm='layernorm', mlp='gelu', bias=True),
    'mla_moe': dict(BASE, attention='mla', pos_emb='rope', norm='rmsnorm', mlp='swiglu', q_lora_rank=16,
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                    scoring_func='sigmoid', first_k_dense_replace=1, moe_impl='grouped'),
    'window': dict(BASE, pos_emb='rope', norm='rmsnorm', mlp='swiglu', sliding_window=8, n_sink_tokens=2),
}


def build(name, **kw):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**CONFIGS[name], **kw})).eval()
    with torch.no_grad():                                # a router bias that changes the choice
        for m in model.moe_layers():
            m.router.e_score_correction_bias.copy_(torch.randn(m.E) * 0.05)
    return model


def prompts():
    """Three left-padded prompts of different lengths."""
    g = torch.Generator().manual_seed(1)
    return pad_prompts([torch.randint(0, 96, (n,), generator=g).tolist() for n in (5, 9, 2)])


@pytest.mark.parametrize('name', ['gqa', 'gpt2', 'mla_moe'])
def test_static_cache_equals_growing_cache(name):
    """Prefill then one token at a time: the static cache (fixed buffers, positions on the
    device, every slot attended with a mask) gives the growing cache's logits."""
    model = build(name)
    idx, mask = prompts()
    B, P = idx.shape
    steps = torch.randint(0, 96, (B, 12), generator=torch.Generator().manual_seed(2))
    out = {}
    with torch.no_grad():
        for static in (False, True):
            cache = new_cache(model, B, P + 12, 'cpu', mask, static=static)
            logits = [model(idx, cache=cache)[0]]
            logits += [model(steps[:, t:t + 1], cache=cache)[0] for t in range(12)]
            out[static] = torch.cat(logits, 1)
            assert cache.pos == P + 12
    # every real position, the prompts' included (their left padding attends nothing: excluded)
    real = torch.cat([mask, torch.ones(B, 12, dtype=torch.bool)], 1)
    torch.testing.assert_close(out[True][real], out[False][real], atol=2e-5, rtol=1e-4)


def test_static_cache_buffers_stay_in_place_and_reset():
    model = build('gqa')
    idx, mask = prompts()
    cache = new_cache(model, 3, 20, 'cpu', mask, static=True)
    with torch.no_grad():
        model(idx, cache=cache)
        ptrs = {k: v.data_ptr() for k, v in cache.buffers.items()}
        first = model(idx[:, -1:], cache=cache)[0]
        cache.reset(mask)                                # a graph keeps pointing at the same memory
        assert cache.pos == 0 and int(cache.pos_t) == 0 and (cache.slot_pos == -1).all()
        model(idx, cache=cache)
        again = model(idx[:, -1:], cache=cache)[0]
    assert {k: v.data_ptr() for k, v in cache.buffers.items()} == ptrs
    torch.testing.assert_close(again, first)
    with pytest.raises(RuntimeError, match='overflow'):
        with torch.no_grad():
            for _ in range(20):
                model(idx[:, -1:], cache=cache)


def test_static_cache_refuses_a_rolling_window():
    with pytest.raises(ValueError, match='rolling'):
        KVCache(1, 100, 'cpu', window=8, n_sink=2, static=True)


@pytest.mark.parametrize('name', ['gqa', 'gpt2', 'mla_moe', 'window'])
def test_generation_with_static_steps_equals_default(name):
    """Greedy tokens with cuda_graph=True (on the CPU: the static cache without a graph) equal the
    default path, for padded prompts, a stop token, and past block_size (the restart re-encodes
    into the same buffers)."""
    model = build(name)
    idx, mask = prompts()
    out = {}
    for graph in (False, True):
        new = list(generate_tokens(model, idx, 70, temperature=0.0, prompt_mask=mask, cuda_graph=graph))
        out[graph] = torch.stack(new, 1)
    assert out[True].shape == (3, 70)                    # 9 + 70 tokens: past block_size 48
    assert torch.equal(out[True], out[False])
    stop = int(out[False][0, 3])                         # a token the first row emits early
    a = torch.stack(list(generate_tokens(model, idx, 20, temperature=0.0, prompt_mask=mask, stop_ids=stop)), 1)
    b = torch.stack(list(generate_tokens(model, idx, 20, temperature=0.0, prompt_mask=mask, stop_ids=stop,
                                               cuda_graph=True)), 1)
    assert torch.equal(a, b)
    for none in ([], ()):                                # no stop ids, as the engine passes them: no stop
        c = torch.stack(list(generate_tokens(model, idx, 20, temperature=0.0, prompt_mask=mask, stop_ids=none)), 1)
        assert torch.equal(c, out[False][:, :20])


def test_sampling_with_static_steps_equals_default():
    model = build('mla_moe')
    idx, mask = prompts()
    out = []
    for graph in (False, True):
        g = torch.Generator().manual_seed(7)
        out.append(torch.stack(list(generate_tokens(model, idx, 16, temperature=1.0, top_k=20, prompt_mask=mask,
                                                          generator=g, cuda_graph=graph)), 1))
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize('name', ['gqa', 'mla_moe'])
def test_bf16_inference_keeps_float32_buffers(name):
    """model.to(torch.bfloat16) for decoding: the weights become bf16, but RoPE frequencies and the
    router biases stay float32 and exact (bf16 would move angles p * theta by radians and lose
    the bias steps of 0.001); logits stay close to float32's."""
    model = build(name)
    before = {n: b.clone() for n, b in model.named_buffers() if 'inv_freq' in n or 'correction_bias' in n}
    assert before
    idx = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(idx)[0]
        model.to(torch.bfloat16)
        assert model.lm_head.weight.dtype == torch.bfloat16
        for n, b in model.named_buffers():
            if n in before:
                assert b.dtype == torch.float32 and torch.equal(b, before[n]), n
        low = model(idx)[0]
        cache = new_cache(model, 2, 40, 'cpu', static=True)
        parts = [model(idx[:, :30], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(30, 40)]
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()   # noqa: E731
    assert rel(low, ref) < 3e-2
    assert rel(torch.cat(parts, 1), ref) < 3e-2
    model.to(torch.float32)                              # and back: buffers untouched
    for n, b in model.named_buffers():
        if n in before:
            assert torch.equal(b, before[n]), n


@pytest.mark.parametrize('graph', [False, True])
def test_no_forward_pass_for_a_token_never_used(graph):
    """n new tokens take the prefill and n - 1 one-token steps, not n."""
    model = build('gqa')
    idx, mask = prompts()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    new = list(generate_tokens(model, idx, 5, temperature=0.0, prompt_mask=mask, cuda_graph=graph))
    assert len(new) == 5 and len(calls) == 5


def test_decode_graphs_keep_a_step_only_for_the_tensors_it_was_captured_on():
    """The bookkeeping behind reusing a captured decode step (the graphs themselves need CUDA:
    test_cuda.py): a step is handed to one caller at a time; weights changed in place keep it;
    new tensors (model.to, replaced parameters) or another autocast setting do not."""
    model = build('mla_moe')
    graphs = decode_graphs(model)
    sig = graphs.signature(model)
    graphs.give_back(model, 'a', 'step a', sig)
    assert graphs.take('a', sig) == 'step a'
    assert graphs.take('a', sig) is None                # handed out: a second caller makes its own
    graphs.give_back(model, 'a', 'step a', sig)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)                  # an optimizer step: same memory
    assert graphs.signature(model) == sig
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=True):
        assert graphs.signature(model) != sig
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    assert graphs.take('a', graphs.signature(model)) is None
    graphs.give_back(model, 'a', 'step a', sig)          # captured on the old tensors: not kept
    assert graphs.steps == {}
    sig = graphs.signature(model)
    for k in 'abcde':                                   # the latest max_steps (4) kept
        graphs.give_back(model, k, 'step ' + k, sig)
    assert list(graphs.steps) == list('bcde')
    assert decode_graphs(copy.deepcopy(model)).steps == {}
    model.to(torch.float64)
    assert graphs.steps == {}


def test_speculative_decoding_with_the_mtp_modules_is_greedy_decoding(tmp_path, byte_data):
    """A model trained with 2 MTP modules drafts 2 tokens a step and checks them in one forward
    pass: the tokens are greedy decoding's, exactly; on this repetitive text most drafts are kept,
    so fewer forward passes than tokens. A random model's drafts are mostly rejected: the same
    tokens all the same."""
    from checkpoint import load_model
    from conftest import TINY_MODEL, run_script, run_script_many
    from generate import generate, generate_speculative
    run_script('train.py', f'--data_dir={byte_data}', '--out_dir=mtp', *TINY_MODEL, '--block_size=64',
               '--pos_emb=rope', '--norm=rmsnorm', '--mtp_depth=2', '--max_iters=150', '--eval_interval=150',
               '--learning_rate=3e-3', cwd=tmp_path)
    model, _, _ = load_model(str(tmp_path / 'mtp'))
    model.eval()
    for m in (model, build('mla_moe', mtp_depth=1, block_size=64)):
        for prompt in ([65, 32, 90], [t % 96 for t in b'Once upon a time, there was a little']):
            ours, stats = generate_speculative(m, prompt, 24)
            assert ours == generate(m, torch.tensor([prompt]), 24, temperature=0)[0, len(prompt):].tolist()
            assert stats['forward_passes'] <= 24 and stats['drafted'] >= stats['accepted'] >= 0
    ours, stats = generate_speculative(model, list(b'Once upon a time, there was a little'), 24)
    assert stats['accepted'] / stats['drafted'] > 0.3 and stats['forward_passes'] < 20, stats
    with pytest.raises(ValueError, match='the model has none'):
        generate_speculative(build('gqa'), [1, 2], 4)
    # sample.py --speculative=True prints greedy decoding's text and the acceptance
    args = ('--out_dir=mtp', '--start=Once upon a', '--max_new_tokens=20', '--temperature=0', '--num_samples=1',
            '--device=cpu', '--stop_at_eot=False')
    greedy, spec, bad, long, penalised, bad_penalty, two, compiled = run_script_many('sample.py', [
        args, [*args, '--speculative=True'], ['--out_dir=mtp', '--speculative=True'],
        ['--out_dir=mtp', '--speculative=True', '--temperature=0', '--max_new_tokens=256', '--stop_at_eot=False'],
        [*args, '--presence_penalty=100'], [*args, '--speculative=True', '--frequency_penalty=1'],
        [*args, '--speculative=True', '--num_samples=2'], [*args, '--compile_decode=True', '--cuda_graph=False']],
        cwd=tmp_path)
    assert greedy.returncode == spec.returncode == 0, (greedy.stderr, spec.stderr)
    assert spec.stdout.strip() == greedy.stdout.split('-' * 40)[0].strip()
    assert 'drafted tokens accepted' in spec.stderr
    assert bad.returncode != 0 and 'set --temperature=0' in bad.stderr + bad.stdout
    # more new tokens than the context has room for: capped at the room, said on stderr
    assert long.returncode == 0 and 'speculative: at most 63 new tokens' in long.stderr, long.stderr
    assert 'drafted tokens accepted' in long.stderr and ', 63 tokens in' in long.stderr + long.stdout
    text = penalised.stdout.split('-' * 40)[0].strip()                # bytes: no byte twice in the answer
    assert penalised.returncode == 0 and text != greedy.stdout.split('-' * 40)[0].strip()
    assert len(set(text[len('Once upon a'):])) == len(text) - len('Once upon a'), text
    assert bad_penalty.returncode != 0 and 'no frequency_penalty' in bad_penalty.stderr
    # settings that would do nothing are refused (num_samples's default of 3 gives one answer, unasked)
    assert two.returncode != 0 and 'writes the one greedy answer (not num_samples=2)' in two.stderr
    assert compiled.returncode != 0 and 'it needs cuda_graph=True' in compiled.stderr


def test_speculative_decoding_at_the_edges():
    """Greedy decoding's tokens also with a sliding window (its rolling cache cannot forget rejected
    drafts: a plain cache is used), to the last position of the context, and with a padded
    vocabulary (ids past vocab_limit are never chosen, as in generate); dynamic NTK is refused (its
    RoPE base follows the longest position of a forward pass: a verify pass is not one-token steps)."""
    from generate import generate, generate_speculative
    window = build('window', mtp_depth=2)
    prompt = list(range(10, 30))
    ours, _ = generate_speculative(window, prompt, 28)                  # 20 + 28 = block_size 48
    assert ours == generate(window, torch.tensor([prompt]), 28, temperature=0)[0, 20:].tolist()
    padded = build('mla_moe', mtp_depth=1)
    first = generate(padded, torch.tensor([prompt]), 1, temperature=0)[0, -1]
    with torch.no_grad():                   # ids 90-95: padding, scoring 1.5x the first greedy token
        padded.lm_head.weight[90:] = 1.5 * padded.lm_head.weight[first]
    ours, _ = generate_speculative(padded, prompt, 16, vocab_limit=90)
    want = generate(padded, torch.tensor([prompt]), 16, temperature=0, vocab_limit=90)[0, 20:].tolist()
    assert ours == want and max(ours) < 90
    assert max(generate_speculative(padded, prompt, 16)[0]) >= 90   # (without the limit it picks them)
    dynamic = build('gqa', mtp_depth=1, rope_scaling={'type': 'dynamic', 'factor': 2.0})
    with pytest.raises(ValueError, match="rope_scaling 'dynamic'"):
        generate_speculative(dynamic, prompt, 4)


def test_the_drafts_a_verify_pass_keeps():
    """Up to the first draft the main model disagrees with; a correct stop-token draft is kept and
    counted as accepted (it ends the answer)."""
    from generate import kept_drafts
    assert kept_drafts([5, 6, 7], [5, 6, 9, 1], ()) == 2
    assert kept_drafts([5, 6, 7], [5, 6, 7, 1], ()) == 3
    assert kept_drafts([5, 6, 7], [5, 6, 7, 1], (6,)) == 2       # the stop token 6: kept, then no further
    assert kept_drafts([4], [5, 1], (5,)) == 0


def test_sampling_at_a_tiny_temperature_is_greedy():
    """softmax(logits / T) for T -> 0 is greedy's one-hot; the division alone overflows to NaN
    (inf - inf) below about 1e-38, which failed a whole batch of the server's requests."""
    from generate import sample_next
    logits = torch.randn(4, 96) * 5
    for t in (1e-3, 1e-30, 1e-39, 1e-45):
        assert torch.equal(sample_next(logits, t, generator=torch.Generator().manual_seed(0)), logits.argmax(-1))
    padded = logits.clone()
    padded[:, 90:] = 100.0                              # the padding's logits the largest: still never drawn
    got = sample_next(padded, 1e-39, vocab_limit=90, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, logits[:, :90].argmax(-1)) and padded[0, 95] == 100.0   # (the caller's logits kept)


def test_penalties_follow_openais_formula_and_stop_greedy_repeats():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    counts = torch.tensor([[3.0, 0.0, 1.0, 0.0]])
    expected = logits - 0.5 * counts - 0.25 * (counts > 0).float()      # z - f c - p [c > 0]
    torch.testing.assert_close(penalize(logits, counts, 0.5, 0.25), expected)
    model = build('mla_moe')
    idx, mask = prompts()
    plain = torch.stack(list(generate_tokens(model, idx, 20, temperature=0.0, prompt_mask=mask)), 1)
    assert any(len(set(row)) < len(row) for row in plain.tolist())        # greedy repeats itself here
    out = []
    for graph in (False, True):                   # the static steps (a CUDA graph on CUDA) penalise alike
        out.append(torch.stack(list(generate_tokens(model, idx, 20, temperature=0.0, prompt_mask=mask,
                                                    presence_penalty=100.0, cuda_graph=graph)), 1))
    assert torch.equal(out[0], out[1])
    assert all(len(set(row)) == len(row) for row in out[0].tolist())     # a large presence penalty: no repeats
    # through the cache, as the formula on the whole window recomputed per token (no cache)
    seq = torch.tensor([[5, 17, 3, 9]])
    counts = torch.zeros(1, model.config.vocab_size)
    with torch.no_grad():
        for _ in range(20):
            z = penalize(model(seq)[0][:, -1], counts, 0.7, 0.3)
            nxt = z.argmax(-1)
            counts[0, nxt] += 1
            seq = torch.cat([seq, nxt[:, None]], 1)
    cached = torch.stack(list(generate_tokens(model, seq[:, :4], 20, temperature=0.0, frequency_penalty=0.7,
                                              presence_penalty=0.3)), 1)
    assert torch.equal(cached, seq[:, 4:])
