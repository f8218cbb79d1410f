"""
Pretraining: next-token prediction on a prepared token dataset.

$ python train.py config/shakespeare_char.py
$ python train.py config/tinystories_dense.py --max_iters=2000 --batch_size=16
$ torchrun --standalone --nproc_per_node=2 train.py config/tinystories_dense.py

Every ModelConfig field (n_layer, n_head, n_embd, pos_emb, ...) is a config key as well.
Writes out_dir/ckpt.pt (model, configs, tokenizer, optimizer, RNG), out_dir/log.jsonl and
out_dir/loss.png; `init_from='resume'` continues a run exactly where it stopped.
"""

import math
import os
import subprocess
import sys
import time

import torch
from tqdm import tqdm

from common import (RunLog, TokenData, capture_rng_state, close_runtime, configure, init_runtime,
                    load_checkpoint, load_tokenizer_spec, lr_at, measure_peak_flops,
                    model_config_from, restore_rng_state, save_checkpoint, synchronize)
from model import GPT, ModelConfig
from optim import build_optimizer, max_logits, qk_clip, set_lr

# -----------------------------------------------------------------------------
# default config values
# I/O
out_dir = 'out/run'
init_from = 'scratch'        # 'scratch' | 'resume' (continue out_dir) | 'out/RUN' (start from its weights)
eval_interval = 250          # evaluate (and checkpoint) every N steps, and at the end
eval_iters = 50              # batches per split in an evaluation
log_interval = 10            # log and refresh the progress bar every N steps
always_save_checkpoint = True  # save at every evaluation, not only when val loss improves
save_checkpoints = True      # False: write no checkpoint at all (sweeps, benchmarks)
eval_only = False
# data
dataset = 'tinystories'      # data/<dataset>/ written by prepare/<dataset>.py
data_dir = ''                # explicit folder; '' means data/<dataset>
batch_size = 32              # sequences per micro-batch (per GPU)
gradient_accumulation_steps = 1
# model: every ModelConfig field is a key too; these override its defaults
vocab_size = 0               # 0: the dataset's vocabulary, padded up to a multiple of 64
block_size = 256
# optimizer
optimizer = 'adamw'          # 'adamw' | 'muon' | 'muonclip' (Muon + QK-Clip)
learning_rate = 6e-4         # Muon's update is scaled to AdamW's RMS, so one rate serves both
min_lr = 6e-5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0              # clip the global gradient norm; 0 disables
muon_momentum = 0.95
qk_clip_tau = 100.0          # muonclip: heads whose max logit exceeds this are scaled back to it
log_max_logit = False        # record and log the max attention logit per layer (on with muonclip)
# schedule
lr_schedule = 'cosine'       # 'cosine' | 'wsd' | 'constant'
warmup_iters = 100
max_iters = 5000
lr_decay_iters = 0           # 0: max_iters
decay_frac = 0.2             # wsd: the share of lr_decay_iters spent decaying
# system
device = 'auto'              # 'auto' | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = 'auto'               # 'auto' (bf16 on capable GPUs, else fp32) | 'float32' | 'bfloat16' | 'float16'
compile = None               # torch.compile the model; None: on for CUDA
seed = 1337
peak_flops = 0.0             # MFU denominator in FLOP/s; 0: measure with a large matmul
# logging
tensorboard = False
wandb_project = ''           # non-empty: log to this wandb project
run_name = ''
# -----------------------------------------------------------------------------
config = configure(globals(), model_config=ModelConfig)
# -----------------------------------------------------------------------------

rt = init_runtime(device, dtype, seed)
master = rt.master
data_dir = data_dir or os.path.join('data', dataset)
lr_decay_iters = lr_decay_iters or max_iters
tokens_per_step = batch_size * block_size * gradient_accumulation_steps * rt.world_size
if master:
    print(f'{rt.device}, {rt.dtype}, world size {rt.world_size}; '
          f'{tokens_per_step:,} tokens per optimizer step')

# --- data (prepared on first use when a prepare script of that name exists) ----------------
if not os.path.exists(os.path.join(data_dir, 'meta.json')):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'prepare', f'{dataset}.py')
    if master and os.path.isfile(script):
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
    ckpt = load_checkpoint(out_dir if init_from == 'resume' else init_from, map_location='cpu')
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
raw_model = model
if master:
    print(f'model: {model.num_params() / 1e6:.2f}M parameters, '
          f'{model.flops_per_token(block_size) / 1e6:.1f} MFLOPs per token (training)')

try:
    optim = build_optimizer(model, optimizer, learning_rate, weight_decay, (beta1, beta2),
                            device_type=rt.device_type, momentum=muon_momentum)
except ValueError as e:
    sys.exit(f'error: {e}')
track_logits = optimizer == 'muonclip' or log_max_logit
model.track_max_logits(track_logits)                  # before torch.compile traces the flag
step, best_val_loss = 0, float('inf')
if init_from == 'resume':
    base_lrs = [g['base_lr'] for g in optim.param_groups]
    optim.load_state_dict(ckpt['optimizer'])
    for g, base_lr in zip(optim.param_groups, base_lrs):   # the config's rate wins over the saved one
        g['base_lr'] = base_lr
    step, best_val_loss = ckpt['step'], ckpt.get('best_val_loss', float('inf'))
    restore_rng_state(ckpt['rng'])
    if master:
        print(f'resuming {out_dir} at step {step}')
ckpt = None                                   # free the CPU copy
scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == 'float16')

if compile is None:
    compile = rt.device_type == 'cuda'
if compile:
    model = torch.compile(model)
if rt.ddp:
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == 'cuda' else None)


def get_batch(split, step, micro_step):
    """The batch is a function of (seed, step, micro-step, rank) alone, so a resumed run reads
    exactly the batches the uninterrupted run would have read."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + micro_step * 31 + rt.rank)
    return data.batch(split, batch_size, block_size, g, rt.device)


@torch.no_grad()
def evaluate():
    """Mean loss over eval_iters fixed batches per split (the same batches at every evaluation)."""
    model.eval()
    out = {}
    for split in ('train', 'val'):
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            g = torch.Generator().manual_seed(seed + 7919 * k + (0 if split == 'train' else 1))
            x, y = data.batch(split, batch_size, block_size, g, rt.device)
            with rt.autocast():
                _, loss = model(x, y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def nonfinite_step():
    """The first step whose loss was NaN/inf (-1 if none), agreed by every rank. Syncs the host."""
    bad = first_bad_step.clone()
    if rt.ddp:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return int(bad)


def checkpoint(metrics):
    return {'model': raw_model.state_dict(), 'model_config': model_cfg.to_dict(),
            'tokenizer': tok_spec, 'stage': 'pretrain', 'step': step,
            'optimizer': optim.state_dict(), 'config': config, 'metrics': metrics,
            'best_val_loss': best_val_loss, 'rng': capture_rng_state(), 'data_dir': data_dir}


log = RunLog(out_dir, enabled=master, tensorboard=tensorboard, wandb_project=wandb_project,
             run_name=run_name, config=config, resume=init_from == 'resume')
if master and not eval_only:
    peak = peak_flops or measure_peak_flops(rt.device_type, rt.dtype)
    print(f'MFU is relative to {peak / 1e12:.2f} TFLOP/s '
          f'({"given" if peak_flops else "measured with a large matmul"})')
flops_per_step = raw_model.flops_per_token(block_size) * tokens_per_step

# --- the training loop ----------------------------------------------------------------------
bar = tqdm(total=max_iters, initial=step, disable=not master, dynamic_ncols=True,
           mininterval=1 if sys.stderr.isatty() else 30, desc='train')
first_bad_step = torch.tensor(-1, device=rt.device)   # the first step whose loss was not finite
expert_share, last_heatmap_step = None, step          # MoE load shares summed between evaluations
x, y = get_batch('train', step, 0)
t_last, steps_since = time.perf_counter(), 0
expert_load = None                                    # (MoE layers, experts) tokens since the last log
logit_max, clipped_heads = None, torch.zeros((), device=rt.device, dtype=torch.long)
while True:
    lr = lr_at(step, learning_rate, min_lr, warmup_iters, lr_decay_iters, lr_schedule, decay_frac)
    set_lr(optim, lr / learning_rate)

    if (step % eval_interval == 0 or step == max_iters) and nonfinite_step() >= 0:
        break                                    # never evaluate or save a diverged model
    if (step % eval_interval == 0 or step == max_iters or eval_only) and master:
        losses = evaluate()
        bpb = losses['val'] / math.log(2) / bytes_per_token
        metrics = {'train/eval_loss': losses['train'], 'val/loss': losses['val'],
                   'val/ppl': math.exp(min(losses['val'], 50)), 'val/bpb': bpb}
        log.log(step, **metrics)
        bar.write(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                  f"val ppl {metrics['val/ppl']:.2f}, val bpb {bpb:.4f}")
        log.plot(keys=('train/loss', 'train/eval_loss', 'val/loss'))
        if track_logits:
            log.plot(keys=('attn/max_logit_all',), name='max_logit.png', ylabel='max attention logit')
        if expert_share is not None:
            log.heatmap(expert_share / expert_share.sum(1, keepdim=True), 'expert_load.png',
                        title=f'share of routed tokens per expert, steps {last_heatmap_step}-{step}')
            expert_share, last_heatmap_step = None, step
        if losses['val'] < best_val_loss or always_save_checkpoint:
            best_val_loss = min(best_val_loss, losses['val'])
            if step > 0 and not eval_only and save_checkpoints:
                save_checkpoint(out_dir, checkpoint(metrics))
    if eval_only or step == max_iters:
        break

    # forward / backward over the micro-batches, then one optimizer step
    loss_sum = torch.zeros((), device=rt.device)
    for micro_step in range(gradient_accumulation_steps):
        if rt.ddp:       # all-reduce gradients on the last micro-step only
            model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        with rt.autocast():
            _, loss = model(x, y)
            loss = loss / gradient_accumulation_steps
        # fetch the next batch while the GPU works on this one
        nxt_step, nxt_micro = (step, micro_step + 1) if micro_step + 1 < gradient_accumulation_steps \
            else (step + 1, 0)
        x, y = get_batch('train', nxt_step, nxt_micro)
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if grad_clip > 0:
        scaler.unscale_(optim)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    scaler.step(optim)
    scaler.update()
    optim.zero_grad(set_to_none=True)
    # MoE: move the router biases toward equal load (aux-loss-free), keep the loads for logging
    loads = raw_model.update_router_bias(reduce=torch.distributed.all_reduce if rt.ddp else None)
    if loads is not None:
        expert_load = loads if expert_load is None else expert_load + loads
    # QK-Clip: heads whose largest logit passed qk_clip_tau get their q/k weights scaled back
    if track_logits:
        reduce_max = (lambda t: torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)) \
            if rt.ddp else None
        if optimizer == 'muonclip':
            logits_now, n_clipped = qk_clip(raw_model, qk_clip_tau, reduce=reduce_max)
            clipped_heads += n_clipped
        else:
            logits_now = max_logits(raw_model, reduce=reduce_max)
        logit_max = logits_now if logit_max is None else torch.maximum(logit_max, logits_now)
    first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss_sum),
                                 torch.tensor(step, device=rt.device), first_bad_step)
    step += 1
    steps_since += 1
    bar.update(1)

    if step % log_interval == 0 and nonfinite_step() >= 0:
        break
    if step % log_interval == 0 and master:
        lossf = loss_sum.item()                  # one host sync per log_interval steps
        synchronize(rt.device_type)
        dt = (time.perf_counter() - t_last) / steps_since
        t_last, steps_since = time.perf_counter(), 0
        tok_s = tokens_per_step / dt
        mfu = flops_per_step / dt / peak
        row = {'train/loss': lossf, 'lr': lr, 'tokens_per_sec': tok_s, 'mfu': mfu,
               'step_time_ms': 1000 * dt}
        if grad_clip > 0:
            row['grad_norm'] = grad_norm.item()
        for part, value in raw_model.last_losses.items():      # lm / aux / mtp, last micro-batch
            row[f'train/{part}_loss'] = value.item()
        if expert_load is not None:
            # load imbalance per MoE layer: the busiest expert's tokens over the mean (1 = even)
            imbalance = (expert_load.max(1).values / expert_load.mean(1).clamp(min=1e-9)).tolist()
            row['moe/max_imbalance'] = max(imbalance)
            row['moe/imbalance'] = [round(v, 3) for v in imbalance]
            share = (expert_load / expert_load.sum(1, keepdim=True).clamp(min=1)).cpu()
            expert_share = share if expert_share is None else expert_share + share
            expert_load = None
        if logit_max is not None:
            per_layer = logit_max.max(1).values.tolist()      # the largest head of each layer
            row['attn/max_logit'] = [round(v, 2) for v in per_layer]
            row['attn/max_logit_all'] = max(per_layer)
            row['qk_clip/clipped_heads'] = int(clipped_heads)
            logit_max = None
            clipped_heads.zero_()
        log.log(step, **row)
        bar.set_postfix(loss=f'{lossf:.4f}', tok_s=f'{tok_s:,.0f}', mfu=f'{100 * mfu:.1f}%',
                        refresh=False)
bar.close()

bad = nonfinite_step()
if bad >= 0:
    last = os.path.join(out_dir, 'ckpt.pt')
    sys.exit(f'error: the training loss became NaN/inf at step {bad}; stopped. '
             f'The last good checkpoint is {last}' + ('' if os.path.exists(last) else ' (none yet)'))
if master and not eval_only:
    path = log.plot(keys=('train/loss', 'train/eval_loss', 'val/loss'))
    print(f'done: {step} steps' + (f'; checkpoint in {out_dir}/ckpt.pt' if save_checkpoints else '')
          + (f', loss curve {path}' if path else ''))
log.close()
close_runtime(rt)
