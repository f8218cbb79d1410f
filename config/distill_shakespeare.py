# Distil the shakespeare_char model (config/shakespeare_char.py: 0.87M parameters) into a student
# with a fifth of its active parameters (0.17M: 3 layers of width 64), on a CPU in minutes.
# $ python prepare/shakespeare_char.py && python train.py config/shakespeare_char.py
# $ python distill.py config/distill_shakespeare.py                                  # logits
# $ python distill.py config/distill_shakespeare.py --mode=sequence --out_dir=out/distill_shakespeare_seq
# $ python distill.py config/distill_shakespeare.py --alpha=0 --out_dir=out/shakespeare_small   # no teacher
# experiments/distill_shakespeare.sh runs all three and compares them with eval.py.
teacher = 'out/shakespeare_char'
out_dir = 'out/distill_shakespeare'
data_dir = 'data/shakespeare_char'
seq_data_dir = 'data/distill_shakespeare_seq'
eval_interval = 250
eval_iters = 20
log_interval = 10
always_save_checkpoint = False   # keep the checkpoint with the best val loss

# the student: the teacher's recipe, smaller
batch_size = 12
block_size = 64
n_layer = 3
n_head = 4
n_embd = 64
dropout = 0.0
pos_emb = 'rope'
norm = 'rmsnorm'
mlp = 'swiglu'
bias = False

# the same schedule as the teacher's: 2,000 steps x 12 x 64 tokens
learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
compile = False

# mode='logits': distill.py's defaults
temperature = 2.0
alpha = 0.5
kl = 'forward'
# mode='sequence': about as many tokens as the real training split (1.0M)
num_samples = 1000
sample_length = 1024
sample_temperature = 1.0
gen_batch_size = 250
