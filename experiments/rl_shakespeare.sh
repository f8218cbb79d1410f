#!/usr/bin/env bash
# Evidence for PPO and GRPO on the tiny-shakespeare pipeline: after
# PHASE=a and PHASE=b of experiments/preferences_shakespeare.sh (base, SFT, pairs, reward model,
# DPO with two seeds), PPO and GRPO from the SFT model with the task rule as reward, two seeds
# each, then one table of SFT, DPO, PPO and GRPO on 256 held-out prompts.
# $ PHASE=ppo bash experiments/rl_shakespeare.sh; PHASE=grpo ...; PHASE=eval ...
# PHASE=all runs the whole chain on one GPU in one go: base + SFT, then side by side (one process
# each: small-batch decoding leaves most of the GPU idle) the pairs + DPO x 2, PPO x 2 and GRPO x 2,
# then the table. Wall time per stage goes to $OUT/times.txt (docs/results.md has the times of the
# runs behind its PPO and GRPO table, made when max_iters counted optimizer steps: 480 steps were
# 60 rollouts of PPO with rollout_prompts=128 and ppo_epochs=1, and 60 of GRPO with GROUP_SIZE=8):
# $ OUT=out/prefs_shakespeare PHASE=all SKIP_DPO=1 RUN_TIMEOUT=270 EVAL_TIMEOUT=110 PPO_ROLLOUTS=60 GRPO_ROLLOUTS=60 \
#     GROUP_SIZE=8 RL_ARGS="--cuda_graph=True" PPO_ARGS="--rollout_prompts=128 --ppo_epochs=1 --kl_beta=0.02" \
#     EVAL_ARGS="--cuda_graph=True" bash experiments/rl_shakespeare.sh
# To bring the logs back, leave out checkpoints and the .tmp of one stopped mid-save: tar --exclude='*.pt*'.
# On a machine that sets OUT itself (the device tool does), pass OUT=out/prefs_shakespeare.
# $ PHASE=all bash experiments/rl_shakespeare.sh          (prepare the data as sft_shakespeare.sh says)
# RL_ARGS adds arguments to every PPO and GRPO run (e.g. "--cuda_graph=True --learning_rate=5e-5");
# PPO_ROLLOUTS / GRPO_ROLLOUTS set their lengths in rollouts (20 each); SKIP_DPO=1 leaves
# out the pairs and DPO in PHASE=all, SKIP_EVAL=1 the final table; GROUP_SIZE sets GRPO's k (4);
# PPO_ARGS / GRPO_ARGS add arguments to one kind of run only (after the defaults, so they win);
# EVAL_ARGS to the final eval.py (e.g. "--cuda_graph=True"); EVAL_TIMEOUT=N stops it after N seconds.
# RUN_TIMEOUT=N stops each PPO / GRPO run after N seconds (its printed evaluations and log.jsonl
# stay), so that a run sized by guess still ends inside a device call.
set -euo pipefail
DATA=${DATA:-data/shakespeare_gpt2}
TASK=${TASK:-data/shakespeare_instruct}
OUT=${OUT:-out/prefs_shakespeare}
PHASE=${PHASE:-ppo}
SEEDS=${SEEDS:-1 2}
export DATA TASK OUT
mkdir -p $OUT
run() { local name=$1; shift; "$@" > $OUT/$name.log 2>&1 || { tail -20 $OUT/$name.log; exit 1; }; }
# like run, but a stop at RUN_TIMEOUT (exit 124) is not a failure
timed() { local name=$1; shift; local rc=0; timeout ${RUN_TIMEOUT:-0} "$@" > $OUT/$name.log 2>&1 || rc=$?
  if [ $rc = 124 ]; then echo "$name: stopped at RUN_TIMEOUT=${RUN_TIMEOUT}s"; elif [ $rc != 0 ]; then tail -20 $OUT/$name.log; exit 1; fi; }
COMMON="--init_from=$OUT/sft --task_dir=$TASK --reward=rule --max_new_tokens=150 --eval_prompts=64
  --learning_rate=2e-5 --min_lr=2e-6 --compile=False --log_interval=1"
if [ "$PHASE" = ppo ]; then
  for s in $SEEDS; do
    timed ppo$s python ppo.py $COMMON --out_dir=$OUT/ppo$s --seed=$s --rollout_prompts=64 --minibatch_size=16 \
      --ppo_epochs=2 --max_iters=${PPO_ROLLOUTS:-20} --eval_interval=5 --kl_beta=0.05 ${RL_ARGS:-} ${PPO_ARGS:-}
    grep -o "step [0-9]*: task.*" $OUT/ppo$s.log
  done
elif [ "$PHASE" = grpo ]; then
  for s in $SEEDS; do
    timed grpo$s python grpo.py $COMMON --out_dir=$OUT/grpo$s --seed=$s --rollout_prompts=16 --group_size=${GROUP_SIZE:-4} \
      --minibatch_size=16 --max_iters=${GRPO_ROLLOUTS:-20} --eval_interval=5 --beta=0.04 ${RL_ARGS:-} ${GRPO_ARGS:-}
    grep -o "step [0-9]*: task.*" $OUT/grpo$s.log
  done
elif [ "$PHASE" = all ]; then
  t0=$SECONDS
  stamp() { echo "$1: $((SECONDS - t0)) s after the start" | tee -a $OUT/times.txt; }
  PHASE=a1 bash experiments/preferences_shakespeare.sh
  stamp "base + SFT"
  pids=() names=()
  start() { local name=$1; shift; ( "$@" > $OUT/stage_$name.log 2>&1; stamp "$name" ) & pids+=($!); names+=($name); }
  [ -n "${SKIP_DPO:-}" ] || start dpo bash -c "PHASE=a2 bash experiments/preferences_shakespeare.sh && SKIP_REWARD=1 SKIP_EVAL=1 PHASE=b bash experiments/preferences_shakespeare.sh"
  for s in $SEEDS; do
    start ppo$s env PHASE=ppo SEEDS=$s bash $0
    start grpo$s env PHASE=grpo SEEDS=$s bash $0
  done
  failed=0
  for i in "${!pids[@]}"; do wait ${pids[$i]} || { echo "${names[$i]} failed:"; tail -20 $OUT/stage_${names[$i]}.log; failed=1; }; done
  cat $OUT/stage_*.log
  [ -n "${SKIP_EVAL:-}" ] || { PHASE=eval bash $0; stamp "eval"; }
  exit $failed
else
  models=$OUT/sft
  for m in dpo1 dpo2 ppo1 ppo2 grpo1 grpo2; do if [ -f $OUT/$m/ckpt.pt ]; then models=$models,$OUT/$m; fi; done
  timeout ${EVAL_TIMEOUT:-0} python eval.py --compare=$models --task_dir=$TASK --n_prompts=256 --gen_batch_size=256 \
    --max_new_tokens=150 --data_dir=$DATA --eval_iters=20 --reference=$OUT/sft ${EVAL_ARGS:-} | tee $OUT/compare_all.md
fi
