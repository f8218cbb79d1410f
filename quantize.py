"""
Quantize a checkpoint's weights (quant.py: int8 per output channel, int4 per group of group_size
inputs), measure what it costs, and save it; sample.py, eval.py and serve.py load it (or quantize
any checkpoint at load time with --quantize=int8|int4).

$ python quantize.py --out_dir=out/sft --quantize=int8 --save_dir=out/sft_int8
$ python quantize.py --out_dir=out/tinystories_moe --quantize=int4 --save_dir=''     # measure only

Prints, beside the original: the weights' bytes; the validation loss on the checkpoint's own
pretraining data (eval_iters fixed batches of its val split); greedy agreement, the share of
positions where the quantized model's greedy next token equals the original's, over the same
batches (teacher-forced, so one disagreement does not spoil the rest).
"""

import os
import sys

import torch

from checkpoint import context_length, load_model, save_checkpoint
from config import configure
from data import TokenData, eval_generator
from quant import BITS, QuantExperts, QuantLinear, quantize_model, weight_bytes
from runtime import init_runtime

# -----------------------------------------------------------------------------
out_dir = 'out/run'          # the checkpoint to quantize
quantize = 'int8'            # 'int8' | 'int4'
group_size = 128             # int4: inputs per scale
save_dir = ''                # where to save the quantized checkpoint ('': measure only)
data_dir = ''                # val data for the measurement; '': the checkpoint's own ('none': skip)
eval_iters = 20
batch_size = 8
block_size = 0               # 0: the model's
device = 'auto'
dtype = 'auto'
seed = 1337
# -----------------------------------------------------------------------------
configure(globals(), verbose=False)
if quantize not in BITS:
    sys.exit(f"error: quantize='{quantize}'; valid: {', '.join(BITS)}")
if group_size < 1:
    sys.exit(f'error: group_size={group_size} must be positive')
if eval_iters < 0 or batch_size < 1 or block_size < 0:
    sys.exit(f'error: eval_iters={eval_iters} (0: weights only), batch_size={batch_size} and block_size={block_size} '
             f'(0: the model\'s) must be at least 0, 1 and 0')
if save_dir and os.path.exists(save_dir) and os.path.realpath(save_dir) == os.path.realpath(out_dir):
    sys.exit(f"error: save_dir='{save_dir}' is the checkpoint's own folder: the quantized checkpoint would "
             f"replace the full-precision one (which training and a later quantization need); pick another")
rt = init_runtime(device, dtype, seed)
original, tok, ckpt = load_model(out_dir, rt.device)
if ckpt.get('quantized'):
    sys.exit(f"error: {out_dir} is quantized already ({ckpt['quantized']['kind']})")
block_size = context_length(block_size, original, out_dir)
quantized = quantize_model(load_model(out_dir, rt.device, ckpt=ckpt)[0], quantize, group_size)
if quantize == 'int4':   # rows group_size does not divide are one group each (quant.group_of): say so
    widths = set()
    for m in quantized.modules():
        if isinstance(m, QuantLinear):
            widths.add(m.in_features)
        elif isinstance(m, QuantExperts):
            widths |= {2 * m.gate_proj_q.size(-1), 2 * m.down_proj_q.size(-1)}   # (two inputs a byte)
    whole = sorted(w for w in widths if w % group_size)
    if whole:
        print(f"note: group_size={group_size} does not divide rows of {', '.join(map(str, whole))} inputs: "
              f"each such row has one scale", file=sys.stderr)
original.eval()
quantized.eval()
rows = [('weights', f'{weight_bytes(original) / 2**20:,.1f} MiB', f'{weight_bytes(quantized) / 2**20:,.1f} MiB')]

d = '' if data_dir == 'none' else data_dir or ckpt.get('data_dir') or ckpt.get('config', {}).get('data_dir', '')
if eval_iters and d and os.path.exists(os.path.join(d, 'meta.json')):
    data = TokenData(d)
    T = block_size or original.config.block_size
    losses, agree, total = {'original': 0.0, 'quantized': 0.0}, 0, 0
    with torch.no_grad():
        for k in range(eval_iters):
            x, y = data.batch('val', batch_size, T, eval_generator(k, 'val'), rt.device)
            with rt.autocast():
                (lo, l1), (lq, l2) = original(x, y), quantized(x, y)
            losses['original'] += l1.item() / eval_iters
            losses['quantized'] += l2.item() / eval_iters
            agree += (lo.argmax(-1) == lq.argmax(-1)).sum().item()
            total += y.numel()
    change = losses['quantized'] / losses['original'] - 1
    rows += [('val loss', f"{losses['original']:.4f}", f"{losses['quantized']:.4f} ({100 * change:+.2f}%)"),
             ('greedy agreement', '100%', f'{100 * agree / total:.2f}% of {total:,} positions')]
elif eval_iters:
    print(f'no pretraining data found (data_dir={d!r}); weights only', file=sys.stderr)
print(f'| {out_dir} | original | {quantize} |\n| --- | --- | --- |')
for name, a, b in rows:
    print(f'| {name} | {a} | {b} |')
if save_dir:
    saved = {k: v for k, v in ckpt.items() if k not in ('model', 'optimizer')}
    saved.update(model=quantized.state_dict(), quantized=quantized.quantized, parent=out_dir)
    save_checkpoint(save_dir, saved)
    print(f'wrote {save_dir}/ckpt.pt ({os.path.getsize(os.path.join(save_dir, "ckpt.pt")) / 2**20:,.1f} MiB)')
