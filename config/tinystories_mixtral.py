# For comparison with config/tinystories_moe.py: a Mixtral-style MoE of the same width and depth.
# Grouped-query attention (8 query heads, 2 key/value heads), every layer MoE with 8 experts of
# 768, top-2 by softmax, no shared expert, Switch-style batch balance loss.
# $ python train.py config/tinystories_mixtral.py
out_dir = 'out/tinystories_mixtral'
dataset = 'tinystories'
eval_interval = 500
eval_iters = 50
log_interval = 10

batch_size = 64
block_size = 512

n_layer = 8
n_head = 8
n_kv_head = 2
n_embd = 512
pos_emb = 'rope'
norm = 'rmsnorm'
norm_eps = 1e-6
mlp = 'swiglu'
bias = False
tie_word_embeddings = False

n_routed_experts = 8
moe_intermediate_size = 768
num_experts_per_tok = 2
scoring_func = 'softmax'
aux_loss_alpha = 0.01
seq_aux = False

learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 200
max_iters = 5000
