# GRPO from the SFT model on the instruction task, rewarded by the task rule.
# $ python grpo.py config/grpo_tinystories.py
out_dir = 'out/grpo'
init_from = 'out/sft'
reward = 'rule'
rollout_prompts = 16
group_size = 4
minibatch_size = 16
max_new_tokens = 300
temperature = 0.7                 # rollouts (see config/ppo_tinystories.py)
beta = 0.04
learning_rate = 1e-5
max_iters = 100                   # rollouts of 4 minibatches
eval_interval = 10
eval_prompts = 128
