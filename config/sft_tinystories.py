# Supervised fine-tuning of the default pretrained model on the instruction task (task.py).
# $ python prepare/tinystories_instruct.py
# $ python train.py config/tinystories_moe.py
# $ python sft.py config/sft_tinystories.py
out_dir = 'out/sft'
init_from = 'out/tinystories_moe'
task_dir = 'data/tinystories_instruct'
batch_size = 32
block_size = 512
packing = True
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 50
max_iters = 1000
eval_interval = 100
eval_iters = 20
eval_prompts = 128
max_new_tokens = 300
