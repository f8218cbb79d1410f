# MoE ablation: dense vs MoE at equal active and at equal total parameters, fine-grained experts
# (16 / 32 / 64 / 256 routed experts at equal active and equal total routed parameters), and the
# shared expert on / off, in the default run's model (config/tinystories_moe.py: 8 layers, n_embd
# 512, 64 routed experts of 256 + 1 shared, top-4, the first layer dense) on the story corpus.
# $ python prepare/stories.py                                   (data/stories, GPT-2 tokenizer)
# $ python ablate.py config/ablations/moe.py                    (24 runs, two at a time, on an H200)
#
# Parameters (model.num_params / active_params, vocabulary 50,304; FLOPs per token at T=512):
#   variant                    routed experts x width, top-k, shared   total     active   MFLOPs/token
#   moe64_shared               64 x 256, top-4, 1 shared (the default)  239.45M   48.54M   322.6
#   moe64_top5_no_shared       64 x 256, top-5, none                    236.70M   48.54M   322.6
#   dense_equal_active         a SwiGLU of 1,280 in every layer          73.67M   47.92M   318.9
#   dense_equal_total          a SwiGLU of 14,784 in every layer        239.61M  213.86M  1314.5
#   granularity: no shared expert, k x width = 1,024 active and E x width = 16,384 routed per layer
#   experts16_top1             16 x 1,024, top-1 (weight = its score)   236.52M   45.62M   305.1
#   experts32_top2             32 x 512, top-2                          236.58M   45.67M   305.4
#   experts64_top4             64 x 256, top-4                          236.70M   45.79M   306.1
#   experts256_top16           256 x 64, top-16                         237.38M   46.48M   310.2
# Eight experts cannot keep both equal (top-k would be 1/2), so the granularity runs start at 16.
# Top-1 with norm_topk_prob (the default) gives the chosen expert the weight s / s = 1, so its
# router learns nothing from the loss (measured: 4.287 val loss, 0.19 above top-4; model.py now
# warns): experts16_top1 uses the score itself as the weight (norm_topk_prob=False).
# The same tokens for every run (max_tokens); dense_equal_total spends 4.1x the FLOPs per token.
# (14,784 = 231 x 64: the dense total within 0.07% of the default's; every layer is dense here,
# so 65 x 256, the first layer's width plus the experts', would be 9.6% larger.)

base = ['config/tinystories_moe.py', '--data_dir=data/stories', '--optimizer=muonclip',
        '--learning_rate=3e-3', '--min_lr=3e-4', '--warmup_iters=50',
        '--eval_interval=100', '--eval_iters=20', '--log_interval=10', '--cuda_graph_train=False']
_dense = {'n_routed_experts': 0, 'n_shared_experts': 0, 'first_k_dense_replace': 0}
variants = {
    'moe64_shared': {},
    'moe64_top5_no_shared': {'n_shared_experts': 0, 'num_experts_per_tok': 5},
    'dense_equal_active': {**_dense, 'intermediate_size': 1280},
    'dense_equal_total': {**_dense, 'intermediate_size': 14784},
    'experts16_top1': {'n_shared_experts': 0, 'n_routed_experts': 16, 'moe_intermediate_size': 1024,
                       'num_experts_per_tok': 1, 'norm_topk_prob': False},
    'experts32_top2': {'n_shared_experts': 0, 'n_routed_experts': 32, 'moe_intermediate_size': 512,
                       'num_experts_per_tok': 2},
    'experts64_top4': {'n_shared_experts': 0},
    'experts256_top16': {'n_shared_experts': 0, 'n_routed_experts': 256, 'moe_intermediate_size': 64,
                         'num_experts_per_tok': 16},
}
seeds = [1337, 1338, 1339]   # three: every difference here is under 2% of the loss
max_tokens = 500 * 64 * 512        # 16.4M tokens: 500 steps of 64 sequences of 512 tokens
out_dir = 'out/ablations/moe'
parallel = 2
