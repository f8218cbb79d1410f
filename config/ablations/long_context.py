# Long-context ablation: train the default run's model on windows of 256 tokens, then evaluate it on
# windows of 512 and 1,024 (2x and 4x) with RoPE as trained, linear position interpolation, dynamic
# NTK and YaRN: the val loss by position bucket (experiments/long_context.py, which rebuilds the
# model with each rope_scaling; the RoPE frequencies are not weights).
# $ python ablate.py config/ablations/long_context.py           (1 run of 500 steps on an H200)
# $ python experiments/long_context.py --out_dir=out/ablations/long_context/train256_s1337 --factors=2,4

base = ['config/tinystories_moe.py', '--data_dir=data/stories', '--optimizer=muonclip',
        '--learning_rate=3e-3', '--min_lr=3e-4', '--warmup_iters=50',
        '--eval_interval=100', '--eval_iters=20', '--log_interval=10', '--cuda_graph_train=False']
variants = {'train256': {'block_size': 256, 'batch_size': 128}}    # the same 32,768 tokens a step
seeds = [1337]
max_tokens = 500 * 64 * 512
out_dir = 'out/ablations/long_context'
parallel = 1
