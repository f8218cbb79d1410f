#!/usr/bin/env bash
# Why does SFT use all three required words in only about 22% of its answers (docs/results.md)?
# Two levers, 2 x 2, on one GPU hold, everything else as speedrun.sh --profile=gpu sets it: the
# base model's length (1,500 steps, the profile's, against 3,000) and SFT's learning rate (1e-3,
# the profile's, against 3e-4). Each folder under R is a speedrun.sh output folder:
#   R/ref            prepare, train (the profile's 1,500 steps), SFT at 1e-3, eval of both
#   R/long           train LONG steps (3,000) beside ref's, SFT at 1e-3, eval   (R/ref's data and task)
#   R/ref_lr3e-4     SFT at 3e-4 from R/ref's base model, eval                  (likewise R/long_lr3e-4)
# Each SFT starts as soon as its base model is saved, beside whatever still runs.
# PROFILE=cpu LONG=300 runs the same on the CPU profile (a smoke test of this script, minutes).
#   start     all of it in the background (setsid: it outlives the device command that started it)
#   wait N    wait up to N seconds for it to finish; print what has finished
#   table     one row per run: val bits/byte, greedy task score, all words, the 1st / 2nd / 3rd
#             listed word used, repetition (from each eval.json); R= and RUNS= name other folders
#             (lifecycle_gpu.sh sides uses it so); a base model linked into several runs is one row
#   collect D the table, logs, eval.json / eval_answers.jsonl / log.jsonl and plots -> D/sft_sweep.tgz
# $ SHARED_DATA=.shared_data bash experiments/sft_sweep_gpu.sh start && bash experiments/sft_sweep_gpu.sh wait 540
set -uo pipefail
R=${R:-out/sft_sweep} PROFILE=${PROFILE:-gpu} LONG=${LONG:-3000}
RUNS=${RUNS:-"ref long ref_lr3e-4 long_lr3e-4"}
case ${1:-} in
  start)
    mkdir -p $R/logs $R/ref $R/long $R/ref_lr3e-4 $R/long_lr3e-4
    rm -f $R/DONE $R/ref/TRAINED $R/long/TRAINED        # (an earlier start's: not this one's)
    A=$(cd $R && pwd -P)         # (R relative or absolute)
    for v in long ref_lr3e-4 long_lr3e-4; do ln -sfn $A/ref/data $A/$v/data; ln -sfn $A/ref/task $A/$v/task; done
    ln -sfn $A/ref/base $A/ref_lr3e-4/base
    ln -sfn $A/long/base $A/long_lr3e-4/base
    setsid nohup bash -c "
      export PYTHONUNBUFFERED=1
      sweep() { bash speedrun.sh --profile=$PROFILE --out=$R/\$1 --stages=\$2 >> $R/logs/\$1.log 2>&1; }
      sweep ref prepare
      # TRAINED holds train's exit code (train.py saves ckpt.pt at evaluations too: no sign it ended);
      # the SFT runs from a base model that failed do not start
      (sweep ref train; echo \$? > $R/ref/TRAINED; grep -qx 0 $R/ref/TRAINED && EVAL_RUNS='base sft' sweep ref sft,eval) &
      (MODEL_EXTRA=--max_iters=$LONG sweep long train; echo \$? > $R/long/TRAINED
       grep -qx 0 $R/long/TRAINED && EVAL_RUNS='base sft' sweep long sft,eval) &
      (until [ -e $R/ref/TRAINED ]; do sleep 10; done
       grep -qx 0 $R/ref/TRAINED && EVAL_RUNS=sft SFT_EXTRA='--learning_rate=3e-4 --min_lr=3e-5' sweep ref_lr3e-4 sft,eval) &
      (until [ -e $R/long/TRAINED ]; do sleep 10; done
       grep -qx 0 $R/long/TRAINED && EVAL_RUNS=sft SFT_EXTRA='--learning_rate=3e-4 --min_lr=3e-5' sweep long_lr3e-4 sft,eval) &
      wait
      touch $R/DONE
    " > /dev/null 2>&1 < /dev/null &
    echo "started in the background; logs in $R/logs" ;;
  wait)
    for ((i = 0; i < ${2:-540}; i += 10)); do [ -e $R/DONE ] && break; sleep 10; done
    [ -e $R/DONE ] && echo "all done" || echo "still running"
    for v in $RUNS; do echo "$v: $(tr '\n' ' ' < $R/$v/times.tsv 2> /dev/null)"; done
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader 2> /dev/null ;;
  table)
    python - "$R" $RUNS <<'EOF'
import json, os, sys
R, runs = sys.argv[1], sys.argv[2:]
print('| run | val bits/byte (books / TinyStories) | task score | all words | 1st / 2nd / 3rd word used | repetition |')
print('| --- | --- | --- | --- | --- | --- |')
seen = set()                     # a base model linked into several runs' folders: one row
for v in runs:
    for run in ('base', 'sft'):
        path = os.path.realpath(os.path.join(R, v, run, 'eval.json'))
        if path in seen or not os.path.isfile(path):
            continue
        seen.add(path)
        e = json.load(open(path))
        f = lambda k, spec='.3f': format(e[k], spec) if e.get(k) is not None else '-'  # noqa: E731
        words = ' / '.join(f'{100 * x:.1f}%' for x in e.get('task/word_by_position', []))
        print(f"| {v}/{run} | {f('val/bpb')} / {f('val_tinystories/bpb')} | {f('task/score')} | "
              f"{f('task/all_words', '.1%')} | {words} | {f('task/repetition')} |")
EOF
    ;;
  collect)
    mkdir -p ${2:?collect needs a folder}
    bash $0 table | tee $2/sft_sweep.md
    tar czf $2/sft_sweep.tgz --exclude='*.pt' --exclude='*.bin' --exclude='*/data' --exclude='*/task' \
      -C $(dirname $R) $(basename $R)
    ls -la $2 ;;
  *) echo "usage: bash experiments/sft_sweep_gpu.sh start | wait SECONDS | table | collect FOLDER"; exit 2 ;;
esac
