# The reward model on preference pairs sampled from the SFT model and scored by the task rule.
# $ python prepare/preferences.py --init_from=out/sft
# $ python reward.py config/reward_tinystories.py
out_dir = 'out/reward'
init_from = 'out/sft'
prefs_dir = 'data/prefs'
batch_size = 16
learning_rate = 3e-4           # at 3e-5 a preference only the prompt decides (a required word used or
min_lr = 3e-5                  # not) was not learned at all on the CPU (experiments/reward_prompt_pairs.py)
warmup_iters = 20
max_iters = 500
eval_interval = 50
n_fresh = 128
