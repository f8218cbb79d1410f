# Load-balancing ablation: no balancing vs an auxiliary loss vs DeepSeek-V3's auxiliary-loss-free
# bias vs both (the default: the bias plus a tiny sequence-wise loss), in the default run's model
# on the story corpus. results.md reports the val loss and moe/load_cv, the coefficient of
# variation of tokens per expert (0 = even), and every run folder has its expert_load.png.
# $ python ablate.py config/ablations/balancing.py              (15 runs, four at a time, on an H200)
# The first run (one seed, docs/ablations.md): the four losses within 0.010, the seed noise of this
# model, so three seeds; and the bias at 0.001 a step took most of the 500 steps to balance, so a
# tenfold faster one (bias_fast) too.

base = ['config/tinystories_moe.py', '--data_dir=data/stories', '--optimizer=muonclip',
        '--learning_rate=3e-3', '--min_lr=3e-4', '--warmup_iters=50',
        '--eval_interval=100', '--eval_iters=20', '--log_interval=10', '--cuda_graph_train=False']
variants = {
    'none': {'bias_update_speed': 0.0, 'aux_loss_alpha': 0.0},
    'aux_loss': {'bias_update_speed': 0.0, 'aux_loss_alpha': 0.01},       # a DeepSeek-V2-size loss
    'bias': {'bias_update_speed': 0.001, 'aux_loss_alpha': 0.0},          # auxiliary-loss-free
    'bias_and_small_aux': {},                                             # the default (V3: 1e-4)
    'bias_fast': {'bias_update_speed': 0.01, 'aux_loss_alpha': 0.0},      # the bias, 10x faster
}
seeds = [1337, 1338, 1339]
max_tokens = 500 * 64 * 512
out_dir = 'out/ablations/balancing'
parallel = 4
