#!/usr/bin/env bash
# The GPU profile of speedrun.sh in one hold of a rented GPU machine whose commands are cut after
# 10 minutes: the work runs in its own process session (setsid), so it outlives the command that
# started it, and later commands wait for it and collect the results.
#   start     speedrun.sh --profile=gpu in the background, and beside its SFT a second SFT run at
#             a higher learning rate (a one-point sweep)
#   spec      the speculative-decoding benchmark on the base model (trained with one MTP module)
#   report    report.py on whatever has finished
#   wait N    wait up to N seconds for all of it to finish; print the stage times so far
#   collect D the report, logs, eval.json / log.jsonl of every run and the plots -> D/lifecycle.tgz
# $ SHARED_DATA=.shared_data bash experiments/lifecycle_gpu.sh start && bash experiments/lifecycle_gpu.sh wait 560
set -uo pipefail
R=${R:-out/speedrun_gpu}
SWEEP="--max_iters=800 --eval_interval=200 --batch_size=32 --block_size=512 --warmup_iters=50 --eval_prompts=128
       --max_new_tokens=320"
case ${1:-} in
  start)
    mkdir -p $R/logs
    setsid nohup bash -c "
      bash speedrun.sh --profile=gpu --out=$R > $R/logs/speedrun.log 2>&1 &
      main=\$!
      until grep -qs '^train' $R/times.tsv; do sleep 5; kill -0 \$main 2> /dev/null || break; done
      if grep -qs '^train' $R/times.tsv; then
        python sft.py --init_from=$R/base --out_dir=$R/sweep_sft_adamw_lr1.5e-3 --task_dir=$R/task $SWEEP \
          --learning_rate=1.5e-3 --min_lr=1.5e-4 > $R/logs/sweep_sft_adamw_lr1.5e-3.log 2>&1 &
      fi
      wait
      touch $R/ALL_DONE
    " > /dev/null 2>&1 < /dev/null &
    echo "started in the background; logs in $R/logs" ;;
  wait)
    for ((i = 0; i < ${2:-560}; i += 10)); do [ -e $R/ALL_DONE ] && break; sleep 10; done
    [ -e $R/ALL_DONE ] && echo "all done" || echo "still running"
    cat $R/times.tsv 2> /dev/null; tail -3 $R/logs/speedrun.log 2> /dev/null
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader ;;
  spec)      # the speculative-decoding benchmark on the base model (alone on the GPU: it times batch 1)
    python experiments/speculative_bench.py --out_dir=$R/base --out_file=$R/speculative.json 2>&1 | tee $R/logs/speculative.log ;;
  report)    # a report card of what has finished so far
    python report.py --out=$R --profile=gpu > /dev/null ;;
  collect)
    mkdir -p ${2:?collect needs a folder}
    tar czf $2/lifecycle.tgz --exclude='*.pt' --exclude='*.bin' --exclude='*.jsonl.tmp' --exclude=$(basename $R)/data \
      --exclude=$(basename $R)/task --exclude=$(basename $R)/prefs -C $(dirname $R) $(basename $R)
    cp $R/report.md $2/ 2> /dev/null; cat $R/logs/speculative.log 2> /dev/null
    ls -la $2 ;;
  *) echo "usage: bash experiments/lifecycle_gpu.sh start | wait SECONDS | spec | report | collect FOLDER"; exit 2 ;;
esac
