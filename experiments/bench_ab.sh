#!/usr/bin/env bash
# A/B of bench.py's training step for two model.py versions in one call, alternating (ROUNDS each):
# one run's step time moves by about a millisecond with the routing it happens to draw, so a change
# worth less than that needs the two versions side by side. Put them beside this checkout first
# (both are left untracked; the checkout's model.py is restored at the end):
# $ git show HEAD:model.py > experiments/model_old_ab.py && cp model.py experiments/model_new_ab.py
# $ OUT=out/bench_ab ROUNDS=2 ARGS="--batch_size=128" bash experiments/bench_ab.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/bench_ab}
ROUNDS=${ROUNDS:-2}
ARGS=${ARGS:-}
mkdir -p $OUT
for i in $(seq 1 $ROUNDS); do
  for v in old new; do
    cp experiments/model_${v}_ab.py model.py
    python bench.py config/tinystories_moe.py --modes=train --cuda_graph_train=True $ARGS \
      --out_file=$OUT/${v}$i.json 2>&1 | grep "^train\|rror" | sed "s/^/$v$i /"
  done
done
cp experiments/model_new_ab.py model.py
