#!/usr/bin/env bash
# Evidence for SFT with the largest real text on these machines (tiny-shakespeare; the
# full TinyStories set is not available here): pretrain config/tinystories_moe.py on it, fine-tune
# on the instruction task built from its speeches, and compare base and SFT models on held-out
# prompts from the last 10% of the text, which the base model never trained on.
# $ python prepare/shakespeare_char.py --tokenizer=gpt2 --out_dir=data/shakespeare_gpt2 [--source=...]
# $ python prepare/tinystories_instruct.py --source=input.txt --paragraphs=True --n_prompts_train=500 \
#       --out_dir=data/shakespeare_instruct
# $ bash experiments/sft_shakespeare.sh
set -euo pipefail
DATA=${DATA:-data/shakespeare_gpt2}
TASK=${TASK:-data/shakespeare_instruct}
OUT=${OUT:-out/sft_shakespeare}
mkdir -p $OUT
python train.py config/tinystories_moe.py --data_dir=$DATA --out_dir=$OUT/base --batch_size=16 \
  --max_iters=300 --eval_interval=50 --eval_iters=10 --compile=False --always_save_checkpoint=False \
  > $OUT/base.log 2>&1 || { tail -20 $OUT/base.log; exit 1; }
grep -o "step [0-9]*: val/loss [0-9.]*" $OUT/base.log | tail -3
python sft.py --init_from=$OUT/base --out_dir=$OUT/sft --task_dir=$TASK --batch_size=16 --block_size=512 \
  --max_iters=150 --eval_interval=50 --eval_iters=10 --eval_prompts=64 --max_new_tokens=200 \
  --learning_rate=3e-4 --min_lr=3e-5 --warmup_iters=20 --compile=False \
  > $OUT/sft.log 2>&1 || { tail -20 $OUT/sft.log; exit 1; }
grep -o "step [0-9]*: val/loss.*" $OUT/sft.log
python eval.py --compare=$OUT/base,$OUT/sft --task_dir=$TASK --n_prompts=256 --max_new_tokens=200 \
  --data_dir=$DATA --eval_iters=20 | tee $OUT/compare.md
