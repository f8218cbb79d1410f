# Multi-token prediction ablation: MTP depth 0 / 1 / 2 at equal training compute. The MTP modules
# cost FLOPs (a transformer block and a projection each), so the budget is in FLOPs (max_flops:
# model.flops_per_token counts them) and the deeper runs take fewer steps. The val loss is the main
# head's (the MTP losses are a training signal only).
# $ python ablate.py config/ablations/mtp.py                    (3 runs on an H200)
# $ python ablate.py config/ablations/mtp.py --seeds=[1,2,3]    (when the losses are within 2%)

base = ['config/tinystories_moe.py', '--data_dir=data/stories', '--optimizer=muonclip',
        '--learning_rate=3e-3', '--min_lr=3e-4', '--warmup_iters=50',
        '--eval_interval=100', '--eval_iters=20', '--log_interval=10', '--cuda_graph_train=False']
variants = {
    'mtp0': {'mtp_depth': 0},
    'mtp1': {'mtp_depth': 1},
    'mtp2': {'mtp_depth': 2},
}
seeds = [1337]
max_flops = 322.7e6 * 500 * 64 * 512     # MTP-free training on 500 steps (322.6M training FLOPs per token)
out_dir = 'out/ablations/mtp'
parallel = 1
