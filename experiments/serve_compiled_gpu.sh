#!/usr/bin/env bash
# The engine's and static batching's steps through torch.compile (bench_serve.py --compile_step=True)
# against the same without, at 64 streams with long-tailed output lengths (the row where the engine
# is 1.88x static batching, docs/performance.md), on one GPU; then the CUDA test that the compiled and
# graphed steps give the eager engine's tokens. How long the compilation takes (one bucket per rows
# count) is the unknown, so the work runs in its own process session and outlives a device call:
#   start     all of it in the background (logs and JSON in D)
#   wait N    wait up to N seconds for it to finish; print the tables so far
# $ bash experiments/serve_compiled_gpu.sh start && bash experiments/serve_compiled_gpu.sh wait 540
set -uo pipefail
D=${D:-out/serve_compiled}
CFG="config/tinystories_moe.py --max_prompt=128 --max_output=384 --methods=engine,static --streams=64
     --n_requests=512 --output_lengths=exponential --mean_output=128"
CFG=$(echo $CFG)
case ${1:-} in
  start)
    mkdir -p $D
    setsid nohup bash -c "
      export PYTHONUNBUFFERED=1
      for m in eager compiled; do
        flag=''; [ \$m = compiled ] && flag=--compile_step=True
        t0=\$SECONDS
        python bench_serve.py $CFG \$flag --out_file=$D/\$m.json > $D/\$m.log 2>&1
        echo \"\$m: exit \$?, \$((SECONDS - t0)) s in all\" >> $D/times.txt
      done
      t0=\$SECONDS
      python -m pytest -q tests/test_engine.py -k compiled_graphed > $D/test.log 2>&1
      echo \"test: exit \$?, \$((SECONDS - t0)) s\" >> $D/times.txt
      touch $D/DONE
    " > /dev/null 2>&1 < /dev/null &
    echo "started in the background; logs in $D" ;;
  wait)
    for ((i = 0; i < ${2:-540}; i += 5)); do [ -e $D/DONE ] && break; sleep 5; done
    [ -e $D/DONE ] && echo "all done" || echo "still running"
    cat $D/times.txt 2> /dev/null
    for m in eager compiled; do
      [ -e $D/$m.log ] && { echo "== $m"; grep -E '^engine at|^\|' $D/$m.log; tail -2 $D/$m.log; }
    done
    [ -e $D/test.log ] && tail -3 $D/test.log
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader ;;
  *) echo "usage: bash experiments/serve_compiled_gpu.sh start | wait SECONDS"; exit 2 ;;
esac
