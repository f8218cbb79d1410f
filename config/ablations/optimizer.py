# Optimizer ablation: AdamW vs Muon vs MuonClip (Muon + QK-Clip), each over five to seven learning rates
# (min_lr = lr / 10), at equal tokens, in the default run's model on the story corpus. results.md
# ranks the 19 runs; the best rate of each optimizer is the comparison at equal tokens; every run
# logs the max attention logit (log_max_logit) for the logit plot.
# QK-Clip's threshold is 30 here, not Kimi-K2's 100: this model's largest logits stay far below 100
# (39-45 in the attention study's MuonClip runs at lr 3e-3, with no head ever clipped), so at 100
# the muonclip runs would repeat the muon ones.
# $ python ablate.py config/ablations/optimizer.py              (19 runs, three at a time, on an H200)

base = ['config/tinystories_moe.py', '--data_dir=data/stories', '--warmup_iters=50', '--log_max_logit=True',
        '--eval_interval=100', '--eval_iters=20', '--log_interval=10', '--cuda_graph_train=False']
# Muon's best rate sits higher than AdamW's (on the CPU preview its val loss still fell at 8e-3), and
# high rates are where QK-Clip has logits to clip: Muon and MuonClip sweep two rates further
_learning_rates = [5e-4, 1e-3, 2e-3, 4e-3, 8e-3]
_sweep = {'adamw': _learning_rates, 'muon': _learning_rates + [1.6e-2, 3.2e-2]}
_sweep['muonclip'] = _sweep['muon']
variants = {f'{opt}_lr{lr:g}': {'optimizer': opt, 'learning_rate': lr, 'min_lr': lr / 10,
                                **({'qk_clip_tau': 30.0} if opt == 'muonclip' else {})}
            for opt, rates in _sweep.items() for lr in rates}
seeds = [1337]
max_tokens = 300 * 64 * 512        # 9.8M tokens: 300 steps of 64 x 512
out_dir = 'out/ablations/optimizer'
parallel = 3
