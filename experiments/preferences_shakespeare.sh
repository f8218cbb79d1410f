#!/usr/bin/env bash
# Evidence for the reward model and DPO on the tiny-shakespeare pipeline of
# experiments/sft_shakespeare.sh (the full TinyStories set is not available on these machines).
# PHASE=a: pretrain + SFT + preference pairs (PHASE=a1: pretrain + SFT; PHASE=a2: the pairs);
# PHASE=b: reward model (SKIP_REWARD=1 skips it), DPO with two seeds, eval (SKIP_EVAL=1 skips it).
# $ PHASE=a bash experiments/preferences_shakespeare.sh && PHASE=b bash experiments/preferences_shakespeare.sh
set -euo pipefail
DATA=${DATA:-data/shakespeare_gpt2}
TASK=${TASK:-data/shakespeare_instruct}
OUT=${OUT:-out/prefs_shakespeare}
PHASE=${PHASE:-a}
mkdir -p $OUT
run() { local name=$1; shift; "$@" > $OUT/$name.log 2>&1 || { tail -20 $OUT/$name.log; exit 1; }; }
if [ "$PHASE" = a ] || [ "$PHASE" = a1 ]; then
  run base python train.py config/tinystories_moe.py --data_dir=$DATA --out_dir=$OUT/base --batch_size=16 \
    --max_iters=300 --eval_interval=50 --eval_iters=10 --compile=False --always_save_checkpoint=False
  run sft python sft.py --init_from=$OUT/base --out_dir=$OUT/sft --task_dir=$TASK --batch_size=16 \
    --block_size=512 --max_iters=100 --eval_interval=50 --eval_iters=10 --eval_prompts=64 --max_new_tokens=150 \
    --learning_rate=3e-4 --min_lr=3e-5 --warmup_iters=20 --compile=False --always_save_checkpoint=False
  grep -o "step [0-9]*: val/loss.*" $OUT/sft.log
fi
if [ "$PHASE" = a ] || [ "$PHASE" = a2 ]; then
  run prefs python prepare/preferences.py --init_from=$OUT/sft --task_dir=$TASK --out_dir=$OUT/prefs \
    --samples_per_prompt=4 --max_new_tokens=150 --margin=0.1 --batch_size=64
  tail -2 $OUT/prefs.log
fi
if [ "$PHASE" = b ]; then
  [ -n "${SKIP_REWARD:-}" ] || run reward python reward.py --init_from=$OUT/sft --out_dir=$OUT/reward --prefs_dir=$OUT/prefs --task_dir=$TASK \
    --batch_size=16 --max_iters=100 --eval_interval=25 --learning_rate=1e-4 --min_lr=1e-5 --n_fresh=128 \
    --max_new_tokens=150 --compile=False --save_checkpoints=False
  [ -n "${SKIP_REWARD:-}" ] || grep -o "step [0-9]*: val/loss.*" $OUT/reward.log
  for s in 1 2; do
    run dpo$s python dpo.py --init_from=$OUT/sft --out_dir=$OUT/dpo$s --prefs_dir=$OUT/prefs --task_dir=$TASK \
      --batch_size=8 --max_iters=100 --eval_interval=25 --learning_rate=1e-5 --min_lr=1e-6 --eval_prompts=64 \
      --max_new_tokens=150 --compile=False --seed=$s --always_save_checkpoint=False
    grep -o "step [0-9]*: val/loss.*" $OUT/dpo$s.log
  done
  [ -n "${SKIP_EVAL:-}" ] || python eval.py --compare=$OUT/sft,$OUT/dpo1,$OUT/dpo2 --task_dir=$TASK --n_prompts=256 --max_new_tokens=150 \
    --data_dir=$DATA --eval_iters=20 | tee $OUT/compare.md
fi
