# A small Llama-style dense model on TinyStories (GPT-2 tokenizer): RoPE, RMSNorm, SwiGLU,
# grouped-query attention, untied head. Same width and depth as the default MoE run, so the two
# compare directly. 76.7M parameters, 51.5M of them the two embedding matrices.
# $ python prepare/tinystories.py && python train.py config/tinystories_dense.py
out_dir = 'out/tinystories_dense'
dataset = 'tinystories'
eval_interval = 500
eval_iters = 50
log_interval = 10

batch_size = 64
block_size = 512
gradient_accumulation_steps = 1

n_layer = 8
n_head = 8
n_kv_head = 4
n_embd = 512
intermediate_size = 1536
pos_emb = 'rope'
norm = 'rmsnorm'
norm_eps = 1e-6
mlp = 'swiglu'
bias = False
tie_word_embeddings = False
dropout = 0.0

learning_rate = 1e-3
min_lr = 1e-4
weight_decay = 0.1
warmup_iters = 200
max_iters = 5000
lr_schedule = 'cosine'
