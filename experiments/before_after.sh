#!/usr/bin/env bash
# This checkout's speed beside another version of the code, in one call on one GPU: each
# measurement runs in OLD (a folder holding the other version) and here, alternately, ROUNDS times.
#   PART=bench   bench.py: the MoE step at batch 128 and the dense step at batch 128 (both as one
#                CUDA graph), decoding at batch 1 and 64 (compiled step replayed as a CUDA graph)
#   PART=train   train.py's own tokens/s (MoE, the whole step as a CUDA graph, 60 steps, the median
#                of the steps logged from 30 on) on the token data in DATA
# Prints one table: each measurement's median over the rounds, old and new, and new / old.
# $ git archive 18f70c1 | (mkdir -p .before && tar -x -C .before)      # the version to compare with
# $ python prepare/tinystories.py --source=../shared/data/tinystories/train_sample_2mb.txt \
#       --tokenizer_file=../shared/data/gpt2.tiktoken --out_dir=.bench_data/tinystories
# $ OLD=.before DATA=.bench_data/tinystories PART=bench bash experiments/before_after.sh
set -uo pipefail
OLD=${OLD:?set OLD to the folder of the other version}
PART=${PART:-bench}
ROUNDS=${ROUNDS:-2}
DATA=${DATA:-data/tinystories}
OUT=${OUT:-out/before_after}
HERE=$(pwd)
case $OUT in /*) ;; *) OUT=$HERE/$OUT ;; esac
[[ $OUT == *[[:space:]]* ]] && { echo "error: OUT='$OUT' holds a space; give a folder whose path has none"; exit 2; }
mkdir -p $OUT
# an earlier invocation's results would be read as this one's (a failed measurement leaves none)
rm -rf $OUT/*.old.json $OUT/*.new.json $OUT/train.r*.old $OUT/train.r*.new
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader

measure() {   # measure SIDE NAME ARGS...: run in OLD (side=old) or here (side=new)
  local side=$1 name=$2; shift 2
  local dir=$HERE; [ "$side" = old ] && dir=$HERE/$OLD
  (cd $dir && "$@" > $OUT/$name.$side.log 2>&1) || { echo "$name ($side) failed:"; tail -5 $OUT/$name.$side.log; }
}

for r in $(seq 1 $ROUNDS); do
  for side in old new; do
    case $PART in
      bench)
        measure $side moe_b128.r$r python bench.py config/tinystories_moe.py --modes=train --cuda_graph_train=True \
          --batch_size=128 --out_file=$OUT/moe_b128.r$r.$side.json
        measure $side dense_b128.r$r python bench.py config/tinystories_dense.py --modes=train --cuda_graph_train=True \
          --batch_size=128 --out_file=$OUT/dense_b128.r$r.$side.json
        measure $side decode.r$r python bench.py config/tinystories_moe.py --modes=decode --decode_batches="(1, 64)" \
          --steps=6 --out_file=$OUT/decode.r$r.$side.json ;;
      train)
        measure $side train.r$r python train.py config/tinystories_moe.py --data_dir=$HERE/$DATA \
          --out_dir=$OUT/train.r$r.$side --max_iters=60 --eval_interval=1000 --eval_iters=2 --log_interval=10 \
          --save_checkpoints=False --cuda_graph_train=True ;;
      *) echo "PART=$PART; valid: bench, train"; exit 2 ;;
    esac
  done
done

python - "$OUT" "$PART" <<'PY'
import glob, json, os, statistics, sys
out, part = sys.argv[1], sys.argv[2]
def values(side):
    v = {}
    for f in glob.glob(f'{out}/*.{side}.json'):
        name = os.path.basename(f).split('.')[0]
        r = json.load(open(f))
        if 'train' in r:
            v.setdefault(f'{name} train tokens/s', []).append(r['train']['tokens_per_sec'])
        for k, m in r.items():
            if k.startswith('decode_b') and isinstance(m, dict):
                v.setdefault(f'{k} tokens/s', []).append(m['tokens_per_sec'])
    for d in glob.glob(f'{out}/train.r*.{side}/log.jsonl'):
        rows = [json.loads(l) for l in open(d)]
        rows = [r for r in rows if 'tokens_per_sec' in r and r['step'] >= 30]
        if rows:
            v.setdefault('train.py tokens/s', []).append(statistics.median(r['tokens_per_sec'] for r in rows))
    return v
old, new = values('old'), values('new')
print(f"\n| measurement | old (median of rounds) | new | new / old |\n| --- | --- | --- | --- |")
for k in sorted(set(old) | set(new)):
    o, n = old.get(k), new.get(k)
    mo = statistics.median(o) if o else float('nan')
    mn = statistics.median(n) if n else float('nan')
    print(f"| {k} | {mo:,.0f} ({', '.join(f'{x:,.0f}' for x in o or [])}) | {mn:,.0f} "
          f"({', '.join(f'{x:,.0f}' for x in n or [])}) | {mn / mo:.3f} |")
PY
