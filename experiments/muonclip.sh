#!/usr/bin/env bash
# Evidence for MuonClip: the default MoE config (config/tinystories_moe.py) trained for the
# same tokens with AdamW, Muon and MuonClip at two learning rates each, then Muon and MuonClip at a
# learning rate high enough for the attention logits to grow. Prints tables, writes PNGs to $OUT.
# $ DATA=data/shakespeare_gpt2 OUT=out/muonclip bash experiments/muonclip.sh
set -euo pipefail
DATA=${DATA:-data/shakespeare_gpt2}
OUT=${OUT:-out/muonclip}
STEPS=${STEPS:-150}
HIGH_LR=${HIGH_LR:-3e-2}
TAU=${TAU:-100}
COMMON="config/tinystories_moe.py --data_dir=$DATA --batch_size=16 --max_iters=$STEPS --warmup_iters=15
  --eval_interval=10 --eval_iters=10 --log_interval=5 --compile=False --log_max_logit=True
  --save_checkpoints=False --qk_clip_tau=$TAU ${EXTRA:-}"
mkdir -p $OUT
# the default data: tiny-shakespeare in GPT-2's BPE (offline: from $SHARED_DATA, as prepare says)
if [ ! -e $DATA/train.bin ] && [ $DATA = data/shakespeare_gpt2 ]; then
  python prepare/shakespeare_char.py --tokenizer=gpt2 --out_dir=$DATA
fi
runs=()
for opt in adamw muon muonclip; do
  for lr in 1e-3 3e-3; do
    python train.py $COMMON --optimizer=$opt --learning_rate=$lr --out_dir=$OUT/${opt}_lr$lr > $OUT/${opt}_lr$lr.log 2>&1 || tail -5 $OUT/${opt}_lr$lr.log
    runs+=("$OUT/${opt}_lr$lr")
  done
done
for opt in muon muonclip; do
  python train.py $COMMON --optimizer=$opt --learning_rate=$HIGH_LR --out_dir=$OUT/${opt}_lr$HIGH_LR > $OUT/${opt}_high.log 2>&1 || tail -5 $OUT/${opt}_high.log
done
all=$(IFS=,; echo "${runs[*]}")
python plot_runs.py --runs=$all --key=val/loss --out=$OUT/val_loss.png --title="val loss, same tokens ($STEPS steps x 16 x 512)"
python plot_runs.py --runs=$all,$OUT/muon_lr$HIGH_LR,$OUT/muonclip_lr$HIGH_LR --key=attn/max_logit_all \
  --out=$OUT/max_logit.png --hline=$TAU --logy=True --title="largest attention logit (any layer, any head)"
python plot_runs.py --runs=$OUT/muon_lr$HIGH_LR,$OUT/muonclip_lr$HIGH_LR --key=val/loss --out=$OUT/val_loss_high_lr.png
