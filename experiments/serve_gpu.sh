#!/usr/bin/env bash
# The serving numbers on one GPU, in one command: bench_serve.py on the default TinyStories MoE
# (random weights: outputs never stop early, so the timings do not depend on training) for the
# engine and static batching at 1/8/64/256 streams, transformers' generate at 64 streams, then
# bench.py's decode in bf16, int8 and int4 weights. Each part is bounded by a timeout, so one that
# runs long leaves the others their time, and all of it by 595 s (one device call).
# $ bash experiments/serve_gpu.sh out/serve_gpu
set -uo pipefail
D=${1:-out/serve_gpu}
mkdir -p $D
CFG="config/tinystories_moe.py --max_prompt=128 --max_output=384"
# one process per level, each bounded, so a slow level still leaves the others their rows. The
# engine's steps are CUDA graphs (bench_serve's cuda_graph, on for CUDA: one per (rows, prompt-chunk
# columns) bucket, captured before the timing starts); when they ran eagerly (about 30 tokens/s for
# one stream on the H200), 32 requests at one stream, the default, did not finish in 200 s
for C in 1 8 64 256; do
  n=$((C < 8 ? 8 : 2 * C))
  timeout 90 python bench_serve.py $CFG --methods=engine,static --streams=$C --n_requests=$n \
    --out_file=$D/serve_$C.json 2>&1 | tee $D/serve_$C.log | grep -E '^engine at|^\| [0-9]|^(engine|static) +streams'
done
timeout 100 python bench_serve.py $CFG --methods=engine,static,hf --streams=64 --n_requests=128 \
  --out_file=$D/serve_hf.json 2>&1 | tee $D/serve_hf.log | grep '^|'
for q in bf16 int8 int4; do
  quant=$q; [ $q = bf16 ] && quant=''
  timeout 45 python bench.py config/tinystories_moe.py --modes=decode --compile_decode=False --quantize=$quant \
    --steps=5 --warmup=2 > $D/decode_$q.log 2>&1
  echo "decode $q:"; grep -iE "decode|weights" $D/decode_$q.log | tail -6
done
