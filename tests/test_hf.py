"""Parity with Hugging Face transformers' DeepseekV3ForCausalLM on the same weights, and the
export / import round trip. Skips when transformers is not installed (.ci/run installs it)."""

import json

import pytest
import torch

from convert_hf import export_hf, import_hf, to_hf_config
from model import GPT, ModelConfig

transformers = pytest.importorskip('transformers')

BASE = dict(vocab_size=96, block_size=64, n_layer=3, n_head=4, n_embd=32, attention='mla',
            pos_emb='rope', norm='rmsnorm', norm_eps=1e-6, mlp='swiglu', bias=False,
            tie_word_embeddings=False, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=12, intermediate_size=48)
CONFIGS = {
    # DeepSeek-V3 in miniature: q-LoRA, group-limited sigmoid routing, shared expert, a dense
    # first layer, YaRN with different mscales, MTP
    'deepseek': dict(q_lora_rank=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                     moe_intermediate_size=16, scoring_func='sigmoid', n_group=4, topk_group=2,
                     routed_scaling_factor=2.5, first_k_dense_replace=1, mtp_depth=1,
                     rope_scaling=dict(type='yarn', factor=4.0, original_max_position_embeddings=16,
                                       beta_fast=32, beta_slow=1, mscale=0.8, mscale_all_dim=0.6)),
    # Kimi-K2 in miniature: one group, more experts, no q-LoRA, tied head, YaRN beta 1/1
    'kimi': dict(n_routed_experts=12, n_shared_experts=1, num_experts_per_tok=3, moe_intermediate_size=8,
                 scoring_func='sigmoid', routed_scaling_factor=2.827, first_k_dense_replace=1,
                 tie_word_embeddings=True, rope_theta=50000.0,
                 rope_scaling=dict(type='yarn', factor=8.0, original_max_position_embeddings=8,
                                   beta_fast=1, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)),
    'moe_no_shared_linear_rope': dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                      scoring_func='sigmoid', norm_topk_prob=False,
                                      rope_scaling=dict(type='linear', factor=2.0)),
    'dense_dynamic_rope': dict(q_lora_rank=12, rope_scaling=dict(type='dynamic', factor=2.0,
                                                                 original_max_position_embeddings=16)),
}


def randomized(cfg):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**BASE, **cfg})).eval()
    with torch.no_grad():                      # move every norm and router bias off its init
        for name, p in model.named_parameters():
            if name.endswith('norm.weight') or 'layernorm' in name:
                p.add_(0.3 * torch.randn_like(p))
        for m in model.moe_layers():
            m.router.e_score_correction_bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize('name', CONFIGS)
def test_logits_equal_transformers(name, tmp_path):
    model = randomized(CONFIGS[name])
    export_hf(model, str(tmp_path), eot_id=95)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32).eval()
    idx = torch.randint(0, 96, (2, 40))          # 40 > the original context of the scalings
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    diff = (ours - theirs).abs().max().item()
    print(f'{name}: max |logit difference| = {diff:.2e}')
    assert diff < 1e-4


@pytest.mark.parametrize('name', ['deepseek', 'kimi', 'dense_dynamic_rope'])
def test_export_import_round_trip(name, tmp_path):
    """The same config (block_size too: for dynamic NTK, not the max_position_embeddings that
    transformers reads as the original context) and the same tensors come back."""
    model = randomized(CONFIGS[name])
    export_hf(model, str(tmp_path))
    back = import_hf(str(tmp_path))
    dense = {'num_experts_per_tok', 'moe_intermediate_size', 'scoring_func'}   # unused without experts
    same = lambda c: {k: v for k, v in c.to_dict().items() if c.n_routed_experts or k not in dense}  # noqa: E731
    assert same(back.config) == same(model.config) and back.config.block_size == 64
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ['config.json', 'model.safetensors'] + (['mtp.safetensors'] if name == 'deepseek' else [])
    cfg = json.loads((tmp_path / 'config.json').read_text())
    assert cfg['model_type'] == 'deepseek_v3' and cfg['first_k_dense_replace'] == (1 if model.moe_layers() else 3)


def test_import_of_a_folder_whose_rope_is_not_interleaved(tmp_path):
    """A DeepseekV3 config.json with rope_interleave false: transformers rotates the pairs (i, i +
    d/2) of the RoPE dimensions; the import reorders those rows to our adjacent pairs, so the
    logits equal transformers' on the same files."""
    export_hf(randomized(CONFIGS['deepseek']), str(tmp_path))
    cfg = json.loads((tmp_path / 'config.json').read_text())
    (tmp_path / 'config.json').write_text(json.dumps({**cfg, 'rope_interleave': False}))
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32).eval()
    back = import_hf(str(tmp_path)).eval()
    idx = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        ours, theirs = back(idx)[0], hf(idx).logits
    assert (ours - theirs).abs().max() < 1e-4


def test_export_refuses_what_deepseek_v3_cannot_express():
    with pytest.raises(ValueError, match="attention='mha'.*scoring_func='softmax'"):
        to_hf_config(ModelConfig(pos_emb='rope', norm='rmsnorm', mlp='swiglu', bias=False,
                                 n_routed_experts=4, scoring_func='softmax'))


def test_import_of_a_transformers_folder_without_its_mtp_layer(tmp_path, capfd):
    """transformers' save_pretrained keeps num_nextn_predict_layers in config.json but writes no MTP
    weights: such a folder imports without MTP (saying so), with the same logits."""
    model = randomized(CONFIGS['deepseek'])
    export_hf(model, str(tmp_path / 'ours'))
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / 'ours'), torch_dtype=torch.float32)
    hf.save_pretrained(str(tmp_path / 'theirs'))
    assert json.loads((tmp_path / 'theirs' / 'config.json').read_text())['num_nextn_predict_layers'] == 1
    back = import_hf(str(tmp_path / 'theirs')).eval()
    assert back.config.mtp_depth == 0 and 'importing without MTP' in capfd.readouterr().err
    idx = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], model(idx)[0])


@pytest.mark.parametrize('factor', [4.0, 40.0])
def test_yarn_frequencies_are_the_references_bit_for_bit(factor):
    """model.yarn_inv_freq equals transformers' YaRN frequencies exactly, also for DeepSeek-V3's
    factor 40 (not a power of 2: dividing theta_i by it rounds otherwise than 1 / (factor base^(2i/d)))."""
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from model import yarn_inv_freq
    cfg = DeepseekV3Config(qk_rope_head_dim=64, rope_theta=10000.0, rope_scaling=dict(
        type='yarn', factor=factor, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
        mscale=1.0, mscale_all_dim=1.0))
    reference, _ = ROPE_INIT_FUNCTIONS['yarn'](cfg, 'cpu')
    assert torch.equal(yarn_inv_freq(64, 10000.0, factor, 4096, 32, 1), reference)


def test_the_command_line_round_trip_and_what_it_refuses(tmp_path):
    """convert_hf.py: export, then import with the tokenizer of a checkpoint or of a data folder
    (meta.json); every script can load the result and its logits are the original's. Refused by name:
    an import without a tokenizer (no script could decode it), a tokenizer with more ids than the
    model, a router other than V3's, and the export of a quantized checkpoint (its int8 codes and
    scales are no DeepseekV3 weights)."""
    from checkpoint import load_model, save_checkpoint
    from conftest import run_script
    from data import save_tokenizer_spec
    from quant import quantize_model
    from tokenizer import ByteTokenizer, CharTokenizer
    model = randomized(CONFIGS['kimi'])
    tok = CharTokenizer([chr(32 + i) for i in range(95)])            # 95 ids + EOT = the model's 96
    ckpt = {'model': model.state_dict(), 'model_config': model.config.to_dict(), 'tokenizer': tok.spec(),
            'stage': 'train', 'step': 0, 'config': {}, 'metrics': {}}
    save_checkpoint(str(tmp_path / 'run'), ckpt)
    run_script('convert_hf.py', f'--out_dir={tmp_path}/run', f'--hf_dir={tmp_path}/hf', cwd=tmp_path)
    idx = torch.randint(0, 96, (1, 24))
    (tmp_path / 'data').mkdir()
    (tmp_path / 'data' / 'meta.json').write_text(json.dumps({'tokenizer': save_tokenizer_spec(tok.spec(), '.')}))
    for source in ('run', 'data'):
        run_script('convert_hf.py', '--direction=import', f'--hf_dir={tmp_path}/hf', f'--out_dir={tmp_path}/imp',
                   f'--tokenizer_from={tmp_path}/{source}', cwd=tmp_path)
        back, back_tok, _ = load_model(str(tmp_path / 'imp'))
        assert back_tok.decode(back_tok.encode('a fox')) == 'a fox'
        with torch.no_grad():
            torch.testing.assert_close(back.eval()(idx)[0], model(idx)[0])
    refused = run_script('convert_hf.py', '--direction=import', f'--hf_dir={tmp_path}/hf',
                         f'--out_dir={tmp_path}/none', cwd=tmp_path, check=False)
    assert refused.returncode != 0 and 'import needs tokenizer_from=' in refused.stderr
    (tmp_path / 'task').mkdir()                                      # instruction data: no tokenizer in it
    (tmp_path / 'task' / 'meta.json').write_text('{"kind": "chat"}')
    refused = run_script('convert_hf.py', '--direction=import', f'--hf_dir={tmp_path}/hf', f'--out_dir={tmp_path}/t',
                         f'--tokenizer_from={tmp_path}/task', cwd=tmp_path, check=False)
    assert refused.returncode != 0 and 'task/meta.json names no tokenizer' in refused.stderr, refused.stderr[-300:]
    save_checkpoint(str(tmp_path / 'bytes'), {**ckpt, 'tokenizer': ByteTokenizer().spec()})     # 257 ids
    refused = run_script('convert_hf.py', '--direction=import', f'--hf_dir={tmp_path}/hf', f'--out_dir={tmp_path}/b',
                         f'--tokenizer_from={tmp_path}/bytes', cwd=tmp_path, check=False)
    assert refused.returncode != 0 and "has 257 ids, more than the model's vocab_size 96" in refused.stderr
    cfg = json.loads((tmp_path / 'hf' / 'config.json').read_text())
    (tmp_path / 'hf' / 'config.json').write_text(json.dumps({**cfg, 'scoring_func': 'softmax'}))
    refused = run_script('convert_hf.py', '--direction=import', f'--hf_dir={tmp_path}/hf', f'--out_dir={tmp_path}/s',
                         f'--tokenizer_from={tmp_path}/run', cwd=tmp_path, check=False)
    assert refused.returncode != 0 and "scoring_func='softmax'" in refused.stderr
    quantized = quantize_model(randomized(CONFIGS['kimi']), 'int8')
    save_checkpoint(str(tmp_path / 'q'), {**ckpt, 'model': quantized.state_dict(), 'quantized': quantized.quantized,
                                          'parent': f'{tmp_path}/run'})
    refused = run_script('convert_hf.py', f'--out_dir={tmp_path}/q', f'--hf_dir={tmp_path}/hfq', cwd=tmp_path,
                         check=False)
    assert refused.returncode != 0 and 'is saved quantized (int8); export the full-precision' in refused.stderr
    assert not (tmp_path / 'hfq').exists()
