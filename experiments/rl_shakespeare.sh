#!/usr/bin/env bash
# Evidence for PPO and GRPO (issue 7) on the tiny-shakespeare pipeline: after
# PHASE=a and PHASE=b of experiments/preferences_shakespeare.sh (base, SFT, pairs, reward model,
# DPO with two seeds), PPO and GRPO from the SFT model with the task rule as reward, two seeds
# each, then one table of SFT, DPO, PPO and GRPO on 256 held-out prompts.
# $ PHASE=ppo bash experiments/rl_shakespeare.sh; PHASE=grpo ...; PHASE=eval ...
set -euo pipefail
DATA=${DATA:-data/shakespeare_gpt2}
TASK=${TASK:-data/shakespeare_instruct}
OUT=${OUT:-out/prefs_shakespeare}
PHASE=${PHASE:-ppo}
run() { local name=$1; shift; "$@" > $OUT/$name.log 2>&1 || { tail -20 $OUT/$name.log; exit 1; }; }
COMMON="--init_from=$OUT/sft --task_dir=$TASK --reward=rule --max_new_tokens=150 --eval_prompts=64
  --learning_rate=2e-5 --min_lr=2e-6 --compile=False --log_interval=4"
if [ "$PHASE" = ppo ]; then
  for s in 1 2; do
    run ppo$s python ppo.py $COMMON --out_dir=$OUT/ppo$s --seed=$s --rollout_prompts=64 --minibatch_size=16 \
      --ppo_epochs=2 --max_iters=160 --eval_interval=40 --kl_beta=0.05
    grep -o "step [0-9]*: task.*" $OUT/ppo$s.log
  done
elif [ "$PHASE" = grpo ]; then
  for s in 1 2; do
    run grpo$s python grpo.py $COMMON --out_dir=$OUT/grpo$s --seed=$s --rollout_prompts=16 --group_size=4 \
      --minibatch_size=16 --max_iters=80 --eval_interval=20 --beta=0.04
    grep -o "step [0-9]*: task.*" $OUT/grpo$s.log
  done
else
  python eval.py --compare=$OUT/sft,$OUT/dpo1,$OUT/dpo2,$OUT/ppo1,$OUT/ppo2,$OUT/grpo1,$OUT/grpo2 --task_dir=$TASK \
    --n_prompts=256 --max_new_tokens=150 --data_dir=$DATA --eval_iters=20 --reference=$OUT/sft | tee $OUT/compare_all.md
fi
