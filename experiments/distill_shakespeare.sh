#!/usr/bin/env bash
# Evidence for distillation at CPU scale: the shakespeare_char model (config/shakespeare_char.py,
# 0.87M parameters) teaches a student with a fifth of its active parameters (0.17M), trained for the
# same 2,000 steps x 12 x 64 tokens three ways: from scratch (alpha=0: the hard-label loss alone, which
# is train.py's run from the same initial weights on the same batches), logit-distilled, and
# sequence-distilled (on 1,000 x 1,024 tokens sampled from the teacher, about the size of the real
# training split). eval.py then measures each, beside the teacher, on the real val split.
# $ python prepare/shakespeare_char.py --source=../shared/data/shakespeare/input.txt
# $ bash experiments/distill_shakespeare.sh          (about 15 minutes on 2 CPU cores)
# TEACHER_ARGS adds train.py arguments for the teacher, e.g. a stronger one (README, Distillation results):
# $ OUT=out/kd TEACHER_ARGS="--max_iters=6000 --lr_decay_iters=6000 --eval_interval=500" bash experiments/distill_shakespeare.sh
set -euo pipefail
# one thread per run: the matrices are small, and on shared cores extra threads spin against other jobs
# (measured here: 15 steps/s with one thread, under 1 step/s with two while another job ran)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${OUT:-out/distill_shakespeare}
DATA=${DATA:-data/shakespeare_char}
mkdir -p $OUT
run() {     # run NAME command...: log to $OUT/NAME.log, report the wall time
  local name=$1 start=$SECONDS
  shift
  "$@" > $OUT/$name.log 2>&1 || { tail -20 $OUT/$name.log; exit 1; }
  echo "$name: $((SECONDS - start)) s"
}
[ -f $OUT/teacher/ckpt.pt ] || run teacher python train.py config/shakespeare_char.py --data_dir=$DATA \
  --out_dir=$OUT/teacher ${TEACHER_ARGS:-}
COMMON="config/distill_shakespeare.py --teacher=$OUT/teacher --data_dir=$DATA"
run scratch python distill.py $COMMON --alpha=0 --out_dir=$OUT/scratch
run logits python distill.py $COMMON --out_dir=$OUT/logits
run sequence python distill.py $COMMON --mode=sequence --seq_data_dir=$OUT/seq_data --out_dir=$OUT/sequence
python eval.py --compare=$OUT/teacher,$OUT/scratch,$OUT/logits,$OUT/sequence --data_dir=$DATA --n_prompts=0 \
  --eval_iters=200 | tee $OUT/compare.md
python - "$OUT" <<'PY'
import json, sys
r = {k: json.load(open(f'{sys.argv[1]}/{k}/eval.json'))['val/loss'] for k in ('teacher', 'scratch', 'logits', 'sequence')}
for k in ('logits', 'sequence'):
    print(f"{k}: closes {(r['scratch'] - r[k]) / (r['scratch'] - r['teacher']):.1%} of the gap between the "
          f"student from scratch ({r['scratch']:.4f}) and the teacher ({r['teacher']:.4f})")
PY
