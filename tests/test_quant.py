"""quant.py / quantize.py: int8 and int4 weight-only quantization of every linear layer and the
routed experts, its error bounds, its equivalence across the MoE paths, and a quantized checkpoint
that saves and loads again."""

import pytest
import torch

import fast_paths
from checkpoint import load_checkpoint, load_model
from conftest import run_script
from model import GPT, ModelConfig
from quant import QuantExperts, QuantLinear, dequantize_weight, quantize_model, quantize_weight, weight_bytes

MLA_MOE = dict(vocab_size=96, block_size=32, n_layer=2, n_head=4, n_embd=64, attention='mla', pos_emb='rope',
               norm='rmsnorm', mlp='swiglu', bias=False, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
               qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
               moe_intermediate_size=32, scoring_func='sigmoid', first_k_dense_replace=1, tie_word_embeddings=False)


@pytest.mark.parametrize('bits', [8, 4])
def test_round_trip_error_is_at_most_half_a_step(bits):
    torch.manual_seed(0)
    w = torch.randn(3, 16, 256)                                      # a stack of expert matrices
    q, scale = quantize_weight(w, bits, group_size=64)
    back = dequantize_weight(q, scale, bits, torch.float32)
    step = scale if bits == 8 else scale.repeat_interleave(64, dim=-1)
    assert back.shape == w.shape and ((back - w).abs() <= step / 2 + 1e-6).all()
    assert q.numel() == w.numel() // (1 if bits == 8 else 2)          # int4: two values a byte


@pytest.mark.parametrize('kind', ['int8', 'int4'])
def test_quantized_model_is_close_and_its_moe_paths_agree(kind):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**MLA_MOE)).eval()
    idx = torch.randint(0, 96, (2, 24))
    ref = model(idx)[0]
    before, counts = weight_bytes(model), (model.num_params(), model.active_params())
    quantize_model(model, kind, group_size=32)
    assert (model.num_params(), model.active_params()) == counts     # quantized weights count as what they stand for
    assert all(not isinstance(m, torch.nn.Linear) for m in model.modules())      # the head too (untied)
    assert sum(isinstance(m, QuantExperts) for m in model.modules()) == 1
    assert weight_bytes(model) < before * (0.5 if kind == 'int8' else 0.4)
    out = model(idx)[0]
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (0.01 if kind == 'int8' else 0.2), rel          # random weights: int4's error is ~10%
    experts = model.layers[1].mlp.experts                            # every expert path reads the same stacks
    x, w = torch.randn(10, 64), torch.rand(10, 2)
    ind = torch.stack([torch.randperm(8)[:2] for _ in range(10)])
    torch.testing.assert_close(fast_paths.experts_gathered(experts, x, w, ind), experts(x, w, ind),
                               atol=1e-5, rtol=1e-4)
    # decoding's gathered path dequantizes the chosen experts only, never the whole stacks
    for name in ('gate_proj', 'up_proj', 'down_proj'):
        assert torch.equal(experts.gathered(name, ind), experts.stack(name)[ind])
    expected = experts(x, w, ind)
    experts.stack = None                                             # calling it now would fail
    torch.testing.assert_close(fast_paths.experts_gathered(experts, x, w, ind), expected, atol=1e-5, rtol=1e-4)
    del experts.stack
    torch.testing.assert_close(fast_paths.experts_grouped(experts, x, w, ind), experts(x, w, ind), atol=1e-5, rtol=1e-4)
    assert isinstance(model.layers[0].attn.kv_b_proj, QuantLinear)  # MLA's absorbed path reads its .weight
    from generate import generate
    assert generate(model, idx[:, :5], 5, temperature=0).shape == (2, 10)


def test_int4_keeps_experts_of_an_odd_width_as_they_are():
    """Two int4 values share a byte: a stack of expert rows of odd length stays unquantized, as an
    odd-width Linear does, and the model still runs."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**MLA_MOE, 'moe_intermediate_size': 21})).eval()
    idx = torch.randint(0, 96, (1, 8))
    ref = model(idx)[0]
    quantize_model(model, 'int4', group_size=32)
    assert not any(isinstance(m, QuantExperts) for m in model.modules())
    assert ((model(idx)[0] - ref).norm() / ref.norm()).item() < 0.2


def test_a_quantized_model_is_not_quantized_again_and_its_size_counts_saved_tensors_only():
    """Quantizing twice left int8 layers labelled int4 (a checkpoint that would not load); the
    weights' bytes counted the sinusoidal table, which is computed again and never saved."""
    model = GPT(ModelConfig(vocab_size=96, n_layer=1, n_head=2, n_embd=32, block_size=2048, pos_emb='sinusoidal'))
    table = sum(b.numel() * b.element_size() for b in model.buffers())
    assert table > 0 and weight_bytes(model) == sum(p.numel() * p.element_size() for p in model.parameters())
    quantize_model(model, 'int8')
    with pytest.raises(ValueError, match=r'quantized already \(int8\)'):
        quantize_model(model, 'int4')


def test_quantize_script_measures_saves_and_the_checkpoint_loads_again(tmp_path, byte_data):
    run_script('train.py', f'--data_dir={byte_data}', '--out_dir=base', '--n_layer=2', '--n_head=2', '--n_embd=64',
               '--block_size=32', '--batch_size=4', '--max_iters=20', '--eval_interval=20', '--eval_iters=2',
               '--compile=False', '--device=cpu', '--learning_rate=3e-3', cwd=tmp_path)
    p = run_script('quantize.py', '--out_dir=base', '--quantize=int8', '--save_dir=base_int8', '--eval_iters=4',
                   '--device=cpu', cwd=tmp_path)
    assert '| weights |' in p.stdout and '| val loss |' in p.stdout and 'greedy agreement' in p.stdout
    # the numbers are the quantized model's: its val loss on the same batches as quantize.py reads them
    # (this small model's int4 agrees on every position, so the original's own would pass a range check)
    import re
    from data import TokenData, eval_generator
    p4 = run_script('quantize.py', '--out_dir=base', '--quantize=int4', '--eval_iters=4', '--device=cpu', cwd=tmp_path)
    printed = re.search(r'\| val loss \| ([\d.]+) \| ([\d.]+) \(', p4.stdout).groups()
    data = TokenData(str(byte_data))
    with torch.no_grad():
        losses = [sum(m.eval()(*data.batch('val', 8, 32, eval_generator(k, 'val'), 'cpu'))[1].item() / 4
                      for k in range(4))
                  for m in (load_model(str(tmp_path / 'base'))[0], load_model(str(tmp_path / 'base'), quantize='int4')[0])]
    assert printed == tuple(f'{x:.4f}' for x in losses) and losses[0] != losses[1], (printed, losses)
    ckpt = load_checkpoint(str(tmp_path / 'base_int8'))
    assert ckpt['quantized'] == {'kind': 'int8', 'group_size': 128} and 'optimizer' not in ckpt
    loaded, _, _ = load_model(str(tmp_path / 'base_int8'))
    fresh, _, _ = load_model(str(tmp_path / 'base'), quantize='int8')
    idx = torch.randint(0, 200, (1, 16))
    assert torch.equal(loaded.eval()(idx)[0], fresh.eval()(idx)[0])
    p = run_script('sample.py', '--out_dir=base', '--quantize=int4', '--max_new_tokens=5', '--num_samples=1',
                   '--device=cpu', cwd=tmp_path)
    assert p.returncode == 0
    p = run_script('sample.py', '--out_dir=base', '--quantize=int3', '--device=cpu', cwd=tmp_path, check=False)
    assert "quantize='int3'; valid: '' (off), int8, int4" in p.stderr
    # what must not happen to the full-precision checkpoint: replaced by its quantization, or
    # trained from the quantized weights (frozen buffers, and a checkpoint that would not load)
    from conftest import run_script_many
    same, group, no_eval, longer, odd_group, train, resume = run_script_many('quantize.py', [
        ['--out_dir=base', '--save_dir=base', '--device=cpu'], ['--out_dir=base', '--group_size=0'],
        ['--out_dir=base', '--eval_iters=0', '--device=cpu'], ['--out_dir=base', '--block_size=64', '--device=cpu'],
        ['--out_dir=base', '--quantize=int4', '--group_size=48', '--eval_iters=1', '--device=cpu']],
        cwd=tmp_path) + \
        run_script_many('train.py', [
            [f'--data_dir={byte_data}', '--out_dir=x', '--init_from=base_int8', '--max_iters=1', '--device=cpu'],
            [f'--data_dir={byte_data}', '--out_dir=base_int8', '--init_from=resume', '--max_iters=1', '--device=cpu']],
            cwd=tmp_path)
    assert same.returncode and "save_dir='base' is the checkpoint's own folder" in same.stderr
    assert load_checkpoint(str(tmp_path / 'base')).get('quantized') is None
    assert group.returncode and 'group_size=0 must be positive' in group.stderr
    # eval_iters=0: the weights' size alone (it divided by zero); a longer context than the model's refused
    assert no_eval.returncode == 0 and '| weights |' in no_eval.stdout and 'val loss' not in no_eval.stdout
    assert longer.returncode and 'block_size=64 exceeds the context of' in longer.stderr and '--block_size=32' in longer.stderr
    # a group size that divides no row (64 and 256 inputs): each row one group, said
    assert odd_group.returncode == 0 and ('note: group_size=48 does not divide rows of 64, 256 inputs: each such row '
                                          'has one scale') in odd_group.stderr, odd_group.stderr[-500:]
    for p in (train, resume):
        assert p.returncode and 'is quantized (weights stored as int8/int4' in p.stderr, p.stderr[-500:]
    # eval.py --quantize: a result of its own, marked, parameters counted in full precision
    ev, bad_kind, other_kind = run_script_many('eval.py', [
        ['--out_dir=base', '--quantize=int8', '--eval_iters=2', '--device=cpu'],
        ['--out_dir=base', '--quantize=int3', '--device=cpu'], ['--out_dir=base_int8', '--quantize=int4', '--device=cpu']],
        cwd=tmp_path)
    import json
    result = json.loads((tmp_path / 'base' / 'eval_int8.json').read_text())
    assert ev.returncode == 0 and '| base (int8) | pretrain |' in ev.stdout
    assert result['quantized'] == 'int8' and result['params'] == load_model(str(tmp_path / 'base'))[0].num_params()
    assert not (tmp_path / 'base' / 'eval.json').exists()             # the full-precision result's place
    assert bad_kind.returncode and "quantize='int3'; valid" in bad_kind.stderr
    assert other_kind.returncode and 'is saved quantized as int8; quantize=int4 needs' in other_kind.stderr
