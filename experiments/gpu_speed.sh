#!/usr/bin/env bash
# Evidence for the GPU speed work (issue 10), in one call on the lent H100 (about 8 minutes):
# the CUDA tests, then bench.py on the default MoE config beside transformers (training step,
# prefill, decode at batch 1 and 64, eager and CUDA-graph), the dense config, and a Muon step.
# Prints each table; JSON results and torch.profiler tables go to $OUT.
# $ OUT=out/gpu_speed bash experiments/gpu_speed.sh
set -uo pipefail
OUT=${OUT:-out/gpu_speed}
mkdir -p $OUT
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -m pytest -q tests/test_cuda.py 2>&1 | tail -15
python bench.py config/tinystories_moe.py --compare_hf=True --steps=8 --out_file=$OUT/moe.json \
  --profile=$OUT/moe_profile.txt 2>&1 | grep -v Warning
python bench.py config/tinystories_dense.py --modes=train,decode --decode_batches="(1,64)" \
  --out_file=$OUT/dense.json 2>&1 | grep -v Warning
python bench.py config/tinystories_moe.py --modes=train --optimizer=muon --steps=8 \
  --out_file=$OUT/moe_muon.json 2>&1 | grep -v Warning
