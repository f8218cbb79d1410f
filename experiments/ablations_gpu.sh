#!/usr/bin/env bash
# The ablation studies of config/ablations/ on a rented GPU whose commands are cut after 10
# minutes: the story data is prepared once (data/stories, kept while the machine is held), then each
# named study runs through ablate.py within a time budget, and its folder (without checkpoints)
# comes back as one archive. A study cut by the budget continues where it stopped when this runs
# again on the same machine (ablate.py resumes killed runs from their checkpoints and skips
# finished ones).
#   D             the folder the archives and logs go to (the device's $OUT)
#   STUDY...      names of config/ablations/*.py: attention balancing moe mtp optimizer long_context
#   BUDGET        seconds for all the studies of this call (default 500; then the archives)
#   ABLATE_ARGS   more settings for every study's ablate.py (e.g. '--parallel=2')
# Runs a study finished before whose folders are kept in docs/ablations/STUDY (logs and markers, no
# checkpoints) are copied in first, so a fresh machine trains only the missing seeds and variants.
# The long_context study also scores its model at 2x and 4x its training length with every RoPE
# scaling (experiments/long_context.py).
# $ SHARED_DATA=.shared_data bash experiments/ablations_gpu.sh $OUT attention mtp
set -uo pipefail
D=${1:?usage: bash experiments/ablations_gpu.sh FOLDER STUDY...}; shift
[ $# -gt 0 ] || { echo "error: name at least one study: $(cd config/ablations && ls *.py | sed 's/\.py$//' | tr '\n' ' ')"; exit 2; }
for s in "$@"; do
  [ -f config/ablations/$s.py ] || { echo "error: no study config/ablations/$s.py"; exit 2; }
done
mkdir -p $D
END=$((SECONDS + ${BUDGET:-500}))
if [ ! -e data/stories/meta.json ]; then        # the pretraining data alone (no task files)
  python prepare/stories.py --task_dir='' > $D/prepare.log 2>&1 || { tail -n 20 $D/prepare.log; exit 1; }
  echo "prepare: $(tail -n 1 $D/prepare.log)"
fi
for s in "$@"; do
  left=$((END - SECONDS))
  [ $left -gt 30 ] || { echo "$s: no time left in this call's budget"; continue; }
  # (not long_context: its runs are scored again by long_context.py below, which needs their
  # checkpoints, and the kept folders have none)
  if [ -d docs/ablations/$s ] && [ ! -d out/ablations/$s ] && [ $s != long_context ]; then
    mkdir -p out/ablations && cp -r docs/ablations/$s out/ablations/$s
  fi
  timeout $left python ablate.py config/ablations/$s.py ${ABLATE_ARGS:-} > $D/$s.log 2>&1
  rc=$?
  if [ $rc = 124 ]; then    # cut before ablate.py wrote its tables: write them from what has finished
    echo "$s: stopped by the budget after ${left} s (run this again on the same machine to continue)"
    timeout 60 python ablate.py config/ablations/$s.py ${ABLATE_ARGS:-} --report_only=True >> $D/$s.log 2>&1
  fi
  if [ $s = long_context ] && [ $rc = 0 ]; then
    timeout $((END - SECONDS > 30 ? END - SECONDS : 30)) python experiments/long_context.py \
      --out_dir=out/ablations/long_context/train256_s1337 --factors=2,4 >> $D/$s.log 2>&1
  fi
  grep '^|' out/ablations/$s/results.md 2> /dev/null
  # (not the runs set aside, nor each run's own training plots: the study's plots show every run;
  # long_context.py's plot in its run folder stays)
  tar czf $D/$s.tgz --exclude='*.pt' --exclude='*.stale' --exclude='*_s[0-9]*/loss.png' \
    --exclude='*_s[0-9]*/max_logit.png' --exclude='*_s[0-9]*/expert_load.png' -C out/ablations $s 2> /dev/null
done
ls -la $D
