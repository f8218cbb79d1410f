#!/usr/bin/env bash
# The quality run: config/tinystories_moe.py on TinyStories for at most MINUTES of one
# GPU (the optimizer that won the MuonClip comparison: AdamW at 1e-3), then val loss and bits per
# byte, loss-curve and expert-load PNGs, and five samples from "Once upon a time"; compare the bits
# per byte with llama2.c's (experiments/llama2c_bpb.py: 0.396 / 0.313 / 0.280 bits per byte for its
# 15M / 42M / 110M models, from their published val losses and the Llama 2 tokenizer's 3.910 bytes
# per token on the 24 shared stories).
# Data: prepare data/tinystories here (python prepare/tinystories.py [--source=TinyStories files]
# --tokenizer_file=gpt2.tiktoken) and carry it to the GPU machine (64 MiB: about 30M GPT-2 tokens).
# $ DATA=data/tinystories OUT=out/tinystories_quality MINUTES=9 bash experiments/tinystories_quality.sh
set -euo pipefail
DATA=${DATA:-data/tinystories}
OUT=${OUT:-out/tinystories_quality}
MINUTES=${MINUTES:-9}                    # one device call runs at most 10 minutes
# about 590k tokens/s at 64 x 512 on the H100 (notes/performance.md): 18 steps/s, minus evaluations
STEPS=${STEPS:-$(( MINUTES * 60 * 15 ))}
mkdir -p $OUT
python train.py config/tinystories_moe.py --data_dir=$DATA --out_dir=$OUT --max_iters=$STEPS \
  --lr_decay_iters=$STEPS --warmup_iters=$(( STEPS / 25 )) --eval_interval=$(( STEPS / 10 )) \
  --eval_iters=20 --always_save_checkpoint=False ${EXTRA:-} 2>&1 | tee $OUT/train.log | grep -E "^step|done|error"
python eval.py --out_dir=$OUT --n_prompts=0 --data_dir=$DATA --eval_iters=50
python sample.py --out_dir=$OUT --start="Once upon a time" --num_samples=5 --max_new_tokens=200 \
  --temperature=0.8 --top_k=200 | tee $OUT/samples.txt
