"""
Hugging Face interoperability: our checkpoints <-> a folder in DeepSeek-V3's Hugging Face format
(config.json + model.safetensors) that transformers' DeepseekV3ForCausalLM.from_pretrained loads.

$ python convert_hf.py --out_dir=out/tinystories_moe                      # export to out_dir/hf
$ python convert_hf.py --direction=import --hf_dir=path/to/folder --out_dir=out/imported \
      --tokenizer_from=out/tinystories_moe        # a checkpoint or data folder with the model's tokenizer

Exportable: attention='mla', pos_emb='rope' (any rope_scaling), RMSNorm, SwiGLU, no biases,
sigmoid routing (or a dense model), no sliding window. Weights use the layout of DeepSeek-V3's
released checkpoints (one tensor per expert); the multi-token-prediction modules, which
transformers does not run, go to mtp.safetensors in the same naming (model.layers.{n_layer+k}.*)
and come back on import.
"""

import json
import os
import sys

import torch

from model import GPT, ModelConfig

# -----------------------------------------------------------------------------
# our names <-> DeepSeek-V3's

_BLOCK = {'attn_norm.weight': 'input_layernorm.weight', 'mlp_norm.weight': 'post_attention_layernorm.weight',
          'mlp.router.weight': 'mlp.gate.weight',
          'mlp.router.e_score_correction_bias': 'mlp.gate.e_score_correction_bias'}


def check_exportable(c):
    problems = [msg for bad, msg in [
        (c.attention != 'mla', f"attention='{c.attention}' (DeepSeek-V3 needs 'mla')"),
        (c.norm != 'rmsnorm', f"norm='{c.norm}' (needs 'rmsnorm')"),
        (c.mlp != 'swiglu', f"mlp='{c.mlp}' (needs 'swiglu')"),
        (c.bias, 'bias=True (DeepSeek-V3 has no biases)'),
        (c.n_routed_experts > 0 and c.scoring_func != 'sigmoid', "scoring_func='softmax' (needs 'sigmoid')"),
        (c.sliding_window is not None, 'a sliding window'),
    ] if bad]
    if problems:
        raise ValueError('cannot export to DeepseekV3ForCausalLM: ' + '; '.join(problems))


def to_hf_config(c, eot_id=None):
    """A DeepSeek-V3 config.json for our ModelConfig."""
    check_exportable(c)
    moe = c.n_routed_experts > 0
    rope_scaling = dict(c.rope_scaling) if c.rope_scaling else None
    max_pos = c.block_size
    if rope_scaling:
        rope_scaling['type'] = rope_scaling.pop('rope_type', rope_scaling.get('type'))
        original = rope_scaling.get('original_max_position_embeddings', c.block_size)
        if rope_scaling['type'] == 'yarn':
            rope_scaling['original_max_position_embeddings'] = original
        else:                                          # linear / dynamic: transformers reads
            rope_scaling.pop('original_max_position_embeddings', None)   # max_position_embeddings
            if rope_scaling['type'] == 'dynamic':      # dynamic NTK grows past this length
                max_pos = original
    return {
        'architectures': ['DeepseekV3ForCausalLM'], 'model_type': 'deepseek_v3',
        'vocab_size': c.vocab_size, 'hidden_size': c.n_embd, 'intermediate_size': c.ffn_size,
        'moe_intermediate_size': c.expert_size, 'num_hidden_layers': c.n_layer,
        'num_attention_heads': c.n_head, 'num_key_value_heads': c.n_head,
        'n_shared_experts': c.n_shared_experts if moe else 0,
        'n_routed_experts': c.n_routed_experts if moe else 1,
        'num_experts_per_tok': c.num_experts_per_tok if moe else 1,
        'routed_scaling_factor': c.routed_scaling_factor, 'n_group': c.n_group, 'topk_group': c.topk_group,
        'norm_topk_prob': c.norm_topk_prob, 'scoring_func': 'sigmoid', 'topk_method': 'noaux_tc',
        'first_k_dense_replace': c.first_k_dense_replace if moe else c.n_layer, 'moe_layer_freq': 1,
        'kv_lora_rank': c.kv_lora_rank, 'q_lora_rank': c.q_lora_rank,
        'qk_nope_head_dim': c.qk_nope_head_dim, 'qk_rope_head_dim': c.qk_rope_head_dim,
        'v_head_dim': c.v_head_dim, 'hidden_act': 'silu', 'max_position_embeddings': max_pos,
        'rms_norm_eps': c.norm_eps, 'rope_theta': c.rope_theta, 'rope_scaling': rope_scaling,
        'rope_interleave': True, 'attention_bias': False, 'attention_dropout': 0.0,
        'tie_word_embeddings': c.tie_word_embeddings, 'initializer_range': c.init_std,
        'num_nextn_predict_layers': c.mtp_depth, 'bos_token_id': eot_id, 'eos_token_id': eot_id,
        'torch_dtype': 'float32', 'use_cache': True,
        'block_size': c.block_size,   # ours: the context we train and serve (for dynamic NTK it is
    }                                 # not max_position_embeddings), read back by from_hf_config


def from_hf_config(d):
    """Our ModelConfig from a DeepSeek-V3 config.json (as a dict). Routers other than V3's (sigmoid
    scores, the bias-corrected top-k 'noaux_tc': DeepSeek-V2's softmax and greedy top-k, say) are
    refused: their weights would load and score wrongly."""
    router = (d.get('scoring_func', 'sigmoid'), d.get('topk_method', 'noaux_tc'))
    if router != ('sigmoid', 'noaux_tc'):
        raise ValueError(f"config.json routes with scoring_func={router[0]!r}, topk_method={router[1]!r}; "
                         f"only DeepSeek-V3's ('sigmoid', 'noaux_tc') imports")
    rope = d.get('rope_scaling') or d.get('rope_parameters')
    if rope:
        rope = {k: v for k, v in rope.items() if k not in ('rope_theta',)}
        kind = rope.pop('rope_type', rope.pop('type', 'default'))
        rope = None if kind == 'default' else {'type': kind, **rope}
        if rope and kind == 'dynamic':
            rope.setdefault('original_max_position_embeddings', d.get('max_position_embeddings', 4096))
    theta = d.get('rope_theta') or (d.get('rope_parameters') or {}).get('rope_theta', 10000.0)
    n_layer = d['num_hidden_layers']
    moe = d.get('n_routed_experts') and d.get('first_k_dense_replace', 0) < n_layer
    block_size = d.get('block_size') or d.get('max_position_embeddings', 4096)   # ours, else theirs
    if rope and kind == 'dynamic' and not d.get('block_size'):    # dynamic NTK is made to go past it
        block_size = int(rope['factor'] * rope['original_max_position_embeddings'])
    return ModelConfig(
        vocab_size=d['vocab_size'], block_size=block_size, n_layer=n_layer,
        n_head=d['num_attention_heads'], n_embd=d['hidden_size'], bias=False,
        tie_word_embeddings=d.get('tie_word_embeddings', False), init_std=d.get('initializer_range', 0.02),
        attention='mla', q_lora_rank=d.get('q_lora_rank'), kv_lora_rank=d['kv_lora_rank'],
        qk_nope_head_dim=d['qk_nope_head_dim'], qk_rope_head_dim=d['qk_rope_head_dim'],
        v_head_dim=d['v_head_dim'], pos_emb='rope', rope_theta=float(theta), rope_scaling=rope,
        norm='rmsnorm', norm_eps=d.get('rms_norm_eps', 1e-6), mlp='swiglu',
        intermediate_size=d['intermediate_size'],
        n_routed_experts=d['n_routed_experts'] if moe else 0,
        n_shared_experts=d.get('n_shared_experts') or 0, num_experts_per_tok=d.get('num_experts_per_tok', 1),
        moe_intermediate_size=d.get('moe_intermediate_size'), scoring_func='sigmoid',
        norm_topk_prob=d.get('norm_topk_prob', True),
        routed_scaling_factor=float(d.get('routed_scaling_factor', 1.0)),
        n_group=d.get('n_group') or 1, topk_group=d.get('topk_group') or 1,
        first_k_dense_replace=d.get('first_k_dense_replace', 0) if moe else 0,
        mtp_depth=d.get('num_nextn_predict_layers', d.get('num_mtp_layers', 0)) or 0)


def _block_to_hf(sd, ours, theirs, out):
    """Copy one Block's tensors from our prefix `ours` to DeepSeek's prefix `theirs`."""
    for k, v in sd.items():
        if not k.startswith(ours):
            continue
        rest = k[len(ours):]
        if rest.startswith('mlp.experts.'):              # (E, out, in) -> one tensor per expert
            name = rest.split('.')[-1]                   # gate_proj / up_proj / down_proj
            for e in range(v.size(0)):
                out[f'{theirs}mlp.experts.{e}.{name}.weight'] = v[e]
            continue
        rest = _BLOCK.get(rest, rest)
        out[theirs + rest.replace('attn.', 'self_attn.', 1)] = v


def to_hf_state_dict(model):
    """(main weights, MTP weights) in DeepSeek-V3's checkpoint names."""
    c = model.config
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    main = {'model.embed_tokens.weight': sd['tok_emb.weight'], 'model.norm.weight': sd['norm.weight']}
    if not c.tie_word_embeddings:
        main['lm_head.weight'] = sd['lm_head.weight']
    for i in range(c.n_layer):
        _block_to_hf(sd, f'layers.{i}.', f'model.layers.{i}.', main)
        if c.is_moe_layer(i) and not c.n_shared_experts:   # transformers builds a 0-wide one
            for name, shape in (('gate_proj', (0, c.n_embd)), ('up_proj', (0, c.n_embd)),
                                ('down_proj', (c.n_embd, 0))):
                main[f'model.layers.{i}.mlp.shared_experts.{name}.weight'] = torch.zeros(shape)
    mtp = {}
    for k in range(c.mtp_depth):
        p, q = f'mtp.{k}.', f'model.layers.{c.n_layer + k}.'
        _block_to_hf(sd, p + 'block.', q, mtp)
        for ours, theirs in (('enorm', 'enorm'), ('hnorm', 'hnorm'), ('eh_proj', 'eh_proj'),
                             ('norm', 'shared_head.norm')):
            mtp[f'{q}{theirs}.weight'] = sd[f'{p}{ours}.weight']
        mtp[f'{q}embed_tokens.weight'] = sd['tok_emb.weight']      # DeepSeek stores shared copies
        mtp[f'{q}shared_head.head.weight'] = sd['lm_head.weight']
    # safetensors refuses tensors that share memory (tied weights, expert slices)
    return ({k: v.clone() for k, v in main.items()}, {k: v.clone() for k, v in mtp.items()})


def interleave_rope_rows(w, d_nope, d_rope, rows_per_head):
    """w's RoPE rows from the half-split layout (transformers' rope_interleave=False rotates the
    pairs (i, i + d/2)) to ours, adjacent pairs (2i, 2i + 1), head by head: our row 2i is their row
    i, our row 2i + 1 their row i + d/2. q and k move alike, so q.k and the logits do not change."""
    half = d_rope // 2
    order = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()   # 0, d/2, 1, ...
    w = w.clone().view(-1, rows_per_head, *w.shape[1:])
    w[:, d_nope:d_nope + d_rope] = w[:, d_nope:d_nope + d_rope][:, order]
    return w.flatten(0, 1)


def from_hf_state_dict(hf, c, rope_interleave=True):
    """Our state dict from DeepSeek-V3 tensors (per-expert, or transformers' fused gate_up_proj).
    rope_interleave=False (a config.json that says so): the RoPE rows are reordered to ours."""
    inverse = {v: k for k, v in _BLOCK.items()}
    sd = {'tok_emb.weight': hf['model.embed_tokens.weight'], 'norm.weight': hf['model.norm.weight'],
          'lm_head.weight': hf.get('lm_head.weight', hf['model.embed_tokens.weight'])}

    def block(theirs, ours):
        experts = {}
        for k, v in hf.items():
            if not k.startswith(theirs):
                continue
            rest = k[len(theirs):]
            if rest.startswith('mlp.experts.'):
                parts = rest.split('.')
                if parts[2] == 'gate_up_proj':           # transformers 5's fused layout
                    g, u = v.chunk(2, dim=1)
                    sd[ours + 'mlp.experts.gate_proj'], sd[ours + 'mlp.experts.up_proj'] = g, u
                elif parts[2] == 'down_proj':
                    sd[ours + 'mlp.experts.down_proj'] = v
                else:                                    # experts.{e}.{name}.weight
                    experts.setdefault(parts[3], {})[int(parts[2])] = v
                continue
            if rest.split('.')[0] in ('enorm', 'hnorm', 'eh_proj', 'shared_head', 'embed_tokens'):
                continue
            if rest.startswith('mlp.shared_experts.') and v.numel() == 0:
                continue                                 # the 0-wide stand-in written by export
            rest = inverse.get(rest, rest)
            sd[ours + rest.replace('self_attn.', 'attn.', 1)] = v
        for name, per in experts.items():
            sd[ours + f'mlp.experts.{name}'] = torch.stack([per[e] for e in sorted(per)])

    for i in range(c.n_layer):
        block(f'model.layers.{i}.', f'layers.{i}.')
    for k in range(c.mtp_depth):
        q, p = f'model.layers.{c.n_layer + k}.', f'mtp.{k}.'
        block(q, p + 'block.')
        for ours, theirs in (('enorm', 'enorm'), ('hnorm', 'hnorm'), ('eh_proj', 'eh_proj'),
                             ('norm', 'shared_head.norm')):
            sd[f'{p}{ours}.weight'] = hf[f'{q}{theirs}.weight']
    if not rope_interleave:
        d_nope, d_rope = c.qk_nope_head_dim, c.qk_rope_head_dim
        for k in list(sd):
            if k.endswith(('attn.q_proj.weight', 'attn.q_b_proj.weight')):    # per head [nope; rope]
                sd[k] = interleave_rope_rows(sd[k], d_nope, d_rope, d_nope + d_rope)
            elif k.endswith('attn.kv_a_proj_with_mqa.weight'):               # [latent; the shared k_rope]
                sd[k] = interleave_rope_rows(sd[k], c.kv_lora_rank, d_rope, c.kv_lora_rank + d_rope)
    return sd


def export_hf(model, folder, eot_id=None):
    """Write config.json, model.safetensors (and mtp.safetensors) for transformers."""
    from safetensors.torch import save_file
    cfg = to_hf_config(model.config, eot_id)
    main, mtp = to_hf_state_dict(model)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(cfg, f, indent=2)
    save_file(main, os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})
    if mtp:
        save_file(mtp, os.path.join(folder, 'mtp.safetensors'), metadata={'format': 'pt'})
    return folder


def import_hf(folder):
    """Our GPT from a DeepSeek-V3 folder (config.json + *.safetensors, sharded or not)."""
    from safetensors.torch import load_file
    with open(os.path.join(folder, 'config.json')) as f:
        d = json.load(f)
    c = from_hf_config(d)
    hf = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith('.safetensors'):
            hf.update(load_file(os.path.join(folder, name)))
    if c.mtp_depth and f'model.layers.{c.n_layer}.enorm.weight' not in hf:
        # transformers' DeepseekV3ForCausalLM names num_nextn_predict_layers in its config but never
        # builds or saves the MTP layer; DeepSeek's own folders do carry it
        print(f'{folder}: config.json names {c.mtp_depth} MTP layer(s) but the weights hold none '
              f'(a transformers save_pretrained folder); importing without MTP', file=sys.stderr)
        c.mtp_depth = 0
    model = GPT(c)
    sd = from_hf_state_dict(hf, c, rope_interleave=d.get('rope_interleave', True))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (c.tie_word_embeddings and k == 'lm_head.weight')]
    if missing or unexpected:
        raise ValueError(f'{folder}: missing {missing[:5]}, unexpected {unexpected[:5]}')
    return model


if __name__ == '__main__':
    from checkpoint import load_checkpoint, load_model, save_checkpoint
    from config import configure
    from data import load_tokenizer_spec
    from tokenizer import tokenizer_from_spec
    # -------------------------------------------------------------------------
    direction = 'export'          # 'export' (ckpt -> HF folder) | 'import' (HF folder -> ckpt)
    out_dir = 'out/run'           # our checkpoint folder
    hf_dir = ''                   # the Hugging Face folder; '' = out_dir/hf
    tokenizer_from = ''           # import: a checkpoint folder (any stage's) or a prepared data folder
                                  # (data/<name>, its meta.json) whose tokenizer the model is saved with
    # -------------------------------------------------------------------------
    configure(globals())
    hf_dir = hf_dir or os.path.join(out_dir, 'hf')
    if direction == 'export':
        ckpt = load_checkpoint(out_dir)
        if ckpt.get('quantized'):          # its int8 / int4 codes and scales are no DeepseekV3 weights
            sys.exit(f"error: {out_dir} is saved quantized ({ckpt['quantized']['kind']}); export the full-precision "
                     f"checkpoint it came from ({ckpt.get('parent') or 'its parent'}) instead")
        model, tok, ckpt = load_model(out_dir, ckpt=ckpt)
        try:
            export_hf(model, hf_dir, tok.eot_id)
        except ValueError as e:
            sys.exit(f'error: {e}')
        print(f'wrote {hf_dir} (load with DeepseekV3ForCausalLM.from_pretrained)')
    elif direction == 'import':
        if not tokenizer_from:   # every script that loads a checkpoint decodes with its tokenizer
            sys.exit("error: import needs tokenizer_from= (a checkpoint folder, or a data folder holding "
                     "meta.json) whose tokenizer fits the imported model's vocabulary")
        if os.path.isfile(os.path.join(tokenizer_from, 'meta.json')):
            with open(os.path.join(tokenizer_from, 'meta.json')) as f:
                meta = json.load(f)
            if 'tokenizer' not in meta:    # (a task folder: instruction data, no token files)
                sys.exit(f"error: {tokenizer_from}/meta.json names no tokenizer; give a tokenized data folder "
                         f"(data/<name>, with train.bin) or a checkpoint folder")
            spec = load_tokenizer_spec(meta['tokenizer'], tokenizer_from)
        else:
            spec = load_checkpoint(tokenizer_from)['tokenizer']
        try:
            model = import_hf(hf_dir)
        except ValueError as e:
            sys.exit(f'error: {e}')
        n_ids = tokenizer_from_spec(spec).vocab_size
        if n_ids > model.config.vocab_size:
            sys.exit(f"error: the tokenizer of {tokenizer_from} has {n_ids:,} ids, more than the model's "
                     f"vocab_size {model.config.vocab_size:,}: attach the tokenizer the model was trained with")
        save_checkpoint(out_dir, {'model': model.state_dict(), 'model_config': model.config.to_dict(),
                                  'tokenizer': spec, 'stage': 'import', 'step': 0, 'config': {},
                                  'metrics': {}, 'parent': hf_dir})
        print(f'wrote {out_dir}/ckpt.pt')
    else:
        sys.exit(f"error: direction='{direction}'; valid: export, import")
