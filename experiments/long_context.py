"""
Long context without training on it: a checkpoint trained on windows of L tokens, evaluated on
windows of f x L tokens with its RoPE as trained and with each long-context scaling of model.py
(linear position interpolation, dynamic NTK, YaRN), and the val loss by position: does a token at
position 3L get predicted as well as one at L/2?

$ python experiments/long_context.py --out_dir=out/ablations/long_context/train256_s1337
$ python experiments/long_context.py --out_dir=out/run --factors=2,4 --scalings=none,linear,dynamic,yarn

For each factor f and scaling s the model is rebuilt with block_size f L and rope_scaling
{type: s, factor: f, original_max_position_embeddings: L} ('none': RoPE as trained; the RoPE
frequencies are not part of the weights, so one checkpoint serves every scaling) and scores the
same `batches` x `batch_size` windows of f L tokens of the val split. The loss of each position is
averaged over the windows, then over buckets of L/2 positions. Dynamic NTK sets its RoPE base from
the sequence's length, so each of its buckets is scored by a forward over the window up to that
bucket's end (as when generating up to there), not over the whole window. Prints one table per factor and
writes long_context.json (and long_context.png, the loss by position bucket, one line per scaling
and factor) into out_dir. Only RoPE models extend: learned positions stop at L.
"""

import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import load_checkpoint, load_model  # noqa: E402
from config import configure  # noqa: E402
from data import TokenData  # noqa: E402
from runtime import init_runtime  # noqa: E402

out_dir = 'out/ablations/long_context/train256_s1337'    # the checkpoint; the results go here too
data_dir = ''                # '' = the checkpoint's data_dir
split = 'val'
factors = '2,4'              # evaluation lengths, in multiples of the training block_size
scalings = 'none,linear,dynamic,yarn'
batches = 10                 # windows scored: batches x batch_size, the same for every scaling
batch_size = 8
device = 'auto'
dtype = 'auto'
seed = 1337
configure(globals())

SCALINGS = ('none', 'linear', 'dynamic', 'yarn')
rt = init_runtime(device, dtype, seed)
ckpt = load_checkpoint(out_dir)
c = ckpt['model_config']
L = c['block_size']
fs = [int(f) for f in str(factors).split(',') if f.strip()]
ss = [s.strip() for s in scalings.split(',') if s.strip()]
problems = [msg for bad, msg in [
    (c.get('pos_emb') != 'rope', f"the model's pos_emb is '{c.get('pos_emb')}': only RoPE positions extend "
                                 f"past the training length"),
    (c.get('sliding_window') is not None, 'the model attends through a sliding window: its context does not grow'),
    (not fs or min(fs) < 1, f'factors={factors!r} must be positive integers'),
    (bool(set(ss) - set(SCALINGS)) or not ss, f"scalings={scalings!r}; valid: {', '.join(SCALINGS)}"),
    (L % 2 != 0, f'block_size {L} must be even (buckets of L/2 positions)'),
] if bad]
if problems:
    sys.exit('error: ' + '; '.join(problems))
data = TokenData(data_dir or ckpt.get('data_dir', ''))
bucket = L // 2
print(f'{out_dir}: trained on windows of {L} tokens (step {ckpt.get("step")}); {batches} x {batch_size} '
      f'{split} windows of {", ".join(str(f * L) for f in fs)} tokens; loss by buckets of {bucket} positions')


@torch.no_grad()
def position_losses(model, windows, T, prefixes=False):
    """Mean next-token loss at each of the T positions over the windows. prefixes=True (dynamic
    NTK, whose RoPE base grows with the sequence's length): bucket k's positions are scored by a
    forward over the first (k + 1) x bucket tokens only, so each position sees the scaling a model
    generating up to there would use (none inside the trained length), not the whole window's."""
    total = torch.zeros(T, dtype=torch.float64)
    for x, y in windows:
        x, y = x.to(rt.device), y.to(rt.device)
        for end in range(bucket, T + 1, bucket) if prefixes else (T,):
            start = end - bucket if prefixes else 0
            with rt.autocast():
                logits = model(x[:, :end])[0][:, start:]
            ce = F.cross_entropy(logits.float().transpose(1, 2), y[:, start:end], reduction='none')   # (B, end - start)
            total[start:end] += ce.sum(0).double().cpu()
    return total / (len(windows) * windows[0][0].size(0))


results = {'block_size': L, 'bucket': bucket, 'split': split, 'windows': batches * batch_size, 'losses': {}}
for f in fs:
    T = f * L
    g = torch.Generator().manual_seed(seed + f)
    windows = [data.batch(split, batch_size, T, g) for _ in range(batches)]
    rows = {}
    for s in ss:
        scaling = None if s == 'none' else {'type': s, 'factor': float(f), 'original_max_position_embeddings': L}
        model, _, _ = load_model(out_dir, rt.device, ckpt, overrides={'block_size': T, 'rope_scaling': scaling})
        model.eval()
        per_position = position_losses(model, windows, T, prefixes=s == 'dynamic')
        rows[s] = per_position.view(-1, bucket).mean(1).tolist()
        results['losses'][f'{f}x_{s}'] = rows[s]
        del model
    print(f'\n| {f}x ({T} tokens) | ' + ' | '.join(ss) + ' |\n' + '| --- ' * (len(ss) + 1) + '|')
    for k in range(T // bucket):
        mark = ' (trained)' if (k + 1) * bucket <= L else ''
        print(f'| {k * bucket}-{(k + 1) * bucket - 1}{mark} | ' + ' | '.join(f'{rows[s][k]:.4f}' for s in ss) + ' |')

with open(os.path.join(out_dir, 'long_context.json'), 'w') as fh:
    json.dump(results, fh, indent=1)
try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in results['losses'].items():
        ax.plot([(k + 0.5) * bucket for k in range(len(values))], values, marker='o', label=name)
    ax.axvline(L, color='grey', linestyle=':', label=f'trained length {L}')
    ax.set_xlabel('position')
    ax.set_ylabel(f'{split} loss (nats/token)')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, 'long_context.png'), dpi=120)
    print(f"\nwrote {os.path.join(out_dir, 'long_context.json')} and long_context.png")
except ImportError:
    print(f"\nwrote {os.path.join(out_dir, 'long_context.json')} (no matplotlib: no plot)")
