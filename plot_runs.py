"""
Compare runs: one metric from several runs' log.jsonl on one PNG, and a markdown table.

$ python plot_runs.py --runs=out/adamw,out/muon,out/muonclip --key=val/loss --out=val_loss.png
$ python plot_runs.py --runs=out/a,out/b --key=attn/max_logit_all --out=max_logit.png --hline=100
"""

import json
import math
import os
import sys

from config import configure

# -----------------------------------------------------------------------------
runs = ''            # comma-separated run folders (each holding log.jsonl)
labels = ''          # comma-separated labels (default: the folder names)
key = 'val/loss'     # the metric to plot
out = 'compare.png'
title = ''
ylabel = ''
xlabel = 'step'      # the x axis: log rows' step (PPO's and GRPO's count rollouts: --xlabel=rollout)
hline = 0.0          # draw a horizontal line here (e.g. the QK-Clip threshold); 0: none
logy = False
# -----------------------------------------------------------------------------
configure(globals(), verbose=False)
folders = [r for r in runs.split(',') if r]
if not folders:
    sys.exit('error: give --runs=out/a,out/b,...')
names = labels.split(',') if labels else [os.path.basename(os.path.normpath(f)) for f in folders]
if len(names) != len(folders):
    sys.exit(f'error: {len(names)} labels for {len(folders)} runs')

series, seen = {}, set()
for name, folder in zip(names, folders):
    path = os.path.join(folder, 'log.jsonl')
    if not os.path.isfile(path):
        sys.exit(f'error: {path} not found')
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    # numbers only (a bool is no value of a curve), and finite ones: a NaN or inf (a diverged step)
    # would hide every other value from the table's lowest and highest
    pts = [(r['step'], r[key]) for r in rows
           if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool) and math.isfinite(r[key])]
    seen.update(k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k not in ('step', 'time'))
    if not pts:
        print(f"warning: {path} has no '{key}'; left out", file=sys.stderr)
        continue
    series[name] = pts
if not series:             # (a stage logs its own scalars as train/<name>, its evaluations as val/...)
    near = sorted(k for k in seen if key.split('/')[-1] in k) or sorted(seen)
    sys.exit(f"error: no run has '{key}'; keys they have: {', '.join(near)}")

print(f'| run | {key} at the end | lowest | highest | step of lowest |')
print('| --- | --- | --- | --- | --- |')
for name, pts in series.items():
    vals = [v for _, v in pts]
    lo = min(range(len(vals)), key=vals.__getitem__)
    print(f'| {name} | {vals[-1]:.4f} | {vals[lo]:.4f} | {max(vals):.4f} | {pts[lo][0]} |')

try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit(0)
fig, ax = plt.subplots(figsize=(7.5, 4.5))
for name, pts in series.items():
    xs, ys = zip(*pts)
    ax.plot(xs, ys, label=name, marker='o' if len(pts) < 30 else None, markersize=3)
if hline:
    ax.axhline(hline, color='gray', linestyle='--', linewidth=1, label=f'{hline:g}')
if logy:
    ax.set_yscale('log')
ax.set_xlabel(xlabel)
ax.set_ylabel(ylabel or key)
ax.set_title(title or key)
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out, dpi=110)
print(f'wrote {out}')
