"""
Pretraining: next-token prediction on a prepared token dataset.

$ python train.py config/tinystories_moe.py
$ python train.py config/shakespeare_char.py
$ python train.py config/tinystories_moe.py --optimizer=muonclip --max_iters=2000
$ torchrun --standalone --nproc_per_node=2 train.py config/tinystories_moe.py              (DDP)
$ torchrun --standalone --nproc_per_node=2 train.py config/tinystories_moe.py --fsdp=True  (FSDP2)

Every ModelConfig field (n_layer, n_head, n_embd, attention, n_routed_experts, ...) is a config
key, and so is every key of common.training_defaults() (schedule, optimizer, logging, system).
Writes out_dir/ckpt.pt (model, configs, tokenizer, optimizer, RNG; fsdp=True: the sharded
out_dir/ckpt_dcp/, which every loader reads too), out_dir/log.jsonl,
out_dir/loss.png (and expert_load.png, max_logit.png); init_from='resume' continues exactly.
"""

import math
import os
import subprocess
import sys

import torch

from common import (TokenData, Trainer, close_runtime, configure, init_runtime,
                    load_checkpoint, load_tokenizer_spec, model_config_from, training_defaults)
from model import GPT, ModelConfig

# -----------------------------------------------------------------------------
# default config values (and those of common.training_defaults(): optimizer, schedule, logging)
out_dir = 'out/run'
dataset = 'tinystories'      # data/<dataset>/ written by prepare/<dataset>.py
data_dir = ''                # explicit folder; '' means data/<dataset>
batch_size = 32              # sequences per micro-batch (per GPU)
# model: every ModelConfig field is a key too; these override its defaults
vocab_size = 0               # 0: the dataset's vocabulary, padded up to a multiple of 64
block_size = 256
# -----------------------------------------------------------------------------
config = configure(globals(), model_config=ModelConfig, defaults=training_defaults())
# (configure() also defines every training_defaults() and ModelConfig key as a global here)
# -----------------------------------------------------------------------------

rt = init_runtime(device, dtype, seed)
data_dir = data_dir or os.path.join('data', dataset)

# --- data (prepared on first use when a prepare script of that name exists) ----------------
if not os.path.exists(os.path.join(data_dir, 'meta.json')):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'prepare', f'{dataset}.py')
    if rt.master and os.path.isfile(script):
        print(f'{data_dir} is missing; preparing it with {script}')
        rc = subprocess.call([sys.executable, script, f'--out_dir={data_dir}'])
        if rc:
            sys.exit(f'error: {script} failed (exit {rc}); prepare the data by hand, e.g. '
                     f'python prepare/{dataset}.py --source=PATH')
    if rt.ddp:
        torch.distributed.barrier()
data = TokenData(data_dir)
tok_spec = load_tokenizer_spec(data.meta['tokenizer'], data_dir)
bytes_per_token = data.bytes_per_token('val')

# --- model ----------------------------------------------------------------------------------
ckpt = None
if init_from == 'scratch':
    if vocab_size == 0:
        vocab_size = config['vocab_size'] = 64 * math.ceil(data.meta['vocab_size'] / 64)
    model_cfg = model_config_from(config, ModelConfig)
else:
    ckpt = load_checkpoint(out_dir if init_from == 'resume' else init_from)
    if ckpt['tokenizer'] != tok_spec:
        sys.exit(f"error: the checkpoint's tokenizer ({ckpt['tokenizer']['kind']}) differs from "
                 f"the dataset's ({tok_spec['kind']}) in {data_dir}")
    model_cfg = ModelConfig(**{**ckpt['model_config'], 'dropout': config['dropout']})
    block_size = min(block_size, model_cfg.block_size)
if data.meta['vocab_size'] > model_cfg.vocab_size:
    sys.exit(f"error: vocab_size={model_cfg.vocab_size} is smaller than the dataset's vocabulary "
             f"({data.meta['vocab_size']})")
if block_size > model_cfg.block_size:
    sys.exit(f'error: block_size={block_size} exceeds the model block_size {model_cfg.block_size}')
model = GPT(model_cfg)
if ckpt is not None:
    model.load_state_dict(ckpt['model'])
model.to(rt.device)
tokens_per_step = batch_size * block_size * gradient_accumulation_steps * rt.world_size
if rt.master:
    print(f'{rt.device}, {rt.dtype}, world size {rt.world_size}; {tokens_per_step:,} tokens per step; '
          f'model: {model.num_params() / 1e6:.2f}M parameters ({model.active_params() / 1e6:.2f}M active), '
          f'{model.flops_per_token(block_size) / 1e6:.1f} MFLOPs per token (training)')
trainer = Trainer(config, rt, model, 'pretrain', tok_spec, tokens_per_step, model.flops_per_token(block_size),
                  resume=ckpt if init_from == 'resume' else None,
                  checkpoint_extra={'data_dir': data_dir})
ckpt = None                                   # free the CPU copy


def batch_fn(step, micro_step):
    """A batch of random windows, drawn as a function of the step and the micro-batch's global
    index (so 2 ranks x accumulation k == 1 rank x accumulation 2k)."""
    return data.batch('train', batch_size, block_size, trainer.batch_generator(step, micro_step), rt.device)


def loss_fn(model, x, y):
    """Next-token loss (and the MTP and balance terms, when the model has them)."""
    return model(x, y, return_logits=False)[1]


@torch.no_grad()
def evaluate(model):
    """Mean loss over eval_iters fixed batches per split (the same batches at every evaluation),
    val perplexity and bits per byte (nats per token / ln 2 / bytes per token)."""
    out = {}
    for split in ('train', 'val'):
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            g = torch.Generator().manual_seed(seed + 7919 * k + (0 if split == 'train' else 1))
            x, y = data.batch(split, batch_size, block_size, g, rt.device)
            with rt.autocast():
                _, loss = model(x, y, return_logits=False)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    return {'train/eval_loss': out['train'], 'val/loss': out['val'],
            'val/ppl': math.exp(min(out['val'], 50)), 'val/bpb': out['val'] / math.log(2) / bytes_per_token}


trainer.run(loss_fn, evaluate, plot_keys=('train/loss', 'train/eval_loss', 'val/loss'), batch_fn=batch_fn)
close_runtime(rt)
