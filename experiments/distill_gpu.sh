#!/usr/bin/env bash
# Evidence for distillation on one GPU with the real text these machines have (the full
# TinyStories set is not here). Two stand-ins run side by side, each student trained for the same
# tokens as its teacher three ways: from scratch (alpha=0), logit-distilled, sequence-distilled.
#  char: nanoGPT's GPU shakespeare_char recipe (6 layers x 384, 10.6M parameters, dropout 0.2,
#        5,000 steps x 64 x 256 characters; nanoGPT's own val loss: 1.4697) teaches a 6 x 180 student
#        (2.45M, 23.0% of the teacher's active parameters); sequence: 16,000 x 256 teacher characters.
#  bpe:  config/tinystories_moe.py (MLA + MoE, 48.5M active) pretrained on tiny-shakespeare in GPT-2
#        BPE (300 steps x 16 x 512: the base of the post-training pipeline) teaches the dense student of
#        config/distill_tinystories.py (12.0M active, 24.8%); sequence: 2,000 x 512 teacher tokens.
# Logit distillation at T = 1, alpha = 0.5 (config/distill_tinystories.py's choice, from the CPU
# sweep) and at distill.py's defaults T = 2, alpha = 0.5; char also alpha = 0.8 at T = 1.
# $ python prepare/shakespeare_char.py --source=../shared/data/shakespeare/input.txt
# $ python prepare/shakespeare_char.py --tokenizer=gpt2 --out_dir=data/shakespeare_gpt2 [--tokenizer_file=...]
# $ bash experiments/distill_gpu.sh
# On one H100 the bpe part took 218 s and the char teacher 205 s; the five char
# students side by side then ran at 17 to 19 steps/s each, so the whole script takes about 11
# minutes: over one device call's 10. PARTS=char or PARTS=bpe runs one part (one call each).
set -euo pipefail
OUT=${OUT:-out/distill_gpu}
CHAR=${CHAR:-data/shakespeare_char}
BPE=${BPE:-data/shakespeare_gpt2}
CHAR_STEPS=${CHAR_STEPS:-5000}
BPE_STEPS=${BPE_STEPS:-300}
mkdir -p $OUT
t0=$SECONDS
run() {     # run NAME command...: log to $OUT/NAME.log, report the wall time
  local name=$1; shift
  "$@" > $OUT/$name.log 2>&1 || { echo "$name failed:"; tail -20 $OUT/$name.log; return 1; }
  echo "$name: done $((SECONDS - t0)) s after the start"
}
CHAR_MODEL="--n_layer=6 --n_head=6 --block_size=256 --batch_size=64 --dropout=0.2 --max_iters=$CHAR_STEPS
  --lr_decay_iters=$CHAR_STEPS --eval_interval=250 --eval_iters=100 --compile=True"
char() {
  run char_teacher python train.py config/shakespeare_char.py $CHAR_MODEL --n_embd=384 --data_dir=$CHAR \
    --out_dir=$OUT/char_teacher
  local S="config/distill_shakespeare.py $CHAR_MODEL --n_embd=180 --teacher=$OUT/char_teacher --data_dir=$CHAR"
  run char_seqgen python distill.py $S --mode=sequence --generate_only=True --seq_data_dir=$OUT/char_seq_data \
    --num_samples=16000 --sample_length=256 --gen_batch_size=1000
  local pids=()
  run char_scratch python distill.py $S --alpha=0 --out_dir=$OUT/char_scratch & pids+=($!)
  run char_logits_t1 python distill.py $S --temperature=1 --alpha=0.5 --out_dir=$OUT/char_logits_t1 & pids+=($!)
  run char_logits_t2 python distill.py $S --temperature=2 --alpha=0.5 --out_dir=$OUT/char_logits_t2 & pids+=($!)
  run char_logits_t1a8 python distill.py $S --temperature=1 --alpha=0.8 --out_dir=$OUT/char_logits_t1a8 & pids+=($!)
  run char_sequence python distill.py $S --mode=sequence --seq_data_dir=$OUT/char_seq_data --num_samples=16000 \
    --sample_length=256 --gen_batch_size=1000 --out_dir=$OUT/char_sequence & pids+=($!)
  for p in "${pids[@]}"; do wait $p || true; done
}
bpe() {
  run bpe_teacher python train.py config/tinystories_moe.py --data_dir=$BPE --out_dir=$OUT/bpe_teacher \
    --batch_size=16 --max_iters=$BPE_STEPS --eval_interval=50 --eval_iters=10 --compile=False --always_save_checkpoint=False
  local S="config/distill_tinystories.py --teacher=$OUT/bpe_teacher --data_dir=$BPE --batch_size=16
    --max_iters=$BPE_STEPS --eval_interval=50 --eval_iters=10 --compile=False --always_save_checkpoint=False"
  local pids=()
  run bpe_scratch python distill.py $S --alpha=0 --out_dir=$OUT/bpe_scratch & pids+=($!)
  run bpe_logits_t1 python distill.py $S --temperature=1 --alpha=0.5 --out_dir=$OUT/bpe_logits_t1 & pids+=($!)
  run bpe_logits_t2 python distill.py $S --temperature=2 --alpha=0.5 --out_dir=$OUT/bpe_logits_t2 & pids+=($!)
  run bpe_sequence python distill.py $S --mode=sequence --seq_data_dir=$OUT/bpe_seq_data --num_samples=2000 \
    --sample_length=512 --gen_batch_size=500 --out_dir=$OUT/bpe_sequence & pids+=($!)
  for p in "${pids[@]}"; do wait $p || true; done
}
PARTS=${PARTS:-char bpe}
pids=()
for part in $PARTS; do $part & pids+=($!); done
for p in "${pids[@]}"; do wait $p || true; done
gap() {   # gap PREFIX: eval.py table of the teacher and students, and the share of the gap each closes
  local p=$1 models=$OUT/$1_teacher
  for m in scratch logits_t1 logits_t2 logits_t1a8 sequence; do
    if [ -f $OUT/${p}_$m/ckpt.pt ]; then models=$models,$OUT/${p}_$m; fi
  done
  python eval.py --compare=$models --data_dir=$2 --n_prompts=0 --eval_iters=$3 | tee $OUT/${p}_compare.md
  python - $OUT $p <<'PY'
import json, os, sys
out, p = sys.argv[1:]
r = {k: json.load(open(f'{out}/{p}_{k}/eval.json'))['val/loss'] for k in
     ('teacher', 'scratch', 'logits_t1', 'logits_t2', 'logits_t1a8', 'sequence') if os.path.isfile(f'{out}/{p}_{k}/eval.json')}
for k in r:
    if k not in ('teacher', 'scratch'):
        print(f"{p} {k}: val loss {r[k]:.4f}, closes {(r['scratch'] - r[k]) / (r['scratch'] - r['teacher']):.1%} of the gap "
              f"between the student from scratch ({r['scratch']:.4f}) and the teacher ({r['teacher']:.4f})")
PY
}
for part in $PARTS; do
  if [ $part = char ]; then gap char $CHAR 200; else gap bpe $BPE 20; fi
done
echo "all: $((SECONDS - t0)) s"
