# Distil the default run (config/tinystories_moe.py: 239M parameters, 48.5M active, MLA + MoE) into
# a dense Llama-style student with a quarter of its active parameters: 6 layers of width 192,
# GQA (6 query heads, 2 key/value heads), SwiGLU; 21.7M parameters, 12.0M active (24.8%), most
# of it the untied output head (192 x 50,304 = 9.7M).
# $ python train.py config/tinystories_moe.py                          # the teacher
# $ python distill.py config/distill_tinystories.py                    # logits
# $ python distill.py config/distill_tinystories.py --mode=sequence --out_dir=out/distill_tinystories_seq
# $ python distill.py config/distill_tinystories.py --alpha=0 --out_dir=out/tinystories_small   # no teacher
# $ python eval.py --compare=out/tinystories_moe,out/tinystories_small,out/distill_tinystories,out/distill_tinystories_seq --n_prompts=0
teacher = 'out/tinystories_moe'
out_dir = 'out/distill_tinystories'
data_dir = 'data/tinystories'
seq_data_dir = 'data/distill_tinystories_seq'
eval_interval = 500
eval_iters = 50
log_interval = 10

# the student
batch_size = 64
block_size = 512
n_layer = 6
n_head = 6
n_kv_head = 2
n_embd = 192
attention = 'mha'
pos_emb = 'rope'
norm = 'rmsnorm'
norm_eps = 1e-6
mlp = 'swiglu'
bias = False
tie_word_embeddings = False
dropout = 0.0

# the teacher's schedule: 5,000 steps x 64 x 512 tokens
learning_rate = 1e-3
min_lr = 1e-4
weight_decay = 0.1
warmup_iters = 200
max_iters = 5000
lr_schedule = 'cosine'

# mode='logits': the best of the CPU sweep on tiny-shakespeare (docs/results.md, Distillation results), where
# alpha = 0.5 beat 1.0 and 0.25 (at T = 1 and 2) and T = 1 beat 2 and 4 (at alpha = 0.5)
temperature = 1.0
alpha = 0.5
kl = 'forward'
top_k_logits = 0             # e.g. 64 to keep the teacher's targets O(k) per position
# mode='sequence': stories sampled from the teacher (most end at EOT well before sample_length)
num_samples = 100_000
sample_length = 512
sample_temperature = 1.0
gen_batch_size = 512
