#!/usr/bin/env bash
# lm-evaluation-harness against serve.py: a checkpoint served on loopback, lm-eval's
# local-completions model pointed at it (it finds the server's /tokenize endpoint and tokenizes
# with the checkpoint's own tokenizer), a tiny multiple-choice task from a local file
# (experiments/lm_eval/stories_mc.yaml), then each choice's log-likelihood that lm-eval got from the
# server's echo + logprobs checked against one forward pass of the model in this process.
#   CKPT   a checkpoint folder (any stage's; a pretrained one suits multiple choice best)
#   TASKS  lm-eval tasks (default: stories_mc; e.g. hellaswag,arc_easy where the hub is reachable)
# $ pip install "lm-eval[api]"; bash experiments/lm_eval_serve.sh out/speedrun_cpu/base
set -euo pipefail
CKPT=${1:?usage: bash experiments/lm_eval_serve.sh CHECKPOINT_FOLDER [PORT]}
PORT=${2:-8123}
TASKS=${TASKS:-stories_mc}
OUT=${OUT:-out/lm_eval/$(basename "$CKPT")}
command -v lm_eval > /dev/null || { echo 'error: no lm_eval here: pip install "lm-eval[api]"'; exit 2; }
mkdir -p "$OUT"
python serve.py --out_dir="$CKPT" --port=$PORT --device=${DEVICE:-auto} > "$OUT/serve.log" 2>&1 &
server=$!
trap 'kill $server 2> /dev/null' EXIT
until grep -q serving "$OUT/serve.log"; do
  kill -0 $server 2> /dev/null || { cat "$OUT/serve.log"; exit 1; }
  sleep 1
done
head -n 1 "$OUT/serve.log"
context=$(python -c "import json, urllib.request as u
print(json.load(u.urlopen('http://127.0.0.1:$PORT/tokenizer_info'))['model_max_length'])")
lm_eval --model local-completions --tasks "$TASKS" --include_path experiments/lm_eval --log_samples \
  --model_args "base_url=http://127.0.0.1:$PORT/v1/completions,model=$(basename "$CKPT"),max_length=$context" \
  --output_path "$OUT" 2>&1 | tr '\r' '\n' | grep -v -e '^20[0-9][0-9]-' -e 'it/s]' -e '^$' | tail -n 8
[ "$TASKS" = stories_mc ] || exit 0
python - "$CKPT" "$OUT" <<'PY'
# each choice again here: log p(continuation | context) from one forward pass over both (lm-eval's
# split: the context's tokens, then the rest of the tokens of context + continuation)
import glob, json, sys
import torch
from checkpoint import load_model
model, tok, _ = load_model(sys.argv[1], 'cpu')
model.eval()
worst = n = 0
for line in open(sorted(glob.glob(f'{sys.argv[2]}/*/samples_stories_mc_*.jsonl'))[-1]):
    doc = json.loads(line)
    for req, resp in zip(doc['arguments'].values(), doc['resps']):
        ids, ctx = tok.encode(req['arg_0'] + req['arg_1']), tok.encode(req['arg_0'])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[0][0, :, :tok.vocab_size].float(), -1)
        direct = sum(logp[t, ids[t + 1]].item() for t in range(len(ctx) - 1, len(ids) - 1))
        worst, n = max(worst, abs(direct - float(resp[0][0]))), n + 1
print(f'{n} choices: largest |log-likelihood through the server - direct| = {worst:.2e}')
PY
