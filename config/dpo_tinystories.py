# DPO from the SFT model on the same preference pairs as the reward model.
# $ python dpo.py config/dpo_tinystories.py
out_dir = 'out/dpo'
init_from = 'out/sft'
prefs_dir = 'data/prefs'
beta = 0.1
batch_size = 8
learning_rate = 5e-6
min_lr = 5e-7
warmup_iters = 20
max_iters = 500
eval_interval = 50
eval_prompts = 128
