"""
Curves of PPO and GRPO runs from their printed logs (the `step N: ...` evaluation lines that
experiments/rl_shakespeare.sh saves as OUT/ppo1.log etc.), when the run folders' log.jsonl are not
at hand (e.g. only the logs came back from a GPU machine): greedy task score and sampled rule score
on the held-out prompts, and KL(policy || SFT) of sampled answers, against rollouts.

$ python experiments/rl_curves.py --logs=out/prefs_shakespeare/ppo1.log,out/prefs_shakespeare/grpo1.log \
      --steps_per_rollout=8,4 --out=rl_curves.png
"""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import configure  # noqa: E402

logs = ''                # comma-separated log files
steps_per_rollout = ''   # comma-separated, one per log: optimizer steps per rollout (PPO: epochs x minibatches)
out = 'rl_curves.png'
title = ''
configure(globals(), verbose=False)
files = [f for f in logs.split(',') if f]
per = [int(x) for x in str(steps_per_rollout).split(',') if str(x).strip()]
if not files or len(per) != len(files):
    sys.exit('error: give --logs=a.log,b.log and one --steps_per_rollout per log')

runs = {}
for f, k in zip(files, per):
    text = open(f, encoding='utf-8', errors='replace').read().replace('\r', '\n')
    pts = []
    for m in re.finditer(r'^step (\d+): (.*)$', text, re.M):
        vals = dict((a, float(b)) for a, b in re.findall(r'([\w/]+) (-?[0-9.]+)', m.group(2)))
        if 'task/score_greedy' in vals and 'val/kl_ref' in vals:
            pts.append((int(m.group(1)) / k, vals))
    if not pts:
        sys.exit(f'error: no evaluation lines with task/score_greedy and val/kl_ref in {f}')
    runs[os.path.splitext(os.path.basename(f))[0]] = pts

print('| run | rollouts | greedy task score (start -> end) | sampled rule score | KL to SFT, nats/answer |')
print('| --- | --- | --- | --- | --- |')
for name, pts in runs.items():
    a, b = pts[0][1], pts[-1][1]
    print(f"| {name} | {pts[-1][0]:g} | {a['task/score_greedy']:.4f} -> {b['task/score_greedy']:.4f} | "
          f"{a['val/rule_score_sampled']:.4f} -> {b['val/rule_score_sampled']:.4f} | {b['val/kl_ref']:.2f} |")

try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
except ImportError:                 # an optional extra (requirements-dev.txt): the table alone
    sys.exit('matplotlib is not installed: no PNG (pip install matplotlib)')
fig, axes = plt.subplots(1, 3, figsize=(13, 4))
for name, pts in runs.items():
    xs = [x for x, _ in pts]
    for ax, key in zip(axes, ('task/score_greedy', 'val/rule_score_sampled', 'val/kl_ref')):
        ax.plot(xs, [v[key] for _, v in pts], marker='o', markersize=3, label=name)
for ax, lab in zip(axes, ('greedy task score, held-out prompts', 'rule score of sampled answers',
                          'KL(policy || SFT), nats per answer')):
    ax.set_xlabel('rollouts')
    ax.set_title(lab, fontsize=10)
    ax.grid(alpha=0.3)
axes[0].legend(fontsize=8)
if title:
    fig.suptitle(title, fontsize=10)
fig.tight_layout()
fig.savefig(out, dpi=110)
print(f'wrote {out}')
