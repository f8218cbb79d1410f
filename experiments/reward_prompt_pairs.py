"""
Preference pairs whose label only the prompt decides: can a reward model learn to compare the
answer with the prompt's required word, and at what learning rate?

Each draw takes two nouns x and z of twelve and two short random sentences, one using x and one
using z, and makes two pairs: under the prompt asking for x the x-sentence is chosen, under the
prompt asking for z the z-sentence is. Every answer is then once chosen and once rejected, so
nothing in the answer alone predicts the label (a preference visible in the answer, such as an
ending, is learned at rates where this one is not).

$ python experiments/reward_prompt_pairs.py --out_dir=out/prompt_pairs
$ for lr in 3e-5 1e-4 3e-4; do OMP_NUM_THREADS=1 python reward.py --init_from=out/speedrun_cpu/sft \
    --task_dir=out/speedrun_cpu/task --prefs_dir=out/prompt_pairs --out_dir=out/prompt_pairs_rm_$lr \
    --learning_rate=$lr --min_lr=$(python -c "print($lr / 10)") --batch_by=pair --batch_size=16 \
    --max_iters=300 --eval_interval=100 --warmup_iters=10 --n_fresh=0 --save_checkpoints=False \
    --device=cpu --compile=False; done
(each run's last `val/accuracy` line; 50% is chance. On the cpu speedrun's SFT model: 49.5% at
3e-5, 51.0% at 1e-4, 65.5% at 3e-4)

The score read at the last token alone against that plus the mean of the head over every token
(reward.py --score_pooling=last+mean), 1,500 steps at 3e-4, three seeds, two runs at once:
$ for seed in 1337 1338 1339; do for pool in last last+mean; do OMP_NUM_THREADS=1 python reward.py \
    --init_from=out/speedrun_cpu/sft --task_dir=out/speedrun_cpu/task --prefs_dir=out/prompt_pairs \
    --out_dir=out/prompt_pairs_rm_${pool}_$seed --learning_rate=3e-4 --min_lr=3e-5 --batch_by=pair \
    --batch_size=16 --max_iters=1500 --eval_interval=300 --warmup_iters=10 --n_fresh=0 \
    --save_checkpoints=False --device=cpu --compile=False --score_pooling=$pool --seed=$seed & done; wait; done
(held-out accuracy at steps 300 / 600 / 900 / 1,200 / 1,500, on another cpu speedrun's SFT model,
2026-12-05; seeds 1337 / 1338 / 1339:
  last       74.5 / 81.0 / 82.0 / 85.0 / 93.5%   50.0 / 65.0 / 65.0 / 65.0 / 64.0%   65.5 / 80.5 / 96.5 / 98.5 / 99.5%
  last+mean  88.5 / 95.5 / 100 / 100 / 100%      67.5 / 70.0 / 70.5 / 73.0 / 80.0%   64.5 / 69.0 / 71.0 / 84.5 / 85.0%
at step 1,500 a mean of 85.7% against 88.3%, inside the seeds' ranges (35 and 20 points): the seed decides
more than the pooling, and whether a run learns the comparison at all.)

Reading the prompt again after the answer (reward.py --score_reread=True, rl.reward_input), the
same three seeds and settings against the last token alone, on the SFT model of the cpu profile
(`speedrun.sh --profile=cpu`; its last-token runs repeat the numbers above exactly), 2026-12-06:
$ for seed in 1337 1338 1339; do for rr in False True; do OMP_NUM_THREADS=1 python reward.py \
    --init_from=out/speedrun_cpu/sft --task_dir=out/speedrun_cpu/task --prefs_dir=out/prompt_pairs \
    --out_dir=out/prompt_pairs_rm_reread${rr}_$seed --learning_rate=3e-4 --min_lr=3e-5 --batch_by=pair \
    --batch_size=16 --max_iters=1500 --eval_interval=300 --warmup_iters=10 --n_fresh=0 \
    --save_checkpoints=False --device=cpu --compile=False --score_reread=$rr --seed=$seed & done; wait; done
(held-out accuracy at steps 300 / 600 / 900 / 1,200 / 1,500; seeds 1337 / 1338 / 1339:
  last     74.5 / 81.0 / 82.0 / 85.0 / 93.5%   50.0 / 65.0 / 65.0 / 65.0 / 64.0%   65.5 / 80.5 / 96.5 / 98.5 / 99.5%
  reread   84.5 / 97.5 / 100 / 99.5 / 100%     51.0 / 71.5 / 75.5 / 78.5 / 77.5%   78.5 / 95.0 / 100 / 100 / 100%
the reread is ahead on every seed at every evaluation after the first: a mean of 88.0% against
75.5% at step 600 and 92.5% against 85.7% at 1,500. Seed 1338 stays the slow one in both.)
"""

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import configure  # noqa: E402
from data import start_prepared, write_json, write_jsonl  # noqa: E402
from task import make_prompt, score  # noqa: E402

# -----------------------------------------------------------------------------
out_dir = 'out/prompt_pairs'
train_draws = 1500             # draws of two nouns: two pairs each
val_draws = 100
seed = 0
# -----------------------------------------------------------------------------
configure(globals())
NOUNS = 'dog cat bird horse apple cake ball tree boat king moon star'.split()
FILL = 'the a big red little happy ran saw played near under over home park day with and then'.split()
rng = random.Random(seed)


def sentence(word):
    words = [rng.choice(FILL) for _ in range(rng.randint(6, 12))]
    words.insert(rng.randint(0, len(words)), word)
    return ' '.join(words).capitalize() + '.'


def pairs(draws):
    out = []
    for _ in range(draws):
        x, z = rng.sample(NOUNS, 2)
        with_x, with_z = sentence(x), sentence(z)
        for want, chosen, rejected in ((x, with_x, with_z), (z, with_z, with_x)):
            out.append({'prompt': make_prompt([want]), 'chosen': chosen, 'rejected': rejected,
                        'chosen_score': score(chosen, [want])['score'], 'rejected_score': score(rejected, [want])['score'],
                        'chosen_ended': True, 'rejected_ended': True, 'words': [want], 'features': {}})
    return out


meta = start_prepared(out_dir)
train, val = pairs(train_draws), pairs(val_draws)
write_jsonl(os.path.join(out_dir, 'prefs_train.jsonl'), train)
write_jsonl(os.path.join(out_dir, 'prefs_val.jsonl'), val)
write_json(meta, {'source': 'experiments/reward_prompt_pairs.py', 'train_pairs': len(train), 'val_pairs': len(val)})
print(f'wrote {out_dir}: {len(train)} train and {len(val)} val pairs; e.g. {train[0]}')
