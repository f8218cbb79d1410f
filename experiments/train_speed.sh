#!/usr/bin/env bash
# train.py's own tokens/s on the default MoE config, with and without the whole training step
# captured as a CUDA graph (cuda_graph_train): 60 steps each, no checkpoints; prints the logged
# tokens/s and MFU of the last logged steps (steps 40-60: past the compile and the graph capture).
# Any token data works for speed; data/tinystories is the small sample when the full set is absent.
# $ OUT=out/train_speed bash experiments/train_speed.sh
set -uo pipefail
OUT=${OUT:-out/train_speed}
mkdir -p $OUT
export PYTHONUNBUFFERED=1
for graph in False True; do
  python train.py config/tinystories_moe.py --out_dir=$OUT/graph_$graph --max_iters=60 --eval_interval=1000 \
    --eval_iters=2 --log_interval=10 --save_checkpoints=False --cuda_graph_train=$graph "$@" 2>&1 | grep -i "error" | head -5
  python - "$OUT/graph_$graph/log.jsonl" "$graph" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rows = [r for r in rows if 'tokens_per_sec' in r and r['step'] >= 40]
print(f"cuda_graph_train={sys.argv[2]}: steps {[r['step'] for r in rows]}, tokens/s "
      f"{statistics.median(r['tokens_per_sec'] for r in rows):,.0f} (median), MFU "
      f"{100 * statistics.median(r['mfu'] for r in rows):.1f}%, step {statistics.median(r['step_time_ms'] for r in rows):.1f} ms, "
      f"loss at 60 {rows[-1]['train/loss']:.3f}")
PY
done
