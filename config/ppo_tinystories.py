# PPO from the SFT model on the instruction task, rewarded by the task rule.
# $ python ppo.py config/ppo_tinystories.py
# (reward='model' with reward_model='out/reward' and value_init='reward' for RLHF proper)
out_dir = 'out/ppo'
init_from = 'out/sft'
reward = 'rule'
rollout_prompts = 64
minibatch_size = 16
ppo_epochs = 2
max_new_tokens = 300
temperature = 0.7                 # rollouts: at 1 they almost never loop, so RL saw no signal against
                                  # the loops of greedy answers (notes/lifecycle.md)
lam = 1.0                         # GAE: with 0.95 and a young critic, early tokens got almost no credit
kl_beta = 0.05
kl_target = 6.0
learning_rate = 1e-5
max_iters = 50                    # rollouts of 2 epochs x 4 minibatches
eval_interval = 5
eval_prompts = 128
