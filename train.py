"""
Pretraining: next-token prediction on a prepared token dataset (prepare/).

$ python train.py config/tinystories_moe.py
$ python train.py config/shakespeare_char.py
$ python train.py config/tinystories_moe.py --optimizer=muonclip --max_iters=2000
$ torchrun --standalone --nproc_per_node=2 train.py config/tinystories_moe.py              (DDP)
$ torchrun --standalone --nproc_per_node=2 train.py config/tinystories_moe.py --fsdp=True  (FSDP2)
$ torchrun --standalone --nproc_per_node=2 train.py config/tinystories_moe.py --expert_parallel=2

Every setting below is a config key, and so is every ModelConfig field (model.py: n_layer,
n_head, n_embd, attention, n_routed_experts, ...). Writes out_dir/ckpt.pt (model, configs,
tokenizer, optimizer, RNG; with fsdp=True the sharded out_dir/ckpt_dcp/, which every loader
reads too), out_dir/log.jsonl and out_dir/loss.png (and expert_load.png, max_logit.png);
init_from='resume' continues exactly.
"""

import math
import os
import sys

import torch

from checkpoint import checkpoint_path, load_checkpoint
import config as _config              # (its last_set_by, last_file_values: where the settings came from)
from config import configure, last_given, model_config_from
from data import TokenData, eval_generator, load_tokenizer_spec, prepare_if_missing
from model import GPT, ModelConfig, padded_vocab_size
from runlog import progress
from runtime import CUDAGraphStep, StepDiagnostics, close_runtime, init_runtime
from training import Run, check_loop_settings

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/run'            # where ckpt.pt, log.jsonl and the plots go
init_from = 'scratch'        # 'scratch' | 'resume' (continue out_dir) | 'out/RUN' (start from its weights)
eval_interval = 250          # evaluate (and checkpoint) every N steps, and at the end
eval_iters = 50              # batches per split per evaluation
log_interval = 10            # log and refresh the progress bar every N steps
always_save_checkpoint = True  # save at every evaluation, not only when val loss improves
save_checkpoints = True      # False: write no checkpoint at all (sweeps, benchmarks)
eval_only = False            # evaluate once and exit (prints the numbers; no log, no checkpoint)
# data
dataset = 'tinystories'      # data/<dataset>/, made on first use by the prepare script below
prepare = ''                 # that script and its flags, e.g. 'tinystories.py --tokenizer=bpe'; '': <dataset>.py
data_dir = ''                # an explicit folder (never prepared here); '' means data/<dataset>
batch_size = 32              # sequences per micro-batch (per GPU)
block_size = 256             # tokens per sequence
gradient_accumulation_steps = 1  # micro-batches summed into one optimizer step
# model: these two and every ModelConfig field (n_layer, attention, n_routed_experts, ...)
vocab_size = 0               # 0: the dataset's vocabulary, padded up to a multiple of 64
dropout = 0.0                # dropout probability (0: off, as in pretraining LLMs today)
# optimizer
optimizer = 'adamw'          # 'adamw' | 'muon' | 'muonclip' (Muon + QK-Clip)
learning_rate = 6e-4         # Muon's update is scaled to AdamW's RMS, so one rate serves both
min_lr = 6e-5                # the learning rate at the end of the decay
weight_decay = 0.1           # decoupled weight decay of the matrices (linear weights, embeddings), not of
                             # biases or norm gains
beta1 = 0.9                  # AdamW's first-moment decay
beta2 = 0.95                 # AdamW's second-moment decay
grad_clip = 1.0              # clip the global gradient norm; 0 disables
muon_momentum = 0.95         # muon / muonclip: the momentum of the orthogonalized update
qk_clip_tau = 100.0          # muonclip: heads whose max logit exceeds this are scaled back to it
log_max_logit = False        # record and log the max attention logit per layer (on with muonclip)
# schedule
lr_schedule = 'cosine'       # 'cosine' | 'wsd' (warmup-stable-decay) | 'constant'
warmup_iters = 100           # steps of linear warm-up to learning_rate (from
                             # learning_rate / (warmup_iters + 1) at step 0)
max_iters = 5000             # optimizer steps in all
lr_decay_iters = 0           # 0: max_iters
decay_frac = 0.2             # wsd: the share of lr_decay_iters spent decaying
# system
device = 'auto'              # 'auto' | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = 'auto'               # 'auto' (bf16 on capable GPUs, else fp32) | 'float32' | 'bfloat16' | 'float16'
compile = None               # torch.compile the model; None: on for CUDA
compile_mode = 'default'     # 'default' | 'reduce-overhead' | 'max-autotune' | 'max-autotune-no-cudagraphs'
cuda_graph_train = False     # CUDA: capture the whole step (forward, backward, clipping, AdamW, router
                             # biases) once as a CUDA graph and replay it: no Python between kernels
fsdp = False                 # under torchrun: shard parameters, gradients and optimizer state (FSDP2)
expert_parallel = 0          # under torchrun with N processes, N: each rank keeps 1/N of every MoE layer's
                             # routed experts, tokens travel to them by all_to_all (parallel.py); 0: off
seed = 1337                  # the random seed: initialization, batch order, sampling
peak_flops = 0.0             # MFU denominator in FLOP/s; 0: measure with a large matmul
profile = ''                 # append torch.profiler tables of the 11th and 12th steps of this run to this file
cuda_sync_check = False      # CUDA: warn, with a stack, at every host-device sync inside a step
# logging
tensorboard = False          # also log to out_dir/tb (needs tensorboard)
wandb_project = ''           # non-empty: log to this wandb project
run_name = ''                # wandb's run name; '': wandb picks one
# -----------------------------------------------------------------------------
config = configure(globals(), model_config=ModelConfig)
check_loop_settings(config)
# -----------------------------------------------------------------------------

rt = init_runtime(device, dtype, seed)
if cuda_sync_check and rt.device_type != 'cuda':
    sys.exit(f"error: cuda_sync_check=True needs a CUDA GPU (device is '{rt.device}'); "
             f"it reports where the host waits for one")

# --- data (data/<dataset> is prepared on first use by prepare/<dataset>.py) -----------------
_set_by, _file_values = _config.last_set_by, _config.last_file_values   # (underscored: no settings)
if prepare and _set_by.get('prepare', '').endswith('.py') and _set_by.get('dataset', '').startswith('--') \
        and dataset != _file_values.get('dataset'):
    # a config file's prepare= makes that config's own dataset: another --dataset=NAME of the command
    # (a typo, or one's own data) is not made by it (it made TinyStories under the new name), but by
    # prepare/NAME.py where there is one
    prepare = ''
data_dir = prepare_if_missing(dataset, data_dir, prepare, rt)
data = TokenData(data_dir)
tok_spec = load_tokenizer_spec(data.meta['tokenizer'], data_dir)
for split in data.lengths:     # checked before any work (data.batch would only fail at its first batch)
    if data.lengths[split] <= block_size + 1:
        sys.exit(f"error: the {split} split of {data_dir} has {data.lengths[split]:,} tokens; a window of "
                 f"block_size + 1 = {block_size + 1} needs more; lower block_size or prepare more data into it")

# --- model ----------------------------------------------------------------------------------
ckpt = None
if init_from == 'scratch':
    if rt.master and save_checkpoints and not eval_only and os.path.exists(checkpoint_path(out_dir)):
        print(f"note: {out_dir} holds a run already; this one, from scratch, replaces it as it saves "
              f"(--out_dir=... keeps it; --init_from=resume continues it)", file=sys.stderr)
    if vocab_size == 0:
        vocab_size = config['vocab_size'] = padded_vocab_size(data.meta['vocab_size'])
    model_cfg = model_config_from(config, ModelConfig)
else:
    ckpt = load_checkpoint(out_dir if init_from == 'resume' else init_from)
    if ckpt.get('quantized'):          # (training.Run refuses a quantized model in the other stages)
        sys.exit(f"error: the model train.py was given is quantized (weights stored as int8/int4, frozen): "
                 f"training needs the full-precision checkpoint it was quantized from, {ckpt.get('parent')}")
    if ckpt.get('tokenizer') is None:   # (an import from Hugging Face made without tokenizer_from=)
        sys.exit(f"error: the checkpoint holds no tokenizer; import it again with convert_hf.py --direction=import "
                 f"--tokenizer_from={data_dir} (the dataset's tokenizer, if the model was trained with it)")
    if ckpt['tokenizer'] != tok_spec:
        sys.exit(f"error: the checkpoint's tokenizer ({ckpt['tokenizer']['kind']}) differs from "
                 f"the dataset's ({tok_spec['kind']}) in {data_dir}")
    # the model is the checkpoint's; model settings this command gives (a balancing rate, the router's
    # scoring, RoPE's base) change it where they keep its parameters' names and shapes, else stop
    saved = ModelConfig(**ckpt['model_config']).to_dict()   # (with the defaults of fields newer than it)
    asked = {k: config[k] for k in sorted(last_given) if k in saved and k not in ('dropout', 'block_size')
             and config[k] != saved[k]}
    model_cfg = ModelConfig(**{**saved, **asked, 'dropout': dropout})
    if asked:
        def shapes(cfg):              # (parameters listed once each: a tied head is not a parameter of its own)
            with torch.device('meta'):
                m = GPT(cfg)
            return {k: v.shape for k, v in [*m.named_parameters(), *m.named_buffers()]}
        said = ', '.join(f'{k}={v!r} (the checkpoint has {saved[k]!r})' for k, v in asked.items())
        if shapes(ModelConfig(**saved)) != shapes(model_cfg):
            sys.exit(f"error: {said} changes the model's parameters, but init_from={init_from!r} continues "
                     f"the checkpoint's model: leave these out, or train a new model (init_from='scratch')")
        if rt.master:
            print(f'the checkpoint\'s model, changed by this command: {said}')
    if 'block_size' in last_given and block_size > model_cfg.block_size:
        sys.exit(f"error: block_size={block_size} is longer than the checkpoint's model was built for "
                 f"({model_cfg.block_size}): train on windows of {model_cfg.block_size} or fewer tokens")
    block_size = min(block_size, model_cfg.block_size)     # (the default: the model's own where it is shorter)
    # the saved config describes the model trained (the checkpoint's, not this run's defaults)
    config.update({**model_cfg.to_dict(), 'block_size': block_size})
if data.meta['vocab_size'] > model_cfg.vocab_size:
    sys.exit(f"error: vocab_size={model_cfg.vocab_size} is smaller than the dataset's vocabulary "
             f"({data.meta['vocab_size']})")
model = GPT(model_cfg)
if ckpt is not None:
    model.load_state_dict(ckpt['model'])
model.to(rt.device)
tokens_per_step = batch_size * block_size * gradient_accumulation_steps * rt.world_size
flops_per_token = model.flops_per_token(block_size)
if rt.master:
    print(f'{rt.device}, {rt.dtype}, world size {rt.world_size}; {tokens_per_step:,} tokens per step; '
          f'model: {model.num_params() / 1e6:.2f}M parameters ({model.active_params() / 1e6:.2f}M active), '
          f'{flops_per_token / 1e6:.1f} MFLOPs per token (training)')
    step_flops = flops_per_token * tokens_per_step
    if rt.device_type == 'cpu' and step_flops > 1e12:      # e.g. config/tinystories_moe.py on a laptop
        # (config/tinystories_cpu.py trains about 10k tokens/s x 7.6 MFLOPs on 2 cores: 0.07 TFLOP/s)
        # an evaluation is a forward pass (a third of a training step's FLOPs) per batch and split
        eval_minutes = (eval_iters * (1 + len(data.val_splits)) * flops_per_token * batch_size * block_size / 3
                        / 0.07e12 / 60)
        print(f'note: {step_flops / 1e12:.1f} TFLOPs a step, sized for a GPU: a 2-core CPU does about 0.07 '
              f'TFLOP/s, so several minutes a step here, and about {eval_minutes:,.0f} minutes for each '
              f'evaluation (the first one before step 1); config/tinystories_cpu.py is the CPU-sized run '
              f'(a few minutes in all)', file=sys.stderr)
    epochs = max_iters * tokens_per_step / max(data.lengths['train'], 1)
    if epochs > 20:                                   # e.g. the GPU config on the offline TinyStories sample
        print(f"note: {max_iters:,} steps x {tokens_per_step:,} tokens read the {data.lengths['train']:,} training "
              f"tokens of {data_dir} about {epochs:,.0f} times: expect the val loss to turn up (overfitting) "
              f"long before the end; more data, or fewer steps (max_iters)", file=sys.stderr)

# optimizer, FSDP / DDP, torch.compile, the log, and the resumed optimizer state, step and RNG
run = Run(config, rt, model, 'pretrain', tok_spec, flops_per_token,
          resume=ckpt if init_from == 'resume' else None, checkpoint_extra={'data_dir': data_dir})
ckpt = None                                   # free the CPU copy


def get_batch(split, step, micro_step):
    """x, y (batch_size, block_size): random windows of the split, y shifted left by one token,
    drawn as a function of (seed, step, the micro-batch's global index): a resumed run reads
    the same batches, and 2 ranks x accumulation k read those of 1 rank x accumulation 2k."""
    return data.batch(split, batch_size, block_size, run.batch_generator(step, micro_step), rt.device)


@torch.no_grad()
def evaluate(model):
    """Mean loss over eval_iters fixed batches per split (the same batches at every evaluation);
    for each held-out split (val, and e.g. val_tinystories) also bits per byte, nats per token /
    ln 2 / bytes per token, which compares across tokenizers; val perplexity."""
    splits = ['train'] + data.val_splits
    print(f'evaluating: {eval_iters} batches of {batch_size} x {block_size} tokens on each of {", ".join(splits)}')
    out = {}
    for split in splits:
        losses = torch.zeros(eval_iters)
        # a bar where someone watches a terminal (a CPU's evaluation of a GPU-sized model takes minutes)
        for k in progress(range(eval_iters), desc=f'evaluating {split}', leave=False,
                          disable=not (rt.master and sys.stderr.isatty())):
            g = eval_generator(k, split)
            x, y = data.batch(split, batch_size, block_size, g, rt.device)
            with rt.autocast():
                _, loss = model(x, y, return_logits=False)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    metrics = {}                                 # (printed in this order: the held-out splits first)
    for split in data.val_splits:
        metrics[f'{split}/loss'] = out[split]
        metrics[f'{split}/bpb'] = out[split] / math.log(2) / data.bytes_per_token(split)
    metrics['val/ppl'] = math.exp(min(out['val'], 50))
    # the same fixed batches of the training split at every evaluation: the objective's train/loss
    # is each step's own batches and holds the MTP and balance terms too
    metrics['train/eval_loss'] = out['train']
    return metrics


def train_step(batches):
    """Forward and backward over the micro-batches, then one optimizer step. Only device tensors
    in and out (no host sync), so that cuda_graph_train can capture it whole."""
    loss_sum = torch.zeros((), device=rt.device)
    for micro, (x, y) in enumerate(batches):
        with run.sync(micro):                      # DDP / FSDP reduce gradients on the last only
            with rt.autocast():
                loss = run.model(x, y, return_logits=False)[1] / gradient_accumulation_steps
            run.backward(loss)
        loss_sum += loss.detach()
    return {'loss': loss_sum, **run.optimizer_step()}   # clip, step, zero grads, router biases


if cuda_graph_train:
    why = ('needs a CUDA GPU' if rt.device_type != 'cuda' else
           'runs in one process, not under torchrun' if rt.ddp else
           "needs optimizer='adamw'" if optimizer != 'adamw' else
           "needs dtype 'bfloat16' or 'float32' (float16's loss scaling reads the scale on the host)"
           if rt.dtype == 'float16' else
           'records no max attention logits: set log_max_logit=False' if run.track_logits else '')
    if why:
        sys.exit(f'error: cuda_graph_train=True {why}')
    run.make_optimizer_capturable()           # the optimizer's step counts and lr on the device
    train_step = CUDAGraphStep(train_step)    # copies each step's batches in, replays the graph

# --- the training loop ------------------------------------------------------------------------
# the next-token loss (train/lm_loss: the objective train/loss also holds the MTP and balance terms,
# which the evaluations leave out) beside the evaluated ones
plots = (('train/lm_loss', 'train/eval_loss', *(f'{s}/loss' for s in data.val_splits)), 'loss.png', 'loss (nats/token)')
step = run.step                              # 0, or where a resumed run stopped
diagnostics = StepDiagnostics(profile, cuda_sync_check, rt, step, 'pretrain')   # (off by default)
while run.evaluate(step, evaluate, plots):   # every eval_interval steps: evaluate, plot, save; False at the end
    lr = run.set_lr(step)                     # warmup, then decay
    diagnostics.before(step)
    batches = [get_batch('train', step, micro) for micro in range(gradient_accumulation_steps)]
    out = train_step(batches)                 # (with cuda_graph_train: a replay of the graph)
    diagnostics.after(step)
    step += 1
    # log every log_interval steps; also a metric of your own: run.log(..., metrics={'name': a number or
    # 0-d tensor}) logs train/name (its value at the logged step), and the plots above may name it
    if not run.log(step, lr, out['loss'], tokens_per_step / rt.world_size, out):   # False: NaN/inf loss
        break
diagnostics.close()
run.finish(plots)
close_runtime(rt)
