#!/usr/bin/env bash
# The engine's prompt tokens as rows of its one-token pass (engine.py prompt_rows, the default with
# CUDA graphs) against each step's prompt chunks in a pass of their own (prompt_rows=False), side by
# side on one GPU: the default TinyStories MoE with random weights, 64 streams, 512 requests, long-
# tailed and uniform output lengths, static batching beside them; first the CUDA tests that both
# ways give the eager engine's tokens.
# $ bash experiments/serve_prompt_rows.sh out/serve_rows
set -uo pipefail
D=${1:-out/serve_rows}
mkdir -p $D
CFG="config/tinystories_moe.py --max_prompt=128 --max_output=384 --streams=64 --n_requests=512"
timeout 120 python -m pytest -q tests/test_engine.py -k cuda_graph_steps 2>&1 | tail -3
for lengths in exponential uniform; do
  for rows in True False; do
    methods=engine; [ $rows = False ] && methods=engine,static
    timeout 100 python bench_serve.py $CFG --output_lengths=$lengths --mean_output=128 --prompt_rows=$rows \
      --methods=$methods --out_file=$D/${lengths}_rows$rows.json 2>&1 | tee $D/${lengths}_rows$rows.log | grep '^|'
  done
done
