#!/usr/bin/env bash
# The serving numbers on one GPU, in one command: bench_serve.py on the default TinyStories MoE
# (random weights: outputs never stop early, so the timings do not depend on training) for the
# engine (tokens read back a step late, and at once: engine_sync) and static batching at
# 1/8/64/256 streams, transformers' generate at 64 streams, the 64 streams again with long-tailed
# output lengths, then bench.py's decode in bf16, int8 and int4 weights. Each part is bounded by a
# timeout, so one that runs long leaves the others their time, and all of it by 580 s (one device
# call of at most 600 s).
# $ bash experiments/serve_gpu.sh out/serve_gpu       (DECODE=0: without the quantized decode)
set -uo pipefail
D=${1:-out/serve_gpu}
mkdir -p $D
CFG="config/tinystories_moe.py --max_prompt=128 --max_output=384"
# first, that the engine's graphed steps, with and without overlap, give the eager engine's tokens
timeout 45 python -m pytest -q tests/test_engine.py -k cuda_graph_steps_equal 2>&1 | tail -3
# one process per level, each bounded, so a slow level still leaves the others their rows. The
# engine's steps are CUDA graphs (bench_serve's cuda_graph, on for CUDA: one per (rows, prompt-chunk
# columns) bucket, captured before the timing starts). At 64 streams 512 requests: with fewer, the
# last requests finishing alone bound what continuous batching can gain (bench_serve.py's "steps")
for C in 1 8 64 256; do
  n=$((C < 8 ? 8 : C == 64 ? 512 : 2 * C)); t=$((C < 64 ? 50 : C == 64 ? 90 : 80))
  timeout $t python bench_serve.py $CFG --methods=engine,engine_sync,static --streams=$C --n_requests=$n \
    --out_file=$D/serve_$C.json 2>&1 | tee $D/serve_$C.log | grep -E '^engine at|^\| [0-9]|^(engine|static) +streams'
done
timeout 100 python bench_serve.py $CFG --methods=engine,static,hf --streams=64 --n_requests=128 \
  --out_file=$D/serve_hf.json 2>&1 | tee $D/serve_hf.log | grep '^|'
timeout 60 python bench_serve.py $CFG --methods=engine,static --streams=64 --n_requests=512 --output_lengths=exponential \
  --mean_output=128 --out_file=$D/serve_exp.json 2>&1 | tee $D/serve_exp.log | grep '^|'
for q in $([ "${DECODE:-1}" = 1 ] && echo bf16 int8 int4); do     # DECODE=0: without them (105 s)
  quant=$q; [ $q = bf16 ] && quant=''
  timeout 35 python bench.py config/tinystories_moe.py --modes=decode --compile_decode=False --quantize=$quant \
    --steps=5 --warmup=2 > $D/decode_$q.log 2>&1
  echo "decode $q:"; grep -iE "decode|weights" $D/decode_$q.log | tail -6
done
