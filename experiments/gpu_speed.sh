#!/usr/bin/env bash
# Evidence for the GPU speed work on one H100, in parts that each fit one device
# call of 10 minutes (the numbers of docs/performance.md and of notes/performance.md
# came from these):
#   PART=1  the CUDA tests (about 6 minutes: several torch.compile runs)
#   PART=2  the default MoE config beside transformers: training step, prefill, decode at batch 1
#           (eager, CUDA graph, compiled + CUDA graph), with torch.profiler tables
#   PART=3  decode at batch 64 beside transformers; the dense config; the optimizer step alone
#   PART=4  the fused output layer + loss (loss_impl=auto) against the plain one: dense at batch 128,
#           MoE at 64 (beside transformers in alternating rounds) and 128 (about 6 minutes)
#   PART=5  the whole training step as one CUDA graph: MoE at batch 64 beside
#           transformers in alternating rounds, with a profile (kernels and idle gaps); MoE at 128;
#           the loss-kernel and router micro-benchmarks (about 6 minutes)
#   PART=6  MoE at batch 64 and 128 beside transformers in alternating rounds (the graph
#           captured afresh each round, so batch 128 fits too); the output-layer micro-benchmarks
#           (Triton softmax-in-GEMM, chunk sizes) and the attention backends (about 7 minutes)
#   PART=7  the CUDA tests of the loss, MoE and graphed step; the loss's row pass (one
#           read against two) and the experts' grouped GEMMs alone; MoE at batch 128 (with a
#           profile) and 64 with the graph (about 6 minutes)
#   PART=8  the micro-benchmarks of MLA's layout (needs experiments/model_old_ab.py, see
#           kernel_bench.py mla), the MoE's row gathers and the expert counts; MoE at batch 128 and 64
#           beside transformers in alternating rounds (about 5 minutes). The A/B numbers of that
#           session came from experiments/bench_ab.sh, now experiments/ab.py
#   PART=9  the residual stream's RMSNorm backward and its bf16 cast under inductor's
#           settings (kernel_bench.py normcast); MoE at batch 128 and 64 beside transformers in
#           alternating rounds (about 6 minutes). Its A/B numbers came from experiments/ab.py
#   PART=10 every training target on the final code: MoE at batch 128 and 64 beside
#           transformers in alternating rounds, then a profile of the graphed batch-128 step
#           (about 7 minutes)
#   PART=11 the CUDA tests left unrun before; decode at batch 1 and 64 beside
#           transformers; the dense config at batch 128 with the graph (about 6 minutes)
# JSON results and profiles go to $OUT.
# $ PART=2 OUT=out/gpu_speed bash experiments/gpu_speed.sh
set -uo pipefail
OUT=${OUT:-out/gpu_speed}
PART=${PART:-2}
mkdir -p $OUT
beside_transformers() {   # the graphed MoE step at each batch given, 3 rounds alternating with transformers
  for b in "$@"; do
    python bench.py config/tinystories_moe.py --modes=train --cuda_graph_train=True --compare_hf=True \
      --hf_rounds=3 --batch_size=$b --out_file=$OUT/moe_b${b}_graph_hf.json 2>&1 | grep "^| train\|^train\|rror"
  done
}
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
  4) one() { local name=$1; shift; python bench.py "$@" --modes=train --out_file=$OUT/$name.json 2>&1 | grep -v -i warn |
               grep "^| train\|^train\|Error\|error" | sed "s/^/$name /"; }
     one dense_b128_auto config/tinystories_dense.py --batch_size=128 --loss_impl=auto
     one dense_b128_plain config/tinystories_dense.py --batch_size=128 --loss_impl=plain
     one moe_b64_auto_hf config/tinystories_moe.py --loss_impl=auto --compare_hf=True --hf_rounds=3
     one moe_b64_plain config/tinystories_moe.py --loss_impl=plain
     one moe_b128_auto config/tinystories_moe.py --batch_size=128 --loss_impl=auto ;;
  5) G="python bench.py config/tinystories_moe.py --modes=train --cuda_graph_train=True"
     $G --compare_hf=True --hf_rounds=3 --profile=$OUT/moe_b64_graph_profile.txt --out_file=$OUT/moe_b64_graph.json \
       2>&1 | grep -v -i warn | grep "^| train\|^train\|rror"
     $G --batch_size=128 --out_file=$OUT/moe_b128_graph.json 2>&1 | grep "^train\|rror"
     python experiments/kernel_bench.py ce,router 2>&1 | grep -v -i warn ;;
  6) beside_transformers 64 128
     python experiments/kernel_bench.py lmhead,chunks,attn 2>&1 | grep -v -i warn ;;
  7) python -m pytest -q tests/test_cuda.py -k "grouped or compiled_step or cross_entropy or fused_loss or whole_step or swiglu" \
       2>&1 | tail -3
     python experiments/kernel_bench.py ce,grouped 2>&1 | grep -v -i warn
     G="python bench.py config/tinystories_moe.py --modes=train --cuda_graph_train=True"
     $G --batch_size=128 --profile=$OUT/moe_b128_graph_profile.txt --out_file=$OUT/moe_b128_graph.json \
       2>&1 | grep "^train\|rror"
     $G --out_file=$OUT/moe_b64_graph.json 2>&1 | grep "^train\|rror" ;;
  8) python experiments/kernel_bench.py mla,glue,counts 2>&1 | grep -v -i warn
     beside_transformers 128 64 ;;
  9) python experiments/kernel_bench.py normcast 2>&1 | grep -v -i warn
     beside_transformers 128 64 ;;
  10) beside_transformers 128 64
      python bench.py config/tinystories_moe.py --modes=train --cuda_graph_train=True --batch_size=128 \
        --profile=$OUT/moe_b128_graph_profile.txt --out_file=$OUT/moe_b128_graph.json 2>&1 | grep "^train\|rror" ;;
  11) python -m pytest -q tests/test_cuda.py -k "row_kernel or train_script_compiled or sync_check or profile_on_the_gpu" \
        2>&1 | tail -3
      python bench.py config/tinystories_moe.py --modes=decode --decode_batches="(1, 64)" --compare_hf=True \
        --steps=6 --out_file=$OUT/moe_decode_hf.json 2>&1 | grep -v -i warn | tail -8
      python bench.py config/tinystories_dense.py --modes=train --cuda_graph_train=True --batch_size=128 \
        --out_file=$OUT/dense_b128_graph.json 2>&1 | grep "^| train\|^train\|rror" ;;
  *) echo "PART=$PART; valid: 1 to 11"; exit 2 ;;
esac
