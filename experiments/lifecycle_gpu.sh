#!/usr/bin/env bash
# The GPU profile of speedrun.sh in one hold of a rented GPU machine whose commands are cut after
# 10 minutes: the work runs in its own process session (setsid), so it outlives the command that
# started it, and later commands wait for it and collect the results.
#   start     speedrun.sh --profile=gpu in the background, and beside it two variants of its runs:
#             the distilled student with alpha 1 (the teacher's distribution alone, no hard labels),
#             and SFT on a task whose three words all come from the answer's first sentence (a
#             second task folder, prepared while the base model trains; SFT from the same base);
#             when all of it has finished, the serving benchmarks on the base model, alone on the
#             GPU: speculative decoding (spec) and bench_serve.py (engine and static batching at
#             1/8/64/256 streams, then transformers at 64)
#   spec      the speculative-decoding benchmark on the base model (trained with one MTP module)
#   report    report.py on whatever has finished
#   wait N    wait up to N seconds for all of it to finish; print the stage times so far
#   collect D the report, logs, eval.json / log.jsonl of every run and the plots -> D/lifecycle.tgz
# $ SHARED_DATA=.shared_data bash experiments/lifecycle_gpu.sh start && bash experiments/lifecycle_gpu.sh wait 560
# SIDE=0 leaves out the two side runs, BENCH=0 the serving benchmarks (the life cycle alone on the GPU)
set -uo pipefail
R=${R:-out/speedrun_gpu}
SIDE=${SIDE:-1} BENCH=${BENCH:-1}
# the gpu profile's student and distillation settings (speedrun.sh), with alpha 1 instead of 0.9
DISTILL_ALPHA1="--n_layer=4 --n_head=4 --n_embd=192 --pos_emb=rope --norm=rmsnorm --mlp=swiglu --bias=False
         --intermediate_size=512 --block_size=512 --batch_size=64 --learning_rate=3e-3 --min_lr=3e-4 --warmup_iters=100
         --max_iters=1500 --eval_interval=500 --eval_iters=20 --temperature=1.0 --alpha=1.0 --init_embedding=teacher"
# the gpu profile's task (speedrun.sh) with the words drawn from the answer's first sentence only,
# and its SFT settings
TASK_WS1="--n_prompts_val=256 --n_prompts_train=0 --n_sft_train=0 --task_in_train=0 --task_cut=True --task_words_min=30
         --task_words_max=120 --words_from_sentences=1 --words_in_order=True"
SFT="--max_iters=2000 --eval_interval=500 --batch_size=32 --block_size=512 --learning_rate=1e-3 --min_lr=1e-4
         --warmup_iters=50 --eval_prompts=128 --max_new_tokens=200"
SERVE="--checkpoint=$R/base --max_prompt=128 --max_output=384"
DISTILL_ALPHA1=$(echo $DISTILL_ALPHA1) TASK_WS1=$(echo $TASK_WS1) SFT=$(echo $SFT)   # one line each: spliced below
case ${1:-} in
  start)
    mkdir -p $R/logs
    setsid nohup bash -c "
      export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COALESCE_TILING_ANALYSIS=0 TORCHDYNAMO_SUPPRESS_ERRORS=1   # as speedrun.sh
      bash speedrun.sh --profile=gpu --out=$R > $R/logs/speedrun.log 2>&1 &
      main=\$!
      until grep -qs '^prepare' $R/times.tsv; do sleep 5; kill -0 \$main 2> /dev/null || break; done
      [ $SIDE = 1 ] && python prepare/stories.py --out_dir=$R/data_ws1 --task_dir=$R/task_ws1 $TASK_WS1 > $R/logs/prepare_ws1.log 2>&1
      until grep -qs '^train' $R/times.tsv; do sleep 5; kill -0 \$main 2> /dev/null || break; done
      if [ $SIDE = 1 ] && grep -qs '^train' $R/times.tsv; then
        python distill.py --teacher=$R/base --out_dir=$R/student_distill_alpha1 --data_dir=$R/data $DISTILL_ALPHA1 \
          > $R/logs/student_distill_alpha1.log 2>&1 &
        python sft.py --init_from=$R/base --out_dir=$R/sft_ws1 --task_dir=$R/task_ws1 $SFT > $R/logs/sft_ws1.log 2>&1 &
      fi
      wait
      touch $R/LIFECYCLE_DONE
      [ $BENCH = 1 ] || { touch $R/ALL_DONE; exit 0; }
      bash experiments/lifecycle_gpu.sh spec > /dev/null
      python bench_serve.py $SERVE --methods=engine,static --out_file=$R/serve.json > $R/logs/serve.log 2>&1
      python bench_serve.py $SERVE --methods=engine,static,hf --streams=64 --n_requests=128 \
        --out_file=$R/serve_hf.json > $R/logs/serve_hf.log 2>&1
      touch $R/ALL_DONE
    " > /dev/null 2>&1 < /dev/null &
    echo "started in the background; logs in $R/logs" ;;
  wait)
    for ((i = 0; i < ${2:-560}; i += 10)); do [ -e $R/ALL_DONE ] && break; sleep 10; done
    [ -e $R/ALL_DONE ] && echo "all done" || { [ -e $R/LIFECYCLE_DONE ] && echo "life cycle done, benchmarks running" || echo "still running"; }
    cat $R/times.tsv 2> /dev/null; tail -3 $R/logs/speedrun.log 2> /dev/null
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader ;;
  spec)      # the speculative-decoding benchmark on the base model (alone on the GPU: it times batch 1)
    python experiments/speculative_bench.py --out_dir=$R/base --out_file=$R/speculative.json 2>&1 | tee $R/logs/speculative.log ;;
  report)    # a report card of what has finished so far
    python report.py --out=$R --profile=gpu > /dev/null ;;
  collect)
    mkdir -p ${2:?collect needs a folder}
    tar czf $2/lifecycle.tgz --exclude='*.pt' --exclude='*.bin' --exclude='*.jsonl.tmp' --exclude=$(basename $R)/data \
      --exclude=$(basename $R)/task --exclude=$(basename $R)/prefs \
      --exclude=$(basename $R)/data_ws1 --exclude=$(basename $R)/task_ws1 -C $(dirname $R) $(basename $R)
    cp $R/report.md $2/ 2> /dev/null; tail -12 $R/logs/speculative.log $R/logs/serve*.log 2> /dev/null
    ls -la $2 ;;
  *) echo "usage: bash experiments/lifecycle_gpu.sh start | wait SECONDS | spec | report | collect FOLDER"; exit 2 ;;
esac
