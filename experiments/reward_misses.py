"""
What a reward model gets wrong: reads the held-out pairs reward.py scored at its latest evaluation
(out_dir/val_scored.jsonl: each pair with its two rewards and the rule's scores) and prints its
pair accuracy split every way the task rule can tell the answers apart: by the part of the rule
that separates them most, by the rule's gap between them, by how many of the prompt's words each
uses, by which of them is longer; then the misses the model was surest of.

$ python experiments/reward_misses.py --out_dir=out/speedrun_gpu/reward
$ python experiments/reward_misses.py --out_dir=out/speedrun_gpu/reward --examples=10
"""

import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import configure  # noqa: E402
from task import GAP_BUCKETS, gap_bucket, score  # noqa: E402

# -----------------------------------------------------------------------------
out_dir = 'out/speedrun_gpu/reward'   # a reward.py run (its val_scored.jsonl)
examples = 5                 # the misses with the largest wrong reward margin, printed in full
# -----------------------------------------------------------------------------
configure(globals(), verbose=False)
path = os.path.join(out_dir, 'val_scored.jsonl')
if not os.path.isfile(path):
    sys.exit(f'error: no {path} (reward.py writes it at each evaluation)')
pairs = [json.loads(line) for line in open(path)]


def table(title, key, order=()):
    """Accuracy and count of the pairs grouped by key(pair), the groups named in order first."""
    groups = collections.defaultdict(list)
    for p in pairs:
        groups[key(p)].append(p['correct'])
    print(f'\n| {title} | pairs | accuracy |\n| --- | --- | --- |')
    for k in sorted(groups, key=lambda k: (order.index(k) if k in order else len(order), str(k))):
        print(f'| {k} | {len(groups[k])} | {100 * sum(groups[k]) / len(groups[k]):.1f}% |')


def words_used(p, side):
    """How many of the prompt's words the answer uses (task.score, as the rule counts them)."""
    return round(score(p[side], p['words'], p.get('features'), p.get(f'{side}_ended', True))['words']
                 * len(p['words'])) if p.get('words') else None


for p in pairs:
    p['used'] = (words_used(p, 'chosen'), words_used(p, 'rejected'))
print(f'{path}: {len(pairs)} held-out pairs, accuracy {100 * sum(p["correct"] for p in pairs) / len(pairs):.1f}%')
table('what separates them most', lambda p: p['kind'])
table("the rule's gap (chosen - rejected)",
      lambda p: GAP_BUCKETS[b][0] if (b := gap_bucket(p['rule_gap'])) else 'unknown',
      order=[span for span, _, _ in GAP_BUCKETS.values()])
table('words used: chosen / rejected', lambda p: '%s / %s' % p['used'])
table('the longer answer', lambda p: 'chosen' if len(p['chosen']) > len(p['rejected']) else
      'rejected' if len(p['rejected']) > len(p['chosen']) else 'equal')


def fmt(x):
    return '-' if x is None else f'{x:.2f}'


misses = sorted((p for p in pairs if not p['correct']), key=lambda p: p['reward_chosen'] - p['reward_rejected'])
for p in misses[:examples]:
    print(f"\nmissed by {p['reward_rejected'] - p['reward_chosen']:.2f}: {p['prompt']}\n"
          f"  chosen (rule {fmt(p['chosen_score'])}, words {p['used'][0]}): {p['chosen'][:300]!r}\n"
          f"  rejected (rule {fmt(p['rejected_score'])}, words {p['used'][1]}): {p['rejected'][:300]!r}")
