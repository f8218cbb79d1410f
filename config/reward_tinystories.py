# The reward model on preference pairs sampled from the SFT model and scored by the task rule.
# $ python prepare/preferences.py --init_from=out/sft
# $ python reward.py config/reward_tinystories.py
out_dir = 'out/reward'
init_from = 'out/sft'
prefs_dir = 'data/prefs'
batch_size = 16
learning_rate = 3e-5
min_lr = 3e-6
warmup_iters = 20
max_iters = 500
eval_interval = 50
n_fresh = 128
