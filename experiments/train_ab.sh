#!/usr/bin/env bash
# A/B of train.py's own tokens/s without the CUDA graph (the path most sensitive to host time):
# this checkout's model.py against an older one, alternating, two runs each (the first train.py run
# on a fresh machine measured slower: notes/performance.md); then a profile of the new.
# Put the older model.py beside this one first (both are left untracked):
# $ git show 92b6085:model.py > experiments/model_old_ab.py && cp model.py experiments/model_new_ab.py
# $ OUT=out/train_ab bash experiments/train_ab.sh          (carry data/tinystories to the GPU machine)
set -uo pipefail
export PYTHONUNBUFFERED=1
for i in 1 2; do
  for v in new old; do
    cp experiments/model_${v}_ab.py model.py
    python train.py config/tinystories_moe.py --out_dir=$OUT/ab_$v$i --max_iters=60 --eval_interval=1000 \
      --eval_iters=2 --log_interval=10 --save_checkpoints=False --cuda_graph_train=False 2>&1 | grep -i "error" | head -5
    python - "$OUT/ab_$v$i/log.jsonl" "$v$i" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rows = [r for r in rows if 'tokens_per_sec' in r and r['step'] >= 40]
print(sys.argv[2], f"{statistics.median(r['tokens_per_sec'] for r in rows):,.0f} tokens/s, step {statistics.median(r['step_time_ms'] for r in rows):.1f} ms")
PY
  done
done
cp experiments/model_new_ab.py model.py
python train.py config/tinystories_moe.py --out_dir=$OUT/prof --max_iters=14 --eval_interval=1000 --eval_iters=2 \
  --log_interval=10 --save_checkpoints=False --profile=$OUT/nograph_profile.txt 2>&1 | grep -i "error" | head -5
grep -A3 "by class\|device span" $OUT/nograph_profile.txt | head -12
rm -f experiments/model_new_ab.py experiments/model_old_ab.py
