# Attention ablation: multi-head (MHA) vs grouped-query (GQA) vs multi-head latent (MLA) attention,
# at roughly equal parameter count, on the story corpus, in the default run's model
# (config/tinystories_moe.py: 8 layers, n_embd 512, the MoE of 64 experts, top-4 + 1 shared).
# $ python prepare/stories.py                                   (data/stories, GPT-2 tokenizer)
# $ python ablate.py config/ablations/attention.py              (9 runs of about 2.5 minutes on an H200)
# $ python ablate.py config/ablations/attention.py --seeds=[1337]     (one seed each: a first look)
#
# How the parameter counts were matched (model.count_params, vocabulary 50,304; the attention of one
# layer in parameters; engine.cache_numbers_per_token, the KV cache per token over the 8 layers):
#   variant  attention of one layer                                total       active   KV cache
#   mla      q 512x256 + 256x(8x96), kv 512x(128+32) + 128x(8x128),
#            out (8x64)x512, 2 norms:                   803,200    239.45M     48.54M   1,280 numbers
#   mha      8 heads of 48: q, k, v, out 512x384 each:  786,432    239.31M     48.41M   6,144 numbers
#   gqa      10 query heads of 64 sharing 2 key/value heads:
#            q 512x640, k and v 512x128, out 640x512:   786,432    239.31M     48.41M   2,048 numbers
# MHA at the default 8 heads of 64 would have 1,048,576 attention parameters a layer (+31% over MLA,
# +2.0M active in all), so its heads are 48 wide; GQA with 8 query heads of 64 and 2 KV heads would
# have 655,360 (-18%), so it spends the parameters its shared keys and values save on 2 more query
# heads (as GQA models do). All three are within 2.1% of MLA's attention parameters and 0.3% of
# its active parameters. FLOPs per token differ a little (MLA 322.6M, MHA 309.3M, GQA 321.8M at
# T=512); max_tokens gives every variant the same tokens, and results.md prints tokens/s and MFU.
# MuonClip (as the GPU speedrun trains) also logs the max attention logit of every run.

base = ['config/tinystories_moe.py', '--data_dir=data/stories', '--optimizer=muonclip',
        '--learning_rate=3e-3', '--min_lr=3e-4', '--warmup_iters=50',
        '--eval_interval=100', '--eval_iters=20', '--log_interval=10', '--cuda_graph_train=False']
variants = {
    'mla': {},                                                       # the base config's MLA
    'mha': {'attention': 'mha', 'head_dim': 48},
    'gqa': {'attention': 'mha', 'n_head': 10, 'head_dim': 64, 'n_kv_head': 2},
}
seeds = [1337, 1338, 1339]         # three: with one seed each the variants were 0.3% apart (docs/ablations.md)
max_tokens = 500 * 64 * 512        # 16.4M tokens: 500 steps of 64 sequences of 512 tokens
out_dir = 'out/ablations/attention'
parallel = 1                       # one run fills an H200 at this batch
