"""GPU paths the CPU suite cannot reach: bf16 grouped-GEMM experts, torch.compile of the training
step, bf16 MLA decoding. Skipped without CUDA (CI has none; run them on the lent GPU)."""

import json

import pytest
import torch

from conftest import TINY_MODEL, run_script
from runtime import CUDAGraphStep
from generate import generate_tokens, new_cache
from fast_paths import WeightedSwiGLU, cross_entropy_rows_, grouped_mm_supported, linear_cross_entropy
from model import GPT, ModelConfig
from optim import build_optimizer, qk_clip

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

MOE = dict(vocab_size=512, block_size=128, n_layer=3, n_head=4, n_embd=128, attention='mla',
           pos_emb='rope', norm='rmsnorm', mlp='swiglu', bias=False, tie_word_embeddings=False,
           q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
           n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=64, n_shared_experts=1,
           scoring_func='sigmoid', routed_scaling_factor=2.5, first_k_dense_replace=1,
           bias_update_speed=0.001, mtp_depth=1)


def build(**kw):
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**MOE, **kw})).cuda()


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_grouped_experts_bf16_match_the_loop():
    x = torch.randint(0, 512, (8, 128), device='cuda')
    out = {}
    for impl in ('loop', 'grouped'):
        model = build(moe_impl=impl).train()
        with torch.autocast('cuda', dtype=torch.bfloat16):
            if impl == 'grouped':
                assert grouped_mm_supported(torch.zeros(1, 128, device='cuda'), 128, 64)
            _, loss = model(x, x)
        loss.backward()
        out[impl] = loss.item(), model.layers[1].mlp.experts.gate_proj.grad.clone(), \
            model.layers[0].attn.kv_b_proj.weight.grad.clone()
    assert abs(out['loop'][0] - out['grouped'][0]) < 1e-2
    assert rel(out['grouped'][1], out['loop'][1]) < 3e-2 and rel(out['grouped'][2], out['loop'][2]) < 3e-2


@pytest.mark.parametrize('optimizer', ['adamw', 'muonclip'])
def test_compiled_step_matches_eager(optimizer):
    x = torch.randint(0, 512, (8, 128), device='cuda')
    losses = {}
    for compiled in (False, True):
        raw = build().train()
        raw.track_max_logits(optimizer == 'muonclip')
        model = torch.compile(raw) if compiled else raw
        opt = build_optimizer(raw, optimizer, 1e-3, 0.1, device_type='cuda')
        losses[compiled] = []
        for _ in range(4):
            with torch.autocast('cuda', dtype=torch.bfloat16):
                _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            raw.update_router_bias()
            if optimizer == 'muonclip':
                m, _ = qk_clip(raw, 100.0)
                assert torch.isfinite(m).all() and (m > 0).all()     # recorded under compile too
            losses[compiled].append(loss.item())
        assert set(raw.last_losses) >= {'lm', 'mtp'}
    for a, b in zip(losses[False], losses[True]):
        assert abs(a - b) < 2e-2 * abs(a), (losses)


def test_cross_entropy_row_kernel_equals_pytorch():
    """The Triton row pass of the fused loss against the same math in PyTorch, on bf16 logits of
    GPT-2's padded vocabulary (not a multiple of the kernel's block), with masked rows."""
    torch.manual_seed(0)
    z = (torch.randn(64, 50304, device='cuda') * 4).bfloat16()
    y = torch.randint(0, 50304, (64,), device='cuda')
    y[::7] = -1
    z[1, 50000] = 200.0            # a row whose max comes late, far above its first block's:
    z[2, 30000] = 60.0             # the kernel rescales the blocks written before it
    ref = z.cpu().float()
    ref_loss, ref_inv = cross_entropy_rows_(ref, y.cpu())
    loss, inv_sum = cross_entropy_rows_(z, y)
    torch.testing.assert_close(loss.cpu(), ref_loss, atol=1e-4, rtol=1e-4)
    dz, ref_dz = z.float() * inv_sum[:, None], ref * ref_inv[:, None]   # softmax - onehot
    torch.testing.assert_close(dz.cpu(), ref_dz, atol=2e-3, rtol=1e-2)
    assert (inv_sum[::7] == 0).all() and torch.isfinite(z).all()


def test_weighted_swiglu_kernel_equals_autograd_also_compiled():
    """The experts' SwiGLU backward (one Triton kernel behind a custom op) against autograd in
    float32, at a width that is not a power of two and a row count that is not a multiple of the
    block; eager, and inside torch.compile with fullgraph=True (the op needs no graph break)."""
    torch.manual_seed(0)
    M, I = 1000, 48
    gate_up = torch.randn(M, 2 * I, device='cuda').bfloat16()
    g = torch.rand(M, 1, device='cuda')
    dh = torch.randn(M, I, device='cuda').bfloat16()
    ref_gu, ref_g = gate_up.float().requires_grad_(), g.clone().requires_grad_()
    a, b = ref_gu.chunk(2, -1)
    (torch.nn.functional.silu(a) * b * ref_g).backward(dh.float())

    def f(gu, gg):
        return WeightedSwiGLU.apply(gu, gg, torch.bfloat16)
    for fn in (f, torch.compile(f, fullgraph=True)):
        gu, gg = gate_up.clone().requires_grad_(), g.clone().requires_grad_()
        fn(gu, gg).backward(dh)
        assert rel(gu.grad, ref_gu.grad) < 1e-2 and rel(gg.grad, ref_g.grad) < 1e-4
        assert gu.grad.dtype == torch.bfloat16 and gg.grad.dtype == torch.float32


def test_fused_loss_in_chunks_equals_float32_cross_entropy():
    """Several chunks (the float32 dW accumulated by the GEMM across them; 1,000 rows at a limit
    of 300 per chunk make 4 equal ones) and masked rows: the loss and both gradients against
    float32 PyTorch."""
    torch.manual_seed(0)
    h = torch.randn(1000, 64, device='cuda', requires_grad=True)
    w = (torch.randn(50304, 64, device='cuda') * 0.2).requires_grad_()
    y = torch.randint(0, 50304, (1000,), device='cuda')
    y[::9] = -1
    with torch.autocast('cuda', dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, y, chunk_bytes=300 * 50304 * 2)      # 4 chunks of 250 rows
    loss.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h2 @ w2.t(), y, ignore_index=-1)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 2e-3 * ref.item()
    assert rel(h.grad, h2.grad) < 2e-2 and rel(w.grad, w2.grad) < 2e-2
    assert w.grad.dtype == torch.float32


@pytest.mark.parametrize('compiled', [False, True])
def test_fused_loss_equals_the_plain_loss_under_autocast(compiled):
    """loss_impl='auto' takes the fused output layer + loss on CUDA in a training step (logits not
    returned): the same loss and gradients as 'plain', compiled (a graph break around it) or not."""
    x = torch.randint(0, 512, (8, 128), device='cuda')
    y = x.clone()
    y[:, :16] = -1
    out = {}
    for impl in ('plain', 'auto'):
        raw = build(loss_impl=impl).train()
        model = torch.compile(raw) if compiled else raw
        assert raw.use_fused_loss(x.float(), return_logits=False) == (impl == 'auto')
        with torch.autocast('cuda', dtype=torch.bfloat16):
            _, loss = model(x, y, return_logits=False)
        loss.backward()
        out[impl] = loss.item(), raw.lm_head.weight.grad.clone(), raw.layers[0].attn.kv_b_proj.weight.grad.clone()
    assert abs(out['auto'][0] - out['plain'][0]) < 1e-3 * out['plain'][0]
    assert rel(out['auto'][1], out['plain'][1]) < 2e-2 and rel(out['auto'][2], out['plain'][2]) < 2e-2


def test_mla_decode_in_bf16():
    model = build().eval()
    idx = torch.randint(0, 512, (4, 64), device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        full, _ = model(idx)
        cache = new_cache(model, 4, 64, 'cuda')
        parts = [model(idx[:, :32], cache=cache)[0]] + \
                [model(idx[:, t:t + 1], cache=cache)[0] for t in range(32, 64)]
    assert rel(torch.cat(parts, 1), full) < 2e-2


def test_train_script_compiled_on_gpu(tmp_path, byte_data):
    args = [a for a in TINY_MODEL if not a.startswith(('--compile', '--device'))]
    p = run_script('train.py', f'--data_dir={byte_data}', '--out_dir=run', *args, '--max_iters=20',
                   '--eval_interval=10', '--compile=True', '--device=cuda', '--optimizer=muonclip',
                   '--attention=mla', '--pos_emb=rope', '--norm=rmsnorm', '--mlp=swiglu',
                   '--kv_lora_rank=16', '--qk_nope_head_dim=16', '--qk_rope_head_dim=8', '--v_head_dim=16',
                   '--n_routed_experts=8', '--moe_intermediate_size=32', '--n_shared_experts=1',
                   '--scoring_func=sigmoid', '--bias_update_speed=0.01', cwd=tmp_path)
    assert 'done: 20 steps' in p.stdout


@pytest.mark.parametrize('B', [1, 4])
def test_cuda_graph_decode_equals_the_same_steps_eager(B, monkeypatch):
    """Decoding through the captured graph (bf16 weights, grouped MoE) gives exactly the tokens of
    the same static-cache steps run eagerly, past block_size too (the restart reuses the buffers)."""
    import generate as generate_module
    model = build().eval().to(torch.bfloat16)
    assert generate_module.graph_capturable(model)
    idx = torch.randint(0, 512, (B, 16), device='cuda')
    captured = []
    real = generate_module.DecodeGraph
    monkeypatch.setattr(generate_module, 'DecodeGraph', lambda *a, **kw: captured.append(1) or real(*a, **kw))
    graph = torch.stack(list(generate_tokens(model, idx, 150, temperature=0.0, cuda_graph=True)), 1)
    assert captured                                    # the graph path really ran
    monkeypatch.setattr(generate_module, 'graph_capturable', lambda *a, **kw: False)   # the same static steps, no graph
    eager = torch.stack(list(generate_tokens(model, idx, 150, temperature=0.0, cuda_graph=True)), 1)
    assert torch.equal(graph, eager)


def test_decode_graph_is_kept_between_calls_and_reads_weights_updated_in_place(monkeypatch):
    """generate_tokens captures a step once per shape and replays it in later calls: for other
    prompts, and after the weights changed in place (what an optimizer step does between RL
    rollouts). Each call gives the tokens of the same static steps without a graph. model.to()
    makes new tensors, so the next call captures again."""
    import generate as generate_module
    model = build().eval().to(torch.bfloat16)
    captured = []
    real = generate_module.DecodeGraph
    monkeypatch.setattr(generate_module, 'DecodeGraph', lambda *a, **kw: captured.append(1) or real(*a, **kw))

    def tokens(idx, graph=True):
        with monkeypatch.context() as m:
            if not graph:                              # the same static steps, no graph
                m.setattr(generate_module, 'graph_capturable', lambda *a, **kw: False)
            return torch.stack(list(generate_tokens(model, idx, 40, temperature=0.0, cuda_graph=True)), 1)

    before = None
    for call in range(3):
        idx = torch.randint(0, 512, (2, 16), device='cuda')
        if call == 2:
            before = tokens(idx, graph=False)
            with torch.no_grad():
                model.lm_head.weight.mul_(-1.0)         # in place: the same memory, other values
        a = tokens(idx)
        assert torch.equal(a, tokens(idx, graph=False))
    assert not torch.equal(a, before)                  # the kept graph read the changed weights
    assert len(captured) == 1
    model.float().to(torch.bfloat16)
    assert torch.equal(tokens(idx), tokens(idx, graph=False))
    assert len(captured) == 2


def test_chat_answers_through_a_graph_under_autocast_equal_the_same_steps_eager(monkeypatch):
    """PPO/GRPO rollouts with cuda_graph=True: float32 weights under bf16 autocast (the training
    setting; autocast caches the weight casts for the batch), the step captured once per batch,
    left-padded prompts; the same tokens as the same static steps without the graph."""
    import generate as generate_module
    from generate import generate_chat
    from tokenizer import ByteTokenizer, with_chat_tokens
    tok = with_chat_tokens(ByteTokenizer())
    model = build(vocab_size=320, mtp_depth=0).eval()
    prompts = ['hi', 'a much longer prompt than the first', 'mid size one']
    captured = []
    real = generate_module.DecodeGraph
    monkeypatch.setattr(generate_module, 'DecodeGraph', lambda *a, **kw: captured.append(1) or real(*a, **kw))
    autocast = lambda: torch.autocast('cuda', dtype=torch.bfloat16)     # noqa: E731
    graph = generate_chat(model, tok, prompts, 60, 0.0, autocast=autocast, cuda_graph=True)
    assert captured                                    # the graph path really ran
    monkeypatch.setattr(generate_module, 'graph_capturable', lambda *a, **kw: False)
    eager = generate_chat(model, tok, prompts, 60, 0.0, autocast=autocast, cuda_graph=True)
    assert [a['ids'] for a in graph] == [a['ids'] for a in eager]


def test_a_graph_kept_from_an_earlier_autocast_context_reads_live_weights(monkeypatch):
    """sft.py's evaluation: float32 weights that require grad, under bf16 autocast, greedy answers
    then sampled ones in a second generate_chat call that replays the graph captured in the first.
    Autocast frees its cached weight casts when a context exits; the memory is then reused (here:
    filled with NaN on purpose). The kept graph must not read it: the second call's greedy answers
    equal the eager steps' and sampling raises no device-side assert."""
    import generate as generate_module
    from generate import generate_chat
    from tokenizer import ByteTokenizer, with_chat_tokens
    tok = with_chat_tokens(ByteTokenizer())
    model = build(vocab_size=320, mtp_depth=0).eval()               # a training process's weights
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    prompts = ['hi', 'a much longer prompt than the first', 'mid size one']
    captured = []
    real = generate_module.DecodeGraph
    monkeypatch.setattr(generate_module, 'DecodeGraph', lambda *a, **kw: captured.append(1) or real(*a, **kw))
    autocast = lambda: torch.autocast('cuda', dtype=torch.bfloat16)     # noqa: E731
    first = generate_chat(model, tok, prompts, 40, 0.0, autocast=autocast, cuda_graph=True)
    scrub = [torch.full((1 << 20,), float('nan'), device='cuda') for _ in range(256)]   # reuse freed blocks
    del scrub
    second = generate_chat(model, tok, prompts, 40, 0.0, autocast=autocast, cuda_graph=True)
    g = torch.Generator(device='cuda').manual_seed(0)
    sampled = generate_chat(model, tok, prompts, 40, 0.8, autocast=autocast, cuda_graph=True, generator=g)
    torch.cuda.synchronize()
    assert len(captured) == 1                          # one capture, replayed by the later calls
    monkeypatch.setattr(generate_module, 'graph_capturable', lambda *a, **kw: False)
    eager = generate_chat(model, tok, prompts, 40, 0.0, autocast=autocast, cuda_graph=True)
    assert [a['ids'] for a in first] == [a['ids'] for a in second] == [a['ids'] for a in eager]
    assert all(len(a['ids']) > 0 for a in sampled)


def test_distill_script_with_a_bf16_moe_teacher(tmp_path, byte_data):
    """distill.py on the GPU: an MLA + MoE teacher whose weights are cast to bf16 (its buffers, the
    RoPE frequencies and router biases, stay float32), compiled, teaching a dense student; then
    the teacher's corpus sampled through the bf16 KV cache."""
    args = [a for a in TINY_MODEL if not a.startswith(('--compile', '--device'))] + ['--device=cuda']
    moe = ['--attention=mla', '--pos_emb=rope', '--norm=rmsnorm', '--mlp=swiglu', '--kv_lora_rank=16',
           '--qk_nope_head_dim=16', '--qk_rope_head_dim=8', '--v_head_dim=16', '--n_routed_experts=8',
           '--moe_intermediate_size=32', '--n_shared_experts=1', '--scoring_func=sigmoid',
           '--bias_update_speed=0.01']
    run_script('train.py', f'--data_dir={byte_data}', '--out_dir=teacher', *args, *moe, '--max_iters=20',
               '--eval_interval=20', '--compile=False', cwd=tmp_path)
    p = run_script('distill.py', '--teacher=teacher', '--out_dir=student', *args, '--n_layer=1', '--pos_emb=rope',
                   '--max_iters=20', '--eval_interval=10', '--compile=True', '--top_k_logits=16', cwd=tmp_path)
    assert 'torch.bfloat16; student' in p.stdout and 'done: 20 steps' in p.stdout
    rows = [json.loads(line) for line in open(tmp_path / 'student' / 'log.jsonl')]
    kls = [r['val/kl'] for r in rows if 'val/kl' in r]
    assert kls[-1] < kls[0]
    run_script('distill.py', '--teacher=teacher', '--mode=sequence', '--seq_data_dir=seq', '--num_samples=8',
               '--sample_length=48', '--generate_only=True', *args, cwd=tmp_path)
    from data import TokenData
    assert TokenData(str(tmp_path / 'seq')).meta['train_docs'] == 8


def test_compiled_cuda_graph_decode_matches_eager(monkeypatch):
    """The captured step fused by torch.compile: the same greedy tokens as the eager static steps
    (bf16 kernels may round differently, so most, not all: the first 16 tokens agree exactly)."""
    model = build().eval().to(torch.bfloat16)
    idx = torch.randint(0, 512, (2, 16), device='cuda')
    a = torch.stack(list(generate_tokens(model, idx, 40, temperature=0.0, cuda_graph=True, compile_step=True)), 1)
    b = torch.stack(list(generate_tokens(model, idx, 40, temperature=0.0, cuda_graph=True, compile_step=True)), 1)
    assert torch.equal(a, b)                           # the compiled graph is reused, deterministic
    import generate as generate_module
    monkeypatch.setattr(generate_module, 'graph_capturable', lambda *a, **kw: False)
    ref = torch.stack(list(generate_tokens(model, idx, 40, temperature=0.0, cuda_graph=True)), 1)
    assert torch.equal(a[:, :16], ref[:, :16])


def test_whole_step_cuda_graph_equals_the_same_steps_without():
    """bench.py's cuda_graph_train: the compiled step (forward, fused loss, backward, capturable
    AdamW, router-bias update) captured once and replayed gives the losses and weights of the
    same steps run one by one. The two runs' weights differ by rounding, so a token near a tie may
    choose another expert in one of them: the router biases (steps of bias_update_speed) must agree
    to two steps, and each replay must have moved them."""
    x = torch.randint(0, 512, (8, 128), device='cuda')
    got, weights, replay_biases = {}, {}, []
    for graphed in (False, True):
        raw = build().train()
        model = torch.compile(raw)
        opt = build_optimizer(raw, 'adamw', 1e-3, 0.1, device_type='cuda', capturable=graphed)
        seen = []

        def step():
            with torch.autocast('cuda', dtype=torch.bfloat16):
                _, loss = model(x, x, return_logits=False)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            raw.update_router_bias()
            seen.append(loss.detach())
        if graphed:
            graph = CUDAGraphStep(step, warmup=2)
            graph(), graph()                               # two plain steps
            losses = [t.item() for t in seen[:2]]
            for _ in range(3):                             # captured, then replayed
                graph()
                losses.append(seen[2].item())             # the captured step's loss, rewritten each replay
                replay_biases.append(raw.layers[1].mlp.router.e_score_correction_bias.clone())
        else:
            for _ in range(5):
                step()
            losses = [t.item() for t in seen]
        got[graphed] = losses
        weights[graphed] = (raw.layers[1].mlp.experts.gate_proj.detach().clone(),
                            raw.layers[1].mlp.router.e_score_correction_bias.clone())
    assert len(set(got[True])) == 5                        # every replay really stepped
    for a, b in zip(got[False], got[True]):
        assert abs(a - b) < 2e-2 * abs(a), got
    assert rel(weights[True][0], weights[False][0]) < 1e-2
    speed = raw.config.bias_update_speed
    assert (weights[True][1] - weights[False][1]).abs().max() <= 2 * speed + 1e-6
    for before, after in zip(replay_biases, replay_biases[1:]):
        assert not torch.equal(before, after)             # each replay updated the biases


def test_train_script_with_the_step_in_a_cuda_graph(tmp_path, byte_data):
    """train.py --cuda_graph_train=True: 3 plain steps, then every step a replay, with the
    learning rate changing under warm-up and decay, gradient accumulation, MoE + MTP, evaluation
    and checkpoints in between, and a resume. The losses follow the run without a graph."""
    args = [a for a in TINY_MODEL if not a.startswith(('--compile', '--device'))]
    moe = ['--attention=mla', '--pos_emb=rope', '--norm=rmsnorm', '--mlp=swiglu', '--kv_lora_rank=16',
           '--qk_nope_head_dim=16', '--qk_rope_head_dim=8', '--v_head_dim=16', '--n_routed_experts=8',
           '--moe_intermediate_size=32', '--n_shared_experts=1', '--scoring_func=sigmoid',
           '--bias_update_speed=0.01', '--mtp_depth=1', '--gradient_accumulation_steps=2']

    def train(out, *extra):
        return run_script('train.py', f'--data_dir={byte_data}', f'--out_dir={out}', *args, *moe,
                          '--compile=True', '--device=cuda', '--warmup_iters=4', '--lr_decay_iters=12',
                          '--eval_interval=4', '--learning_rate=3e-3', *extra, cwd=tmp_path)

    def log(out):
        rows = [json.loads(line) for line in open(tmp_path / out / 'log.jsonl')]
        return {r['step']: r for r in rows if 'train/loss' in r}
    train('plain', '--max_iters=12')
    train('graph', '--max_iters=12', '--cuda_graph_train=True')
    train('split', '--max_iters=6', '--cuda_graph_train=True')
    train('split', '--max_iters=12', '--cuda_graph_train=True', '--init_from=resume')
    plain, graph, split = log('plain'), log('graph'), log('split')
    assert sorted(plain) == sorted(graph) == sorted(split) == list(range(1, 13))
    for s in range(1, 13):
        for run in (graph, split):
            assert abs(run[s]['train/loss'] - plain[s]['train/loss']) < 2e-2 * plain[s]['train/loss']
            assert abs(run[s]['train/mtp_loss'] - plain[s]['train/mtp_loss']) < 2e-2 * plain[s]['train/mtp_loss']
    assert len({graph[s]['train/loss'] for s in range(5, 13)}) == 8          # the replays really step
    assert graph[12]['train/loss'] < graph[1]['train/loss'] - 0.5


SYNC_WARNING = 'called a synchronizing CUDA operation'


def test_the_sync_check_sees_a_copy_from_the_host():
    """The string the next test looks for is what torch's sync debug mode writes."""
    import warnings
    torch.cuda.set_sync_debug_mode('warn')
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            torch.tensor(3, device='cuda')                # a copy from pageable host memory: waits
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert any(SYNC_WARNING in str(w.message) for w in caught)


@pytest.mark.parametrize('graph', [False, True])
def test_train_loop_never_waits_for_the_gpu_between_log_lines(tmp_path, byte_data, graph):
    """train.py --cuda_sync_check=True: no step between two log lines makes the host wait for the
    device (each wait leaves the GPU idle while the host prepares the next step), with the step
    as Python or as a CUDA graph, MoE + MTP."""
    args = [a for a in TINY_MODEL if not a.startswith(('--device', '--log_interval'))]
    moe = ['--attention=mla', '--pos_emb=rope', '--norm=rmsnorm', '--mlp=swiglu', '--kv_lora_rank=16',
           '--qk_nope_head_dim=16', '--qk_rope_head_dim=8', '--v_head_dim=16', '--n_routed_experts=8',
           '--moe_intermediate_size=32', '--n_shared_experts=1', '--scoring_func=sigmoid', '--mtp_depth=1']
    proc = run_script('train.py', f'--data_dir={byte_data}', f'--out_dir={tmp_path / "out"}', *args, *moe,
                      '--device=cuda', '--max_iters=16', '--eval_interval=100', '--log_interval=8',
                      '--cuda_sync_check=True', f'--cuda_graph_train={graph}', cwd=tmp_path)
    assert SYNC_WARNING not in proc.stderr, proc.stderr[-3000:]


def test_train_profile_on_the_gpu_lists_kernels_and_idle_gaps(tmp_path, byte_data):
    """train.py --profile with the step as a CUDA graph: the kernel and idle tables are there."""
    args = [a for a in TINY_MODEL if not a.startswith('--device')]
    run_script('train.py', f'--data_dir={byte_data}', f'--out_dir={tmp_path / "out"}', *args, '--device=cuda',
               '--max_iters=14', '--eval_interval=100', '--cuda_graph_train=True',
               f'--profile={tmp_path / "prof.txt"}', cwd=tmp_path)
    text = (tmp_path / 'prof.txt').read_text()
    assert '=== pretrain: steps 10 and 11 ===' in text
    assert 'device kernels:' in text and 'device span' in text
