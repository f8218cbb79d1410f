# The default run: Kimi-K2 in miniature on TinyStories (GPT-2 tokenizer).
# Multi-head Latent Attention; one dense SwiGLU layer, then MoE layers of 64 fine-grained routed
# experts (top-4) plus 1 shared expert; sigmoid routing with one group like Kimi-K2, weights
# scaled by 2.5, auxiliary-loss-free balancing. 239M parameters in total, 48M active per token.
# $ python train.py config/tinystories_moe.py        (prepares data/tinystories/ first if missing)
# On one CUDA GPU add --cuda_graph_train=True: the whole step replayed as one CUDA graph
# (docs/performance.md has the measured tokens/s with and without it).
out_dir = 'out/tinystories_moe'
dataset = 'tinystories'
eval_interval = 500
eval_iters = 50
log_interval = 10

batch_size = 64
block_size = 512
gradient_accumulation_steps = 1

n_layer = 8
n_head = 8
n_embd = 512
attention = 'mla'
q_lora_rank = 256
kv_lora_rank = 128
qk_nope_head_dim = 64
qk_rope_head_dim = 32
v_head_dim = 64
pos_emb = 'rope'
norm = 'rmsnorm'
norm_eps = 1e-6
mlp = 'swiglu'
bias = False
tie_word_embeddings = False
dropout = 0.0

first_k_dense_replace = 1
intermediate_size = 1536          # the dense layer
n_routed_experts = 64
moe_intermediate_size = 256
num_experts_per_tok = 4
n_shared_experts = 1
scoring_func = 'sigmoid'
n_group = 1
topk_group = 1
norm_topk_prob = True
routed_scaling_factor = 2.5
bias_update_speed = 0.001         # auxiliary-loss-free balancing
aux_loss_alpha = 0.0001           # the small sequence-wise balance loss of DeepSeek-V3

learning_rate = 1e-3
min_lr = 1e-4
weight_decay = 0.1
warmup_iters = 200
max_iters = 5000
lr_schedule = 'cosine'
