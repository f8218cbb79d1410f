#!/usr/bin/env bash
# The whole life cycle on real stories, from raw text to a report card, in one command:
#   prepare   Gutenberg children's books + TinyStories + fairy tales -> token files (held-out
#             whole books, and the real TinyStories validation stories), and the instruction task
#             ("write a story that uses the words ...") built from the same passages
#   train     the base model (MLA + DeepSeekMoE with auxiliary-loss-free balancing, one MTP module)
#   sft       supervised fine-tuning on the task       prefs   preference pairs sampled from SFT
#   reward    the reward model                          dpo     DPO from SFT (DPO_SEEDS seeds)
#   ppo       PPO from SFT, rewarded by the task rule   grpo    GRPO from SFT, likewise
#   distill   a small dense student of the base model, and the same student trained from scratch
#             (stages student_distill and student_scratch: one of the two)
#   student_embed  (only when named) the scratch student started from the teacher's embeddings, as
#             the distilled one starts: it separates what distillation adds from what that start does
#   eval      every checkpoint on the held-out data and prompts (eval.py -> eval.json; the runs that
#             answer prompts also greedy with a frequency penalty -> eval_fp<penalty>_pp0.json)
#   report    report.md + report.json + plots (report.py)
# Each stage reads the previous stage's checkpoint (init_from=) and writes its own folder under
# OUT; a stage that finished (its output there, its line in times.tsv) is skipped, so a stopped run
# continues with the stage it stopped in (that stage starts over).
#
# $ bash speedrun.sh --profile=cpu      # a smoke test: every stage, tiny, 5-10 minutes on 2 CPU cores
# $ bash speedrun.sh --profile=gpu      # one GPU (H200): the real run (its target: under 25 minutes)
# $ bash speedrun.sh --profile=gpu --stages=prepare,train      # some stages only (in this order)
# Options: --profile=cpu|gpu, --out=FOLDER (default out/speedrun_<profile>), --stages=a,b,...,
# --parallel=0|1 (stages that do not need each other's output side by side; the gpu profile's default),
# --dry_run (print each stage's command, with this profile's settings, and run nothing: copy one to
# run that stage alone, or to change it)
# A stage's settings can be changed from the environment: <NAME>_EXTRA is appended to the settings
# NAME (PREPARE, MODEL, SFT, PREFS, REWARD, DPO, PPO, GRPO, STUDENT, DISTILL, EVAL; in this script's
# profiles below; the last value of a key wins), EVAL_RUNS names the runs eval evaluates, and
# FREQUENCY_PENALTY the penalty of their second, penalized greedy answers (0: none), and
# PROGRESS_EVERY how often (seconds, default 30; 0: never) a running stage's latest progress line
# from its log is printed; a stage that runs out of GPU memory (stages side by side share the GPU)
# starts again after OOM_WAIT seconds (default 60, plus up to half of it at random), up to
# OOM_RETRIES times (default 3; 0: never):
# $ SFT_EXTRA="--learning_rate=3e-4" MODEL_EXTRA="--max_iters=3000" bash speedrun.sh --profile=gpu
# Ctrl-C stops the stages it started too (a training stage saves a checkpoint first; a kill stops them
# at once). A stage that finished before is skipped, whatever the settings now (so the same command
# continues a stopped run): to run it again, delete its folder under OUT (and its line in
# OUT/times.tsv) or give another --out=
# The data comes from $SHARED_DATA (default ../shared/data beside the checkout; see prepare/stories.py).
set -euo pipefail
PROFILE=cpu
STAGES=prepare,train,sft,prefs,reward,dpo,ppo,grpo,distill,eval,report
OUT=''
PARALLEL=''
DRY_RUN=0
for arg in "$@"; do
  case $arg in
    --profile=*) PROFILE=${arg#*=} ;;
    --stages=*) STAGES=${arg#*=} ;;
    --out=*) OUT=${arg#*=} ;;
    --parallel=0|--parallel=1) PARALLEL=${arg#*=} ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;   # the header above
    *) echo "error: unknown option '$arg'; valid: --profile=cpu|gpu --stages=a,b,... --out=FOLDER --parallel=0|1 --dry_run"; exit 2 ;;
  esac
done
OUT=${OUT:-out/speedrun_$PROFILE}
[[ $OUT == *[[:space:]]* ]] && { echo "error: --out='$OUT' holds a space; give a folder whose path has none"; exit 2; }
export PYTHONUNBUFFERED=1
PROGRESS_EVERY=${PROGRESS_EVERY:-30}
OOM_RETRIES=${OOM_RETRIES:-3} OOM_WAIT=${OOM_WAIT:-60}
for v in PROGRESS_EVERY OOM_RETRIES OOM_WAIT; do
  [[ ${!v} =~ ^(0|[1-9][0-9]*)$ ]] || { echo "error: $v='${!v}' is not a whole number"; exit 2; }
done
# torch 2.11's inductor once asserted in its coalescing analysis (tiling_utils.get_pw_red_splits) while
# compiling SFT's training step on the H200 (notes/lifecycle.md); that analysis only picks tilings
export TORCHINDUCTOR_COALESCE_TILING_ANALYSIS=${TORCHINDUCTOR_COALESCE_TILING_ANALYSIS:-0}
# and should a compiler still fail, the graph it could not build runs eagerly (torch logs a warning)
# instead of ending a 25-minute run
export TORCHDYNAMO_SUPPRESS_ERRORS=${TORCHDYNAMO_SUPPRESS_ERRORS:-1}
# several stages share the one GPU's memory (--parallel=1): each process's allocator maps memory into
# segments that grow instead of many fixed-size ones, so less of it sits reserved but unusable
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

# --- the two profiles: every stage's settings ----------------------------------------------------
# (any script's --key=value; see the top of each script for what they mean)
# The task, in both profiles: answers are passages cut at sentence ends into pieces of at most 120
# words; the required words come from their first two sentences and are listed in the order the
# answer uses them (a copy the model meets early, word after word, whose share of the answer's
# loss is not drowned by 100 words of prose); some SFT examples also join the pretraining data
# (task_in_train), so the base model has seen instructions followed by stories. SFT examples may
# ask for any word of their passage, not only the common story words the prompts use
# (sft_list_words_only=False): 299k examples instead of 76k, so that SFT copies words from many
# distinct passages instead of memorising a few over three epochs
TASK_DATA="--task_cut=True --task_words_min=30 --task_words_max=120 --words_from_sentences=2 --words_in_order=True
           --sft_list_words_only=False"
case $PROFILE in
  cpu)
    PREPARE="--max_books=12 --val_books=2 --max_stories=400 --tokenizer=bpe --vocab_size=4096
             --n_prompts_val=32 --n_sft_val=64 --n_prompts_train=64 --n_sft_train=4000 --task_in_train=500 $TASK_DATA"
    SYSTEM="--device=cpu --compile=False"
    MODEL="config/tinystories_cpu.py --mtp_depth=1 --block_size=256 --batch_size=8 --max_iters=200 --eval_interval=200 --eval_iters=5"
    SFT="--max_iters=80 --eval_interval=80 --batch_size=8 --learning_rate=1e-3 --min_lr=1e-4 --warmup_iters=10
         --eval_prompts=16 --max_new_tokens=160 --eval_iters=4 --word_loss_weight=20"
    PREFS="--n_prompts=48 --samples_per_prompt=4 --max_new_tokens=160 --val_fraction=0.25 --swap_pairs=1"
    REWARD="--max_iters=50 --eval_interval=50 --batch_size=8 --learning_rate=3e-4 --min_lr=3e-5 --warmup_iters=10 --n_fresh=16
            --max_new_tokens=160 --score_reread=True --word_check_weight=1.0"
    DPO="--max_iters=40 --eval_interval=40 --batch_size=4 --learning_rate=2e-5 --min_lr=2e-6 --warmup_iters=5
         --eval_prompts=16 --max_new_tokens=160"
    DPO_SEEDS="1"
    PPO="--max_iters=4 --eval_interval=2 --rollout_prompts=16 --minibatch_size=8 --ppo_epochs=2 --max_new_tokens=120
         --learning_rate=1e-4 --min_lr=1e-5 --eval_prompts=16"
    GRPO="--max_iters=4 --eval_interval=2 --rollout_prompts=4 --group_size=4 --minibatch_size=8 --max_new_tokens=120
          --learning_rate=1e-4 --min_lr=1e-5 --eval_prompts=16"
    STUDENT="--n_layer=2 --n_head=2 --n_embd=48 --pos_emb=rope --norm=rmsnorm --mlp=swiglu --bias=False
             --tie_word_embeddings=False --intermediate_size=128 --block_size=256 --batch_size=8 --learning_rate=3e-3 --min_lr=3e-4 --warmup_iters=20
             --max_iters=120 --eval_interval=120 --eval_iters=5"
    DISTILL="--temperature=1.0 --alpha=0.9 --init_embedding=teacher"
    EVAL="--eval_iters=5 --n_prompts=16 --max_new_tokens=160 --sample_tokens=60"
    PARALLEL=${PARALLEL:-0} ;;
  gpu)
    PREPARE="--n_prompts_val=256 --n_prompts_train=8000 --n_sft_train=0 --task_in_train=20000 $TASK_DATA"
    SYSTEM=""
    MODEL="config/tinystories_moe.py --mtp_depth=1 --optimizer=muonclip --max_iters=1500 --eval_interval=500 --eval_iters=20
           --batch_size=64 --block_size=512 --learning_rate=3e-3 --min_lr=3e-4 --warmup_iters=100 --cuda_graph_train=False"
    # the tokens where an answer first uses a required word weigh 20x in SFT's loss (word_loss_weight):
    # on the H100 all required words went from 23.8% of held-out answers to 71.1% at 5x (one seed;
    # 20-23% on four cards before), at the same val bits/byte, from 71.5% at 5x to 87.5% at 10x (the
    # next card, same base model: +16.0 +- 3.1 points paired), and from 82.8% at 10x to 91.0% at 20x
    # (the card after, same base model: +8.2 +- 2.5 points; task score -0.030 +- 0.023; docs/results.md)
    SFT="--max_iters=2000 --eval_interval=500 --batch_size=32 --block_size=512 --learning_rate=1e-3 --min_lr=1e-4
         --warmup_iters=50 --eval_prompts=128 --max_new_tokens=200 --word_loss_weight=20"
    # with each training prompt's best answer also in a swapped-word minimal pair, both ways
    # (prepare/preferences.py swap_pairs): pairs only the prompt's words decide, for the reward model
    # (and DPO) to learn to look at them
    # 6,000 training prompts' samples (about 20,600 training pairs): the reward model at twice the
    # pairs and steps reached 88.2% and 87.0% of held-out pairs on two cards, at 3,000 prompts 84.1%
    PREFS="--n_prompts=6000 --samples_per_prompt=4 --all_pairs=True --max_new_tokens=200 --swap_pairs=1"
    # the reward model, DPO, PPO and GRPO run eagerly: compiling was most of their time on the H200
    # (their first 10 steps took 178 s / 170 s for reward / DPO, a step after them 67 / 86 ms; PPO's
    # first rollout 266 s, later ones 2 s; GRPO's 152 s, later 3.7 s; several processes compiled at once)
    # the reward model reads a prompt's pairs together (8 prompts a step; 1,000 steps read 8,000 of the
    # about 10,200 training prompts, half of them the swapped prompts, each once): shuffled pairs, in
    # which each answer is in up to three, reached 75-81% on training batches and 54% on held-out
    # pairs. Its learning rate is 10x
    # the last run's 3e-5, at which the pairs that differ in words stayed near chance (57%): on the CPU,
    # pairs whose label only the prompt decides (experiments/reward_prompt_pairs.py) stayed at chance
    # at 3e-5 and 1e-4 (49.5%, 51.0%) and reached 65.5% at 3e-4 in 300 steps; on the GPU 3e-4 gained
    # nothing at equal steps (57.6% at step 300, 61.4% at 400: docs/results.md). Its score is read at
    # the last token: adding the mean over every token (--score_pooling=last+mean) was inside the seed
    # noise on the CPU's prompt-decided pairs (experiments/reward_prompt_pairs.py: 3 seeds, 1,500 steps).
    # It reads the prompt again after the answer (--score_reread, rl.reward_input): on those pairs
    # ahead on each of 3 seeds, 88.0% against 75.5% held-out at step 600, 92.5% against 85.7% at 1,500
    # And its head also learns, at each required word of the reread prompt, whether the answer uses
    # the word (--word_check_weight): three labels an answer where a pair gives one per two answers.
    # Paired over the same held-out pairs it gained +2.4 +- 1.4 points at 500 steps on 3,000 prompts'
    # pairs and +3.2 +- 0.9 at 1,000 steps on 6,000 prompts' (87.0% -> 90.3%; docs/results.md)
    REWARD="--compile=False --max_iters=1000 --eval_interval=100 --batch_by=prompt --batch_size=8 --learning_rate=3e-4
            --min_lr=3e-5 --n_fresh=128 --max_new_tokens=200 --score_reread=True --word_check_weight=1.0"
    # with RPO's NLL term on the chosen answers at weight 1: on docs/results.md's eleventh run DPO
    # alone scored +0.027 above SFT (seed spread 0.024) and with the term +0.041 +- 0.020 (spread 0.020)
    DPO="--compile=False --max_iters=200 --eval_interval=100 --batch_size=16 --learning_rate=5e-6 --min_lr=5e-7
         --eval_prompts=128 --max_new_tokens=200 --sft_weight=1.0"
    DPO_SEEDS="1 2 3"
    # PPO's value model learns at 10x the policy's rate: at the policy's 2e-5 its values explained
    # none of the returns' variance in 20 rollouts (explained variance 0.00 throughout). From the
    # last run's logs (an audit of the RL path found no bug in it): (1) rollouts sampled at T = 1
    # almost never loop, but greedy answers do (23% of SFT's), and the repetition penalty took the
    # greedy score from 0.743 to 0.566, so RL saw no signal against loops: rollouts now sample at
    # 0.7; (2) with lam 0.95 and a critic that explains little, the credit of a 115-token answer's
    # first token was about 1/90 of its last token's (the audit's synthetic rollout): lam 1;
    # (3) clip fraction 1-2% (as counted then: every ratio outside the region, also where the clip
    # leaves the gradient), approx KL 0.001, GRPO's training reward still rising at rollout 20:
    # 2x the learning rate and 30 rollouts
    PPO="--compile=False --max_iters=30 --eval_interval=10 --rollout_prompts=128 --minibatch_size=32 --ppo_epochs=1
         --max_new_tokens=200 --kl_beta=0.02 --learning_rate=4e-5 --min_lr=4e-6 --value_learning_rate=2e-4
         --temperature=0.7 --lam=1.0 --eval_prompts=128"
    GRPO="--compile=False --max_iters=30 --eval_interval=10 --rollout_prompts=32 --group_size=8 --minibatch_size=32
          --max_new_tokens=200 --learning_rate=4e-5 --min_lr=4e-6 --temperature=0.7 --eval_prompts=128"
    # the students are untied, as the teacher is: the distilled one then starts with the teacher's
    # token table and its head each in a table of its own (distill.py's init_embedding); tied, one
    # table had to serve as both (on the cpu profile, untying took the share of the gap closed from
    # 53% / 52% to 88% / 84%, two seeds). An untied input table is a lookup, not counted as active,
    # so the students stay at 23.1% of the teacher's active parameters. Deep and narrow: the output
    # layer over the 50k tokens costs 50k x n_embd, so 10 layers of 160 (11.2M active, 3.2M of them
    # in the layers) closed 51.6% of the gap on the H100 where 4 layers of 192 (11.4M active, 1.8M in
    # the layers) closed 43.5% and 43.9% (docs/results.md)
    STUDENT="--n_layer=10 --n_head=5 --n_embd=160 --pos_emb=rope --norm=rmsnorm --mlp=swiglu --bias=False
             --tie_word_embeddings=False --intermediate_size=448 --block_size=512 --batch_size=64 --learning_rate=3e-3 --min_lr=3e-4 --warmup_iters=100
             --max_iters=1500 --eval_interval=500 --eval_iters=20"
    DISTILL="--temperature=1.0 --alpha=0.9 --init_embedding=teacher"
    EVAL="--eval_iters=30 --n_prompts=256 --max_new_tokens=200"
    PARALLEL=${PARALLEL:-1} ;;
  *) echo "error: --profile=$PROFILE; valid: cpu, gpu"; exit 2 ;;
esac

# The runs that answer prompts are also evaluated greedy with OpenAI's frequency penalty (eval.py,
# eval_fp<penalty>_pp0.json; the card's table beside the greedy one): their greedy answers loop, and
# on the H100 a penalty of 0.5 took the task score from 0.672 to 0.972 (SFT), 0.704 to 0.993 (GRPO).
# FREQUENCY_PENALTY=0 leaves this evaluation out
# (written as eval.py names its file: 0.50 -> 0.5; not a number: an error)
penalty=$(python -c 'import sys; print(f"{float(sys.argv[1]):g}")' "${FREQUENCY_PENALTY:=0.5}" 2> /dev/null) \
  || { echo "error: FREQUENCY_PENALTY='$FREQUENCY_PENALTY' is not a number"; exit 2; }
FREQUENCY_PENALTY=$penalty
PENALIZED="--frequency_penalty=$FREQUENCY_PENALTY --eval_iters=0 --sampled_score=False --n_samples=0"
for name in PREPARE MODEL SFT PREFS REWARD DPO PPO GRPO STUDENT DISTILL EVAL; do   # the <NAME>_EXTRA settings
  extra=${name}_EXTRA
  declare "$name=${!name} ${!extra:-}"
done

DATA=$OUT/data TASK=$OUT/task PREFS_DIR=$OUT/prefs
[ $DRY_RUN = 1 ] && PARALLEL=0     # one stage after the other, in order: each command printed once
[ $DRY_RUN = 1 ] && echo "export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COALESCE_TILING_ANALYSIS=$TORCHINDUCTOR_COALESCE_TILING_ANALYSIS \
TORCHDYNAMO_SUPPRESS_ERRORS=$TORCHDYNAMO_SUPPRESS_ERRORS PYTORCH_CUDA_ALLOC_CONF=$PYTORCH_CUDA_ALLOC_CONF     # the environment the stages run in"
[ $DRY_RUN = 1 ] || mkdir -p $OUT/logs
stage_wanted() { [[ ",$STAGES," == *",$1,"* ]]; }
T_START=$SECONDS
# this run's wall time, once, into wall.tsv (report.py adds the lines of a run stopped and started
# again): by the report stage, or when the script exits, also on an error or Ctrl-C
wall_line() {
  [ -e $OUT/logs/wall.$$ ] || printf 'wall\t%s\n' $((SECONDS - T_START)) >> $OUT/wall.tsv
  touch $OUT/logs/wall.$$
}
[ $DRY_RUN = 1 ] || trap 'wall_line; rm -f $OUT/logs/wall.$$' EXIT
# Ctrl-C or a kill stops the stages this script started too. Each stage runs as a job of its own
# (job control on: set -m), so that Ctrl-C reaches this shell alone (a script's background commands
# would ignore it) and the shell hands it on to every process under it: a training stage finishes
# its step, saves a checkpoint and stops (training.Run), the rest stop at once. A kill (SIGTERM),
# a hangup (the terminal closed) or Ctrl-\ reaches this shell alone too, and stops them all at
# once. (SIGKILL cannot be handed on: the stages, in their own process groups, go on; so does
# Ctrl-Z stop this shell alone.) The processes under it: one snapshot of the process table (ps -A:
# Linux and macOS), and the jobs' process groups (all there is to signal where ps is missing).
[ $DRY_RUN = 1 ] || set -m
descendants() {
  ps -A -o pid= -o ppid= 2> /dev/null | awk -v top=$$ '{ parent[$1] = $2 }
    END { for (p in parent) for (q = parent[p]; q > 0; q = parent[q]) if (q == top) { print p; break } }' || true
  jobs -p | sed 's/^/-/'                # (a job's pid is its process group's id)
}
alive() { ps -o stat= -p ${1#-} 2> /dev/null | grep -qv Z; }  # (an exited process not yet reaped is not)
say() { { echo "$@"; } 2> /dev/null || true; }     # (the terminal or a pipe may be gone: not a reason to stop)
stopping=''       # the processes a first Ctrl-C asked to stop (some may have left this shell's tree since)
interrupted() {   # interrupted HOW EXIT_CODE; HOW: Ctrl-C (each stage stops as it does), or at once
  trap '' PIPE      # (Ctrl-C also ends a `| tee` this script writes to)
  set +m            # (no job notices: each stage says how it ended in its log)
  local pids p; pids="$(descendants) $stopping"
  if [ "$1" = Ctrl-C ] && [ -n "${pids// /}" ]; then
    trap 'interrupted "a second Ctrl-C" 130' INT
    kill -INT -- $pids 2> /dev/null || true     # (some have ended since the snapshot)
    stopping=$(for p in $pids; do ! alive $p || echo $p; done)
    say "speedrun: Ctrl-C: stopping its stages (a training stage saves a checkpoint first; Ctrl-C again" \
        "stops them at once)"
    for p in $stopping; do while alive $p; do sleep 0.2; done; done
  else
    trap - INT TERM HUP QUIT
    [ -z "${pids// /}" ] || kill -TERM -- $pids 2> /dev/null || true
  fi
  say "speedrun: stopped by $1, and with it the stages it had started; run the same command again to go on" \
      "(finished stages are skipped)"
  exit $2
}
[ $DRY_RUN = 1 ] || { trap 'interrupted Ctrl-C 130' INT; trap 'interrupted SIGTERM 143' TERM
                      trap 'interrupted SIGHUP 129' HUP; trap 'interrupted SIGQUIT 131' QUIT; }
# run NAME DONE_FILE COMMAND...: the command, its output in logs/NAME.log and its wall time in
# times.tsv; skipped when it finished before: DONE_FILE exists, times.tsv has its line and its last
# start is not still marked (logs/NAME.running: a stage stopped midway, or failed, leaves a
# checkpoint and that mark, so it runs again, also where an earlier run of it had finished)
run() {
  local name=$1 done=$2; shift 2
  if [ $DRY_RUN = 1 ]; then echo "$name: $*"; return; fi
  if [ -e "$done" ] && grep -qs "^$name	" $OUT/times.tsv && [ ! -e $OUT/logs/$name.running ]; then
    echo "$name: done before ($done), skipped; to run it again with the settings now, delete that folder or use --out="
    return
  fi
  [ -e "$done" ] && echo "$name: $done is there but the stage did not finish: it runs again"
  touch $OUT/logs/$name.running
  echo "$name: $*   (log: $OUT/logs/$name.log)"
  local t0=$SECONDS rc=0 ticker='' tries=0 pause
  if [ "$PROGRESS_EVERY" != 0 ]; then progress $name $OUT/logs/$name.log & ticker=$!; fi
  while :; do
    rc=0
    # in this shell as a job (set -m above), so that a kill is not put off until the stage ends; in a
    # phase's subshell in the foreground (a subshell's background commands would ignore Ctrl-C)
    # (stdin /dev/null: a job reading the terminal would be stopped, and wait would return)
    if [ $BASH_SUBSHELL = 0 ]; then "$@" < /dev/null > $OUT/logs/$name.log 2>&1 & wait $! || rc=$?
    else "$@" < /dev/null > $OUT/logs/$name.log 2>&1 || rc=$?; fi
    # out of GPU memory: the stages side by side share one GPU, and on a smaller card than the
    # profile was sized for (an 80 GB H100 beside the H200's 141 GB) the others can hold what this
    # one needs. It starts again once they may have let go: after OOM_WAIT seconds plus up to half
    # of that at random (stages that failed together do not start again together), OOM_RETRIES times
    # (torch's allocator says 'CUDA out of memory'; CUDA itself 'CUDA error: out of memory', cuBLAS ALLOC_FAILED)
    [ $rc != 0 ] && [ $tries -lt $OOM_RETRIES ] \
      && grep -qsE 'CUDA out of memory|CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED' \
         $OUT/logs/$name.log || break
    tries=$((tries + 1)); pause=$((OOM_WAIT + RANDOM % (OOM_WAIT / 2 + 1)))
    mv $OUT/logs/$name.log $OUT/logs/$name.oom$tries.log
    echo "$name: out of GPU memory (logs/$name.oom$tries.log); starting it again in $pause s" \
         "(retry $tries of $OOM_RETRIES)"
    sleep $pause & wait $! || true       # (a wait, so that Ctrl-C or a kill is not put off until the sleep ends)
  done
  [ -z "$ticker" ] || { kill $ticker 2> /dev/null; wait $ticker 2> /dev/null; } || true
  if [ $rc != 0 ]; then
    echo "error: stage $name failed; the end of $OUT/logs/$name.log:"; tail -25 $OUT/logs/$name.log; return 1
  fi
  printf '%s\t%s\n' "$name" $((SECONDS - t0)) >> $OUT/times.tsv     # (report.py reads a stage's last line)
  rm -f $OUT/logs/$name.running
  echo "$name: $((SECONDS - t0)) s"
}
# progress NAME LOG: every PROGRESS_EVERY seconds, the stage's latest progress line from its log
# (its progress bar or last message), when it changed; until killed, or this script is gone (a
# SIGKILL reaches it alone); seconds of sleep 1, so that no sleep outlives it for long
progress() {
  local n=0 line last=''
  while sleep 1 && kill -0 $$ 2> /dev/null; do
    n=$((n + 1)); [ $((n % PROGRESS_EVERY)) = 0 ] || continue
    line=$(tail -c 4000 "$2" 2> /dev/null | tr '\r' '\n' | grep -v '^[[:space:]]*$' | tail -1 | cut -c1-160) || true
    [ -n "$line" ] && [ "$line" != "$last" ] && say "  $1 (${n} s): $line"
    last=$line
  done
}
# together CMD...: each CMD (a quoted command line) at once in the background; fails if any failed
together() {
  local pids=() failed=0
  for cmd in "$@"; do eval "$cmd" & pids+=($!); done
  for pid in "${pids[@]}"; do wait $pid || failed=1; done
  return $failed
}

student_scratch() {   # the distillation's student trained from scratch, at the distilled one's steps
  run student_scratch $OUT/student_scratch/ckpt.pt python train.py $STUDENT --data_dir=$DATA \
    --out_dir=$OUT/student_scratch $SYSTEM
}
student_distill() {   # the same student distilled from the base model
  run student_distill $OUT/student_distill/ckpt.pt python distill.py --teacher=$OUT/base \
    --out_dir=$OUT/student_distill --data_dir=$DATA $STUDENT $DISTILL $SYSTEM
}
student_embed() {     # the scratch student (no KL: alpha 0) from the teacher's embeddings, as distilled starts
  run student_embed $OUT/student_embed/ckpt.pt python distill.py --teacher=$OUT/base \
    --out_dir=$OUT/student_embed --data_dir=$DATA $STUDENT $DISTILL --alpha=0 $SYSTEM
}
dpo_seed() {
  run dpo_seed$1 $OUT/dpo_seed$1/ckpt.pt python dpo.py --init_from=$OUT/sft --out_dir=$OUT/dpo_seed$1 \
    --prefs_dir=$PREFS_DIR --task_dir=$TASK --seed=$1 $DPO $SYSTEM
}
eval_run() {          # eval.py on one run folder; KL to the SFT model for the runs trained from it;
  local ref=''; case $1 in dpo*|ppo|grpo) ref=--reference=$OUT/sft ;; esac     # then, for the runs
  # (an evaluation older than its checkpoint, trained again since, is evaluated again)
  [ $DRY_RUN = 1 ] || [ ! $OUT/$1/ckpt.pt -nt $OUT/$1/eval.json ] || rm -f $OUT/$1/eval.json $OUT/$1/eval_fp*_pp0.json
  run eval_$1 $OUT/$1/eval.json python eval.py --out_dir=$OUT/$1 --task_dir=$TASK $ref $EVAL ${SYSTEM/--compile=False/} \
    || return 1                                                                # that answer prompts,
  [ "$FREQUENCY_PENALTY" = 0 ] && return 0                                    # the penalized answers
  case $1 in sft|dpo*|ppo|grpo)
    run eval_penalized_$1 $OUT/$1/eval_fp${FREQUENCY_PENALTY}_pp0.json python eval.py --out_dir=$OUT/$1 \
      --task_dir=$TASK $EVAL $PENALIZED ${SYSTEM/--compile=False/} ;;
  esac
}
EVAL_RUNS=${EVAL_RUNS:-"base sft $(for s in $DPO_SEEDS; do echo dpo_seed$s; done) ppo grpo student_scratch student_distill
  $(stage_wanted student_embed && echo student_embed || true)"}

stage() {
  case $1 in
    prepare) run prepare $DATA/meta.json python prepare/stories.py --out_dir=$DATA --task_dir=$TASK $PREPARE ;;
    train)   run train $OUT/base/ckpt.pt python train.py $MODEL --data_dir=$DATA --out_dir=$OUT/base $SYSTEM ;;
    sft)     run sft $OUT/sft/ckpt.pt python sft.py --init_from=$OUT/base --out_dir=$OUT/sft --task_dir=$TASK $SFT $SYSTEM ;;
    prefs)   run prefs $PREFS_DIR/prefs_val.jsonl python prepare/preferences.py --init_from=$OUT/sft --task_dir=$TASK \
               --out_dir=$PREFS_DIR $PREFS ${SYSTEM/--compile=False/} ;;
    reward)  run reward $OUT/reward/ckpt.pt python reward.py --init_from=$OUT/sft --out_dir=$OUT/reward \
               --prefs_dir=$PREFS_DIR --task_dir=$TASK $REWARD $SYSTEM ;;
    dpo)     local cmds=(); for s in $DPO_SEEDS; do cmds+=("dpo_seed $s"); done
             if [ $PARALLEL = 1 ]; then together "${cmds[@]}"
             else for c in "${cmds[@]}"; do $c || return 1; done; fi ;;
    ppo)     run ppo $OUT/ppo/ckpt.pt python ppo.py --init_from=$OUT/sft --out_dir=$OUT/ppo --task_dir=$TASK --reward=rule \
               $PPO $SYSTEM ;;
    grpo)    run grpo $OUT/grpo/ckpt.pt python grpo.py --init_from=$OUT/sft --out_dir=$OUT/grpo --task_dir=$TASK \
               --reward=rule $GRPO $SYSTEM ;;
    distill) student_scratch && student_distill ;;
    student_scratch|student_distill|student_embed) $1 ;;
    eval)    local cmds=(); for r in $EVAL_RUNS; do cmds+=("eval_run $r"); done
             if [ $PARALLEL = 1 ]; then together "${cmds[@]}"
             else for c in "${cmds[@]}"; do $c || return 1; done; fi ;;
    report)  if [ $DRY_RUN = 1 ]; then echo "report: python report.py --out=$OUT --profile=$PROFILE"; return; fi
             wall_line                   # this run's wall time so far, for the card
             python report.py --out=$OUT --profile=$PROFILE ;;
    *) echo "error: unknown stage '$1'; valid: $VALID_STAGES"
       return 2 ;;
  esac
}

VALID_STAGES="prepare, train, sft, prefs, reward, dpo, ppo, grpo, distill (student_scratch and student_distill,
  or one of them), student_embed, eval, report"
for s in ${STAGES//,/ }; do    # every name is checked before anything runs
  case $s in prepare|train|sft|prefs|reward|dpo|ppo|grpo|distill|student_scratch|student_distill|student_embed|eval|report) ;;
    *) echo "error: unknown stage '$s'; valid: $VALID_STAGES"; exit 2 ;;
  esac
done
if [ $PARALLEL = 1 ]; then
  # Stages that do not need each other's checkpoints run side by side on the one GPU (the small
  # models leave most of it idle); a phase starts when the one before it has finished:
  #   prepare | train + student_scratch | sft | prefs + ppo + grpo | reward + dpo (its seeds at once)
  #   | eval (the runs not yet evaluated) | report
  # The distilled student needs only the base model and nothing but eval needs it: it starts with
  # SFT and runs beside the phases after it (on the H100 the deep student's distillation took 808 s
  # as a side run beside other runs, SFT 357-434 s: in SFT's phase it would hold up all that follows);
  # the phase after it ends evaluates it, the eval phase waits for it. If it fails, the other runs
  # are still evaluated and the card written, and the run ends with an error.
  # Each phase also evaluates the runs the phase before it trained, beside its own stages, so that a
  # run cut short still has their rows on its card; the eval phase then takes the runs left.
  trained='' beside='' beside_failed=0
  joined() {  # the distilled student has finished (or, with `wait_for`, after waiting for it): its row
    [ -n "$beside" ] || return 0                       # is evaluated next, or it failed: say so
    [ "${1:-}" = wait_for ] || ! kill -0 $beside 2> /dev/null || return 0
    if wait $beside; then trained+=' student_distill'
    else
      beside_failed=1; EVAL_RUNS=${EVAL_RUNS/student_distill/}
      echo "error: student_distill (run beside the phases after SFT) failed: see $OUT/logs/student_distill.log"
    fi
    beside=''
  }
  stop() {    # a phase failed: the distilled student running beside it finishes first, then the run stops
    if [ -n "$beside" ] && kill -0 $beside 2> /dev/null; then
      echo "(student_distill runs beside the other stages: waiting for it to finish)"
    fi
    joined wait_for
    exit 1
  }
  for phase in prepare "train student_scratch" "sft student_distill student_embed" "prefs ppo grpo" "reward dpo" eval report; do
    if [ "$phase" = eval ]; then joined wait_for; else joined; fi
    cmds=()
    if [ "$phase" != eval ] && stage_wanted eval; then
      for r in $trained; do [[ " $(echo $EVAL_RUNS) " == *" $r "* ]] && cmds+=("eval_run $r"); done
    fi
    trained=''
    for s in $phase; do
      name=$s; case $s in student_scratch|student_distill) name=distill ;; esac
      stage_wanted $s || stage_wanted $name || continue
      if [ $s = student_distill ]; then stage $s & beside=$!; continue; fi
      cmds+=("stage $s")
      case $s in             # the runs (folders under OUT) the stage trains
        train) trained+=' base' ;;
        dpo) trained+=" $(for d in $DPO_SEEDS; do echo dpo_seed$d; done)" ;;
        prepare|prefs|reward|eval|report) ;;
        *) trained+=" $s" ;;
      esac
    done
    [ ${#cmds[@]} -gt 0 ] && { together "${cmds[@]}" || stop; }
  done
  [ $beside_failed = 0 ] || exit 1
else
  for s in ${STAGES//,/ }; do stage $s || exit 1; done
fi
[ $DRY_RUN = 1 ] && exit 0
if [ -e $OUT/report.md ]; then echo "speedrun: $((SECONDS - T_START)) s of wall time -> $OUT/report.md"
  # talk to what it made: the chat model with the best greedy task score on the card (a bare
  # serve.py would take the newest checkpoint, the distilled student, which continues text)
  best=$(python -c "import json, sys
s = json.load(open(sys.argv[1]))['stages']
c = [(v['task_score'], k) for k, v in s.items() if k in ('sft', 'ppo', 'grpo') or k.startswith('dpo_seed')
     if v.get('task_score') is not None]
print('%s %.3f' % max(c)[::-1] if c else '')" $OUT/report.json 2> /dev/null) || best=''   # (no card data: no line)
  # the page starts greedy with a frequency penalty of 0.5: how small models' answers read best (docs/results.md)
  if [ -n "$best" ]; then echo "talk to it: python serve.py --out_dir=$OUT/${best% *} --page_temperature=0" \
    "--page_frequency_penalty=0.5   (the chat model with the best task score on the card, ${best#* }; a chat page at" \
    "http://127.0.0.1:8000)"; fi
else echo "speedrun: $((SECONDS - T_START)) s of wall time; no report card yet (--stages=report writes $OUT/report.md)"; fi
