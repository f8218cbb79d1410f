#!/usr/bin/env bash
# Evidence for multi-GPU training, on a lent machine with 2 GPUs (about 10 minutes):
# training tokens/s of the default MoE config (config/tinystories_moe.py, batch_size 64 x 512 per
# GPU) on 1 GPU, on 2 GPUs with DDP, with FSDP (--fsdp=True) and with expert parallelism
# (--expert_parallel=2, MoE configs only), then the ratios to 1 GPU (target: at least 1.8x). Each run is train.py itself for $STEPS steps on a synthetic token set
# (random bytes, so no download; the vocabulary is padded to GPT-2's 50304 as in the real run);
# tokens/s is the median of the logged intervals after the first $SKIP (compilation, warm-up).
# NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0), as the shared H200 machines require.
# $ OUT=out/multigpu bash experiments/multigpu.sh
# A CPU dry run of the script's logic (gloo, a tiny model):
# $ NPROC=2 STEPS=12 LOG_INTERVAL=2 EXTRA="--device=cpu --compile=False --n_layer=2 --n_embd=64 --n_head=2
#   --batch_size=2 --block_size=64 --n_routed_experts=8 --moe_intermediate_size=32 --q_lora_rank=32
#   --kv_lora_rank=32 --qk_nope_head_dim=16 --qk_rope_head_dim=16 --v_head_dim=16 --intermediate_size=128
#   --peak_flops=1e12" bash experiments/multigpu.sh
set -euo pipefail
OUT=${OUT:-out/multigpu}
CONFIG=${CONFIG:-config/tinystories_moe.py}
NPROC=${NPROC:-2}
STEPS=${STEPS:-60}
SKIP=${SKIP:-2}
LOG_INTERVAL=${LOG_INTERVAL:-5}
DATA=${DATA:-$OUT/random_data}
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
mkdir -p $OUT
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

if [ ! -f $DATA/meta.json ]; then                   # 8M random printable bytes, split 31:1
  python - "$DATA" <<'EOF'
import random, sys
from data import write_token_dataset
from tokenizer import ByteTokenizer
rng = random.Random(0)
docs = [''.join(rng.choices('abcdefghijklmnopqrstuvwxyz .,', k=8192)) for _ in range(1024)]
write_token_dataset(sys.argv[1], {'train': docs[:992], 'val': docs[992:]}, ByteTokenizer(), 'random', num_proc=1)
EOF
fi

COMMON="$CONFIG --data_dir=$DATA --vocab_size=50304 --max_iters=$STEPS --eval_interval=100000 --eval_iters=1
  --log_interval=$LOG_INTERVAL --save_checkpoints=False --warmup_iters=10 ${EXTRA:-}"
run() {   # name, launcher, extra train.py args: train, then print the median logged tokens/s
  local name=$1 launcher=$2 args=$3
  $launcher train.py $COMMON $args --out_dir=$OUT/$name > $OUT/$name.log 2>&1 || { tail -20 $OUT/$name.log >&2; exit 1; }
  python - "$OUT/$name/log.jsonl" "$SKIP" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
speeds = [r['tokens_per_sec'] for r in rows if 'tokens_per_sec' in r]
speeds = speeds[int(sys.argv[2]):] or speeds[-1:]      # a short run: its last interval
print(statistics.median(speeds))
EOF
}
TORCHRUN="torchrun --standalone --nproc_per_node=$NPROC"
one=$(run gpu1 python "")
ddp=$(run ddp$NPROC "$TORCHRUN" "")
fsdp=$(run fsdp$NPROC "$TORCHRUN" "--fsdp=True")
ep=0
if [ "${EP:-1}" = 1 ]; then ep=$(run ep$NPROC "$TORCHRUN" "--expert_parallel=$NPROC"); fi   # EP=0: a dense config
python - "$one" "$ddp" "$fsdp" "$ep" "$NPROC" "$CONFIG" <<'EOF' | tee $OUT/summary.md
import sys
one, ddp, fsdp, ep = map(float, sys.argv[1:5])
n, config = sys.argv[5], sys.argv[6]
print(f'| {config} | tokens/s | vs 1 GPU |\n| --- | --- | --- |')
print(f'| 1 GPU | {one:,.0f} | 1.00x |')
print(f'| {n} GPUs, DDP | {ddp:,.0f} | {ddp / one:.2f}x |')
print(f'| {n} GPUs, FSDP | {fsdp:,.0f} | {fsdp / one:.2f}x |')
if ep:
    print(f'| {n} GPUs, expert parallel | {ep:,.0f} | {ep / one:.2f}x |')
EOF
