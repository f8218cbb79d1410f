# The default run's architecture in a size a laptop CPU trains in a few minutes: Multi-head Latent
# Attention, one dense SwiGLU layer then MoE layers of 8 routed experts (top-2) plus a shared one,
# sigmoid routing, auxiliary-loss-free balancing. TinyStories with a 4,096-token BPE learned from
# it (data/tinystories_bpe4k, prepared on first use): with GPT-2's 50,257 tokens the output layer
# alone would cost 10 times the rest of this model. In a few minutes it writes English-looking
# phrases (about 3 minutes on 2 cores, data preparation included); the GPU config writes stories.
# $ python train.py config/tinystories_cpu.py
# $ python sample.py --out_dir=out/tinystories_cpu --start="Once upon a time"
out_dir = 'out/tinystories_cpu'
dataset = 'tinystories_bpe4k'
prepare = 'tinystories.py --tokenizer=bpe --vocab_size=4096'
device = 'cpu'
compile = False
eval_interval = 200
eval_iters = 5
log_interval = 10

batch_size = 8
block_size = 128

n_layer = 4
n_head = 4
n_embd = 128
attention = 'mla'
q_lora_rank = 64
kv_lora_rank = 32
qk_nope_head_dim = 32
qk_rope_head_dim = 16
v_head_dim = 32
pos_emb = 'rope'
norm = 'rmsnorm'
norm_eps = 1e-6
mlp = 'swiglu'
bias = False
tie_word_embeddings = False
dropout = 0.0

first_k_dense_replace = 1
intermediate_size = 384
n_routed_experts = 8
moe_intermediate_size = 64
num_experts_per_tok = 2
n_shared_experts = 1
scoring_func = 'sigmoid'
routed_scaling_factor = 2.5
bias_update_speed = 0.001
aux_loss_alpha = 0.0001

learning_rate = 3e-3
min_lr = 3e-4
weight_decay = 0.1
warmup_iters = 30
max_iters = 600
lr_schedule = 'cosine'
