#!/usr/bin/env bash
# The whole life cycle on real stories, from raw text to a report card, in one command:
#   prepare   Gutenberg children's books + TinyStories + fairy tales -> token files (held-out
#             whole books, and the real TinyStories validation stories), and the instruction task
#             ("write a story that uses the words ...") built from the same passages
#   train     the base model (MLA + DeepSeekMoE with auxiliary-loss-free balancing)
#   sft       supervised fine-tuning on the task       prefs   preference pairs sampled from SFT
#   reward    the reward model                          dpo     DPO from SFT (DPO_SEEDS seeds)
#   ppo       PPO from SFT, rewarded by the task rule   grpo    GRPO from SFT, likewise
#   distill   a small dense student of the base model, and the same student trained from scratch
#   eval      every checkpoint on the held-out data and prompts (eval.py -> eval.json)
#   report    report.md + report.json + plots (report.py)
# Each stage reads the previous stage's checkpoint (init_from=) and writes its own folder under
# OUT; a stage whose output is already there is skipped, so a run stopped midway continues.
#
# $ bash speedrun.sh --profile=cpu      # a smoke test: every stage, tiny, about 10 minutes on 2 CPU cores
# $ bash speedrun.sh --profile=gpu      # one GPU (H200): the real run, under 25 minutes
# $ bash speedrun.sh --profile=gpu --stages=prepare,train      # some stages only (in this order)
# Options: --profile=cpu|gpu, --out=FOLDER (default out/speedrun_<profile>), --stages=a,b,...
# The data comes from $SHARED_DATA (default ../shared/data beside the checkout; see prepare/stories.py).
set -euo pipefail
PROFILE=cpu
STAGES=prepare,train,sft,prefs,reward,dpo,ppo,grpo,distill,eval,report
OUT=''
for arg in "$@"; do
  case $arg in
    --profile=*) PROFILE=${arg#*=} ;;
    --stages=*) STAGES=${arg#*=} ;;
    --out=*) OUT=${arg#*=} ;;
    *) echo "error: unknown option '$arg'; valid: --profile=cpu|gpu --stages=a,b,... --out=FOLDER"; exit 2 ;;
  esac
done
OUT=${OUT:-out/speedrun_$PROFILE}
export PYTHONUNBUFFERED=1

# --- the two profiles: every stage's settings ----------------------------------------------------
# (any script's --key=value; see the top of each script for what they mean)
case $PROFILE in
  cpu)
    PREPARE="--max_books=12 --val_books=2 --max_stories=400 --tokenizer=bpe --vocab_size=4096
             --n_prompts_val=32 --n_sft_val=64 --n_prompts_train=64 --n_sft_train=4000"
    SYSTEM="--device=cpu --compile=False"
    MODEL="config/tinystories_cpu.py --block_size=256 --batch_size=8 --max_iters=200 --eval_interval=200 --eval_iters=5"
    SFT="--max_iters=80 --eval_interval=80 --batch_size=8 --learning_rate=1e-3 --min_lr=1e-4 --warmup_iters=10
         --eval_prompts=16 --max_new_tokens=160 --eval_iters=4"
    PREFS="--n_prompts=48 --samples_per_prompt=4 --max_new_tokens=160 --val_fraction=0.25"
    REWARD="--max_iters=50 --eval_interval=50 --batch_size=8 --learning_rate=3e-4 --min_lr=3e-5 --warmup_iters=10 --n_fresh=16
            --max_new_tokens=160"
    DPO="--max_iters=40 --eval_interval=40 --batch_size=4 --learning_rate=2e-5 --min_lr=2e-6 --warmup_iters=5
         --eval_prompts=16 --max_new_tokens=160"
    DPO_SEEDS="1"
    PPO="--max_iters=4 --eval_interval=2 --rollout_prompts=16 --minibatch_size=8 --ppo_epochs=2 --max_new_tokens=120
         --learning_rate=1e-4 --min_lr=1e-5 --eval_prompts=16"
    GRPO="--max_iters=4 --eval_interval=2 --rollout_prompts=4 --group_size=4 --minibatch_size=8 --max_new_tokens=120
          --learning_rate=1e-4 --min_lr=1e-5 --eval_prompts=16"
    STUDENT="--n_layer=2 --n_head=2 --n_embd=48 --pos_emb=rope --norm=rmsnorm --mlp=swiglu --bias=False
             --intermediate_size=128 --block_size=256 --batch_size=8 --learning_rate=3e-3 --min_lr=3e-4 --warmup_iters=20
             --max_iters=120 --eval_interval=120 --eval_iters=5"
    DISTILL="--temperature=2.0 --alpha=0.5"
    EVAL="--eval_iters=5 --n_prompts=16 --max_new_tokens=160 --sample_tokens=60" ;;
  gpu)
    PREPARE="--n_prompts_val=256 --n_prompts_train=2000"
    SYSTEM=""
    MODEL="config/tinystories_moe.py --optimizer=muonclip --max_iters=1500 --eval_interval=500 --eval_iters=20
           --batch_size=64 --block_size=512 --learning_rate=3e-3 --min_lr=3e-4 --warmup_iters=100 --cuda_graph_train=False"
    SFT="--max_iters=600 --eval_interval=200 --batch_size=32 --block_size=512 --learning_rate=1e-4 --min_lr=1e-5
         --warmup_iters=30 --eval_prompts=128 --max_new_tokens=320"
    PREFS="--n_prompts=1000 --samples_per_prompt=4 --max_new_tokens=320"
    REWARD="--max_iters=400 --eval_interval=200 --batch_size=32 --learning_rate=3e-5 --min_lr=3e-6 --n_fresh=128
            --max_new_tokens=320"
    DPO="--max_iters=300 --eval_interval=150 --batch_size=16 --learning_rate=5e-6 --min_lr=5e-7 --eval_prompts=128
         --max_new_tokens=320"
    DPO_SEEDS="1 2 3"
    PPO="--max_iters=30 --eval_interval=10 --rollout_prompts=128 --minibatch_size=32 --ppo_epochs=1 --max_new_tokens=320
         --kl_beta=0.02 --learning_rate=2e-5 --min_lr=2e-6 --eval_prompts=128"
    GRPO="--max_iters=30 --eval_interval=10 --rollout_prompts=32 --group_size=8 --minibatch_size=32 --max_new_tokens=320
          --learning_rate=2e-5 --min_lr=2e-6 --eval_prompts=128"
    STUDENT="--n_layer=4 --n_head=4 --n_embd=192 --pos_emb=rope --norm=rmsnorm --mlp=swiglu --bias=False
             --intermediate_size=512 --block_size=512 --batch_size=64 --learning_rate=3e-3 --min_lr=3e-4 --warmup_iters=100
             --max_iters=1500 --eval_interval=500 --eval_iters=20"
    DISTILL="--temperature=2.0 --alpha=0.5 --top_k_logits=64"
    EVAL="--eval_iters=50 --n_prompts=256 --max_new_tokens=320" ;;
  *) echo "error: --profile=$PROFILE; valid: cpu, gpu"; exit 2 ;;
esac

DATA=$OUT/data TASK=$OUT/task PREFS_DIR=$OUT/prefs
mkdir -p $OUT/logs
stage_wanted() { [[ ",$STAGES," == *",$1,"* ]]; }
# run NAME DONE_FILE COMMAND...: the command, its output in logs/NAME.log and its wall time in
# times.tsv; skipped when DONE_FILE exists (its stage finished before)
run() {
  local name=$1 done=$2; shift 2
  if [ -e "$done" ]; then echo "$name: done before ($done)"; return; fi
  echo "$name: $*"
  local t0=$SECONDS
  if ! "$@" > $OUT/logs/$name.log 2>&1; then
    echo "error: stage $name failed; the end of $OUT/logs/$name.log:"; tail -25 $OUT/logs/$name.log; exit 1
  fi
  printf '%s\t%s\n' "$name" $((SECONDS - t0)) >> $OUT/times.tsv
  echo "$name: $((SECONDS - t0)) s"
}

for stage in ${STAGES//,/ }; do
  case $stage in
    prepare) run prepare $DATA/meta.json python prepare/stories.py --out_dir=$DATA --task_dir=$TASK $PREPARE ;;
    train)   run train $OUT/base/ckpt.pt python train.py $MODEL --data_dir=$DATA --out_dir=$OUT/base $SYSTEM ;;
    sft)     run sft $OUT/sft/ckpt.pt python sft.py --init_from=$OUT/base --out_dir=$OUT/sft --task_dir=$TASK $SFT $SYSTEM ;;
    prefs)   run prefs $PREFS_DIR/prefs_val.jsonl python prepare/preferences.py --init_from=$OUT/sft --task_dir=$TASK \
               --out_dir=$PREFS_DIR $PREFS ${SYSTEM/--compile=False/} ;;
    reward)  run reward $OUT/reward/ckpt.pt python reward.py --init_from=$OUT/sft --out_dir=$OUT/reward \
               --prefs_dir=$PREFS_DIR --task_dir=$TASK $REWARD $SYSTEM ;;
    dpo)     for s in $DPO_SEEDS; do
               run dpo_seed$s $OUT/dpo_seed$s/ckpt.pt python dpo.py --init_from=$OUT/sft --out_dir=$OUT/dpo_seed$s \
                 --prefs_dir=$PREFS_DIR --task_dir=$TASK --seed=$s $DPO $SYSTEM
             done ;;
    ppo)     run ppo $OUT/ppo/ckpt.pt python ppo.py --init_from=$OUT/sft --out_dir=$OUT/ppo --task_dir=$TASK --reward=rule \
               $PPO $SYSTEM ;;
    grpo)    run grpo $OUT/grpo/ckpt.pt python grpo.py --init_from=$OUT/sft --out_dir=$OUT/grpo --task_dir=$TASK \
               --reward=rule $GRPO $SYSTEM ;;
    distill) # the same student twice, at equal steps: trained from scratch, and distilled from the base model
             run student_scratch $OUT/student_scratch/ckpt.pt python train.py $STUDENT --data_dir=$DATA \
               --out_dir=$OUT/student_scratch $SYSTEM
             run student_distill $OUT/student_distill/ckpt.pt python distill.py --teacher=$OUT/base \
               --out_dir=$OUT/student_distill --data_dir=$DATA $STUDENT $DISTILL $SYSTEM ;;
    eval)    for run_dir in base sft reward $(for s in $DPO_SEEDS; do echo dpo_seed$s; done) ppo grpo student_scratch student_distill; do
               [ "$run_dir" = reward ] && continue                 # a scalar model: its numbers are in its log
               ref=''; case $run_dir in dpo*|ppo|grpo) ref=--reference=$OUT/sft ;; esac   # KL to SFT
               run eval_$run_dir $OUT/$run_dir/eval.json python eval.py --out_dir=$OUT/$run_dir --task_dir=$TASK \
                 $ref $EVAL ${SYSTEM/--compile=False/}
             done ;;
    report)  python report.py --out=$OUT --profile=$PROFILE ;;
    *) echo "error: unknown stage '$stage'; valid: ${STAGES//,/, }"; exit 2 ;;
  esac
done
