#!/usr/bin/env bash
# Evidence for the GPU speed work (issue 10) on one H100, in three parts that each fit one device
# call of 10 minutes (the numbers in the README's "Performance on one H100" came from these):
#   PART=1  the CUDA tests (about 6 minutes: several torch.compile runs)
#   PART=2  the default MoE config beside transformers: training step, prefill, decode at batch 1
#           (eager, CUDA graph, compiled + CUDA graph), with torch.profiler tables
#   PART=3  decode at batch 64 beside transformers; the dense config; the optimizer step alone
# JSON results and profiles go to $OUT.
# $ PART=2 OUT=out/gpu_speed bash experiments/gpu_speed.sh
set -uo pipefail
OUT=${OUT:-out/gpu_speed}
PART=${PART:-2}
mkdir -p $OUT
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
case $PART in
  1) python -m pytest -q tests/test_cuda.py 2>&1 | tail -5 ;;
  2) python bench.py config/tinystories_moe.py --compare_hf=True --steps=8 --decode_batches="(1,)" \
       --out_file=$OUT/moe.json --profile=$OUT/moe_profile.txt 2>&1 | grep -v -i warn | tail -12 ;;
  3) python bench.py config/tinystories_moe.py --modes=decode --decode_batches="(64,)" --compare_hf=True \
       --steps=3 --out_file=$OUT/moe_b64.json 2>&1 | grep -v -i warn | tail -6
     python bench.py config/tinystories_dense.py --modes=train,decode --compile_decode=False \
       --out_file=$OUT/dense.json 2>&1 | grep -v -i warn | tail -6
     for o in muon adamw; do
       python bench.py config/tinystories_moe.py --modes=optimizer --optimizer=$o 2>&1 | grep "step ms"
     done ;;
  *) echo "PART=$PART; valid: 1, 2, 3"; exit 2 ;;
esac
