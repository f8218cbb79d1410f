"""
Evaluate any checkpoint: validation loss and bits per byte on the pretraining data, and the task
score (task.py) of its answers to held-out prompts, generated in batches through the KV cache.

$ python eval.py --out_dir=out/sft
$ python eval.py --compare=out/tinystories_moe,out/sft,out/dpo      # one table
$ python eval.py --out_dir=out/sft --n_prompts=500 --temperature=0.8

Writes out_dir/eval.json (val loss and bits per byte on each held-out split, the task metrics, the
first n_samples answers with their scores, and n_samples continuations written as a language
model, without the template, of story openings, or for a model of other data of the first words of
its held-out documents), every answer with its scores in
out_dir/eval_answers.jsonl (to read what the model gets wrong), and prints a markdown row (or, with --compare, a
table). A checkpoint without the chat template (a pretrained model) is prompted with the template
all the same: its tokenizer gets the template tokens appended, as sft.py does.
"""

import json
import math
import os
import re
import sys

import numpy as np
import torch

from checkpoint import checkpoint_path, load_chat_model, load_checkpoint, newest_run
from config import configure
from data import eval_generator, load_tokenizer_spec, read_prepared, TokenData, write_json, write_jsonl
from generate import generate_tokens, pad_prompts, sampling_problems, use_cuda_graph
from model import GPT, masked_cross_entropy
from rl import batched_logprobs, sample_rollout
from runtime import init_runtime
from task import evaluate_task, score
from tokenizer import base_spec

# -----------------------------------------------------------------------------
out_dir = ''                 # the checkpoint folder to evaluate; '': the newest under out/
compare = ''                 # comma-separated checkpoint folders: evaluate each, print one table
reuse = False                # with compare: use an existing eval.json instead of re-evaluating
data_dir = ''                # pretraining data for val loss / bpb; '' = the checkpoint's own
eval_iters = 50              # validation batches (of batch_size x block_size tokens); 0 skips val loss
batch_size = 16
block_size = 0               # 0: the model's block_size
task_dir = ''                # held-out prompts; '': the checkpoint's own (sft.py records it), else
                             # data/tinystories_instruct
n_prompts = 200              # held-out prompts (prompts_val.jsonl) to answer; 0 skips the task
prompts_file = 'prompts_val.jsonl'   # in task_dir; another (e.g. prompts_train.jsonl: prompts made the same
                             # way from the training books) writes eval_<its name>.json beside eval.json:
                             # is a low score the held-out books or the model?
max_new_tokens = 300
temperature = 0.0            # 0: greedy
top_k = 0
frequency_penalty = 0.0      # OpenAI's penalties on the answers' repeated tokens (generate.penalize); with
presence_penalty = 0.0       # either set, the results go to eval_fp<f>_pp<p>.json beside eval.json
gen_batch_size = 64
cuda_graph = None            # answers: one-token steps replayed as a CUDA graph
                             # (generate.DecodeGraph); None: on for CUDA
reference = ''               # a checkpoint (e.g. out/sft): also report KL(model || reference) on
                             # sampled answers to the held-out prompts (nats per answer)
sampled_score = True         # also score one answer sampled at temperature 1 (seeded) per prompt
                             # ('task/score_sampled', 'task/all_words_sampled'): what RL's rollouts draw
                             # from, beside the greedy answers (the KL reads the same answers)
n_samples = 5                # answers kept in eval.json, and continuations of openings:
sample_tokens = 120          # new tokens per continuation
openings = ''                # the texts continued, '|'-separated; '': story openings (OPENINGS) for a model
                             # of story data (tinystories, stories), else the first words of its pretraining
                             # data's held-out documents
quantize = ''                # 'int8' | 'int4': weights quantized at load (quant.py); '': as saved
device = 'auto'
dtype = 'auto'
seed = 1337
# -----------------------------------------------------------------------------
configure(globals(), verbose=False)
problems = sampling_problems(temperature, top_k) + [msg for bad, msg in [
    (eval_iters < 0, f'eval_iters={eval_iters} must be >= 0 (0 skips the val loss)'),
    (n_prompts < 0, f'n_prompts={n_prompts} must be >= 0 (0 skips the task)'),
    (n_samples < 0, f'n_samples={n_samples} must be >= 0'),
    (max_new_tokens < 1, f'max_new_tokens={max_new_tokens} must be at least 1'),
    (sample_tokens < 1, f'sample_tokens={sample_tokens} must be at least 1'),
    (batch_size < 1, f'batch_size={batch_size} must be at least 1'),
    (gen_batch_size < 1, f'gen_batch_size={gen_batch_size} must be at least 1'),
    (bool(compare and out_dir), f"give --compare or --out_dir, not both (out_dir={out_dir!r} would be left out)"),
] if bad]
if problems:
    sys.exit('error: ' + '; '.join(problems))
OPENINGS = ('Once upon a time', 'One day, a little girl named Lily', 'The old wizard looked at the boy and said',
            'Tom and his dog went to the forest', 'In a small village by the sea')
STORY_DATA = ('tinystories', 'stories')      # the prepare scripts' dataset names whose models continue OPENINGS
OPENING_WORDS = 8                            # words of a held-out document an opening keeps
rt = init_runtime(device, dtype, seed)
cuda_graph = use_cuda_graph(cuda_graph, rt.device_type)


@torch.no_grad()
def val_loss(model, tok_spec, folder, ckpt):
    """{split/loss, split/bpb} on each held-out split of the pretraining data (val, and e.g.
    val_tinystories), or {} if the data is not found. The softmax runs over the vocabulary the
    model was trained with: the rows load_chat_model adds for the chat tokens hold zero logits, and
    counted, they would add log(1 + 64 / sum_i e^{z_i}) nats, a different amount for each model."""
    if not eval_iters:                                     # only the answers are wanted
        return {}
    d = pretraining_data(ckpt)
    if not d or not os.path.exists(os.path.join(d, 'meta.json')):
        print(f'{folder}: no pretraining data found (data_dir={d!r}); skipping val loss', file=sys.stderr)
        return {}
    data = TokenData(d)
    base = load_tokenizer_spec(data.meta['tokenizer'], d)
    if base_spec(tok_spec) != base_spec(base):             # the chat template aside
        sys.exit(f"error: {folder}'s tokenizer differs from the one of the data in {d}")
    T = block_size or model.config.block_size
    trained_vocab = ckpt['model_config']['vocab_size']
    out = {}
    for split in data.val_splits:
        losses = []
        for k in range(eval_iters):
            g = eval_generator(k, split)
            x, y = data.batch(split, batch_size, T, g, rt.device)
            with rt.autocast():
                if model.config.vocab_size > trained_vocab:      # grown for the chat tokens: without them
                    losses.append(masked_cross_entropy(model(x)[0][..., :trained_vocab], y).item())
                else:
                    losses.append(model(x, y, return_logits=False)[1].item())
        loss = sum(losses) / len(losses)
        out.update({f'{split}/loss': loss, f'{split}/bpb': loss / math.log(2) / data.bytes_per_token(split)})
    return out


def pretraining_data(ckpt):
    """The folder of the checkpoint's pretraining data (data_dir, else the one it records), or ''."""
    return data_dir or ckpt.get('data_dir') or ckpt.get('config', {}).get('data_dir', '')


def opening_texts(ckpt, tok):
    """The n_samples texts the continuations start from: `openings`; for a model of story data (or
    where its data is not found, empty, or of another tokenizer) the story openings; else the first
    OPENING_WORDS words (with the spacing between them) of its data's first held-out documents,
    then, where the val split holds fewer documents, of the text from the first line break (else
    the first space) past evenly spaced points of it (a play's lines, say), each text once."""
    if openings:
        return openings.split('|')[:n_samples]
    d = pretraining_data(ckpt)
    path = os.path.join(d, 'val.bin') if d else ''
    if not path or not os.path.isfile(os.path.join(d, 'meta.json')) or not os.path.getsize(path):
        return list(OPENINGS[:n_samples])
    with open(os.path.join(d, 'meta.json')) as f:
        meta = json.load(f)
    if (meta.get('dataset') in STORY_DATA
            or base_spec(load_tokenizer_spec(meta['tokenizer'], d)) != base_spec(tok.spec())):
        return list(OPENINGS[:n_samples])
    ids = np.memmap(path, dtype=np.dtype(meta['dtype']), mode='r')
    doc_starts = [0] + [int(i) + 1 for i in np.flatnonzero(ids[:-1] == tok.eot_id)]   # (each document ends in EOT)
    points = [len(ids) * (k + 1) // (n_samples + 1) for k in range(n_samples)]
    texts = []
    for a in doc_starts[:n_samples] + points:
        if len(texts) == n_samples:
            break
        window = ids[a:a + 64 * OPENING_WORDS].tolist()          # (a token holds at least a byte)
        text = tok.decode(window[:window.index(tok.eot_id)] if tok.eot_id in window else window)
        if a not in doc_starts:               # mid-document: from a line's start, else a word's
            cut = re.search(r'\n', text) or re.search(r'\s+', text)
            text = text[cut.end():].lstrip() if cut else ''
        words = list(re.finditer(r'\S+', text))
        text = text[:words[min(OPENING_WORDS, len(words)) - 1].end()] if words else ''
        if text and text not in texts:
            texts.append(text)
    return texts or list(OPENINGS[:n_samples])


@torch.no_grad()
def continuations(model, tok, texts):
    """A continuation (temperature 0.8, seeded) of each text, without the chat template: what the
    model writes as a language model."""
    if not texts:
        return []
    g = torch.Generator(device=rt.device).manual_seed(seed)
    idx, mask = pad_prompts([[tok.eot_id] + tok.encode(o) for o in texts], tok.eot_id, rt.device)
    with rt.autocast():
        new = torch.stack(list(generate_tokens(model, idx, sample_tokens, temperature=0.8, top_k=200,
                                               stop_ids=[tok.eot_id], vocab_limit=tok.vocab_size,
                                               prompt_mask=mask, generator=g, cuda_graph=cuda_graph)), 1).tolist()
    return [o + tok.decode(row[:row.index(tok.eot_id)] if tok.eot_id in row else row)
            for o, row in zip(texts, new)]


def task_metrics(model, tok, ckpt):
    """The task metrics for eval.json, and one row per held-out prompt (its answer and scores)."""
    folder = task_dir or ckpt.get('task_dir') or 'data/tinystories_instruct'
    path = os.path.join(folder, prompts_file)
    if not n_prompts:
        return {}, []
    if not os.path.isfile(path) and prompts_file != 'prompts_val.jsonl':     # asked for by name: an error
        sys.exit(f"error: prompts_file='{prompts_file}' is not in {folder} (its prompt files: "
                 f"{', '.join(sorted(f for f in os.listdir(folder) if f.startswith('prompts'))) or 'none'})"
                 if os.path.isdir(folder) else f"error: no task folder '{folder}' for prompts_file='{prompts_file}'")
    if not os.path.isfile(path):
        print(f"no held-out prompts at '{path}' (python prepare/tinystories_instruct.py); skipping the task",
              file=sys.stderr)
        return {}, []
    prompts = read_prepared(folder, prompts_file, ('prompt', 'words'))[:n_prompts]
    r = evaluate_task(model, tok, prompts, max_new_tokens, temperature, top_k=top_k or None,
                      batch_size=gen_batch_size, autocast=rt.autocast, seed=seed, cuda_graph=cuda_graph,
                      frequency_penalty=frequency_penalty, presence_penalty=presence_penalty)
    out = {'task/score': r['score'], 'task/all_words': r['all_words'], 'task/words': r['words'],
           'task/word_by_position': r['word_by_position'], 'task/ended': r['ended'],
           'task/repetition': r['repetition'], 'task/n_prompts': len(prompts),
           'task/example': r['example'],
           'task/samples': [{'prompt': p['prompt'], 'answer': a['text'], **{k: s[k] for k in ('score', 'all_words')}}
                            for p, a, s in zip(prompts, r['answers'], r['scores'])][:n_samples]}
    if sampled_score or reference:
        g = torch.Generator(device=rt.device).manual_seed(seed)
        ro = sample_rollout(model, tok, prompts, max_new_tokens, 1.0, generator=g, autocast=rt.autocast,
                            batch_size=gen_batch_size, cuda_graph=cuda_graph)
        if sampled_score:
            s = [score(t, p['words'], p.get('features'), e) for t, e, p in zip(ro['texts'], ro['ended'], prompts)]
            out['task/score_sampled'] = sum(x['score'] for x in s) / len(s)
            out['task/all_words_sampled'] = sum(x['all_words'] for x in s) / len(s)
        if reference:
            out['kl_ref'] = kl_to_reference(model, tok, ro)
    # the required words, then the scores (their 'words', the share of them used, as words_share)
    rows = [{'prompt': p['prompt'], 'words': p['words'], 'answer': a['text'], 'ended': a['ended'],
             **{'words_share' if k == 'words' else k: v for k, v in s.items()}}
            for p, a, s in zip(prompts, r['answers'], r['scores'])]
    return out, rows


@torch.no_grad()
def kl_to_reference(model, tok, ro):
    """Mean over the model's sampled answers `ro` (rl.sample_rollout, temperature 1) of
    sum_t log pi(a_t) - log ref(a_t): the k1 estimate of KL(model || reference) per answer, in nats."""
    ref, ref_tok, _ = load_chat_model(reference, rt.device)
    if ref_tok.spec() != tok.spec():
        sys.exit(f"error: the reference's tokenizer ({reference}) differs from the model's")
    ref.eval()
    # over the tokenizer's ids only, the distribution sample_rollout drew from (not the padding)
    lp = batched_logprobs(model, ro['seq'], ro['mask'], rt.autocast, vocab=tok.vocab_size)
    lr = batched_logprobs(ref, ro['seq'], ro['mask'], rt.autocast, vocab=tok.vocab_size)
    return ((lp - lr) * ro['mask']).sum(1).mean().item()


def result_suffix(saved_quantized):
    """What tells this evaluation's files from eval.json (the held-out prompts, greedy, as saved)."""
    # quantized here (--quantize) from a full-precision folder: beside its own eval.json, not over it
    suffix = f'_{quantize}' if quantize and not saved_quantized else ''
    if prompts_file != 'prompts_val.jsonl':                  # not the held-out prompts: not eval.json
        suffix += '_' + os.path.splitext(os.path.basename(prompts_file))[0]
    if frequency_penalty or presence_penalty:                # another decoding: not eval.json either
        suffix += f'_fp{frequency_penalty:g}_pp{presence_penalty:g}'
    if temperature:                                          # sampled, not greedy: nor this
        suffix += f'_t{temperature:g}' + (f'_k{top_k}' if top_k else '')
    return suffix


def evaluate(folder):
    ckpt = load_checkpoint(folder)
    model, tok, ckpt = load_chat_model(folder, 'cpu', ckpt, quantize=quantize)
    model.to(rt.device).eval()
    task, answers = task_metrics(model, tok, ckpt)
    quantized = (ckpt.get('quantized') or {}).get('kind') or quantize or None
    with torch.device('meta'):        # counted as in full precision (quantized weights are buffers)
        full = GPT(model.config)
    result = {'run': folder, 'stage': ckpt.get('stage', '?'), 'step': ckpt.get('step', 0), 'quantized': quantized,
              'params': full.num_params(), 'active_params': full.active_params(), 'val/loss': None,
              'val/bpb': None, **val_loss(model, tok.spec(), folder, ckpt), **task,
              'continuations': continuations(model, tok, opening_texts(ckpt, tok) if n_samples else []),
              'temperature': temperature, 'top_k': top_k,
              'frequency_penalty': frequency_penalty, 'presence_penalty': presence_penalty,
              'max_new_tokens': max_new_tokens}
    suffix = result_suffix(bool(ckpt.get('quantized')))
    write_json(os.path.join(folder, f'eval{suffix}.json'), result)
    if answers:
        write_jsonl(os.path.join(folder, f'eval_answers{suffix}.jsonl'), answers)
    print(f"wrote {os.path.join(folder, f'eval{suffix}.json')}"
          + (f' and eval_answers{suffix}.jsonl' if answers else ''), file=sys.stderr)
    return result


def fmt(v, spec='.4f'):
    return '-' if v is None else format(v, spec)


HEADER = ('| run | stage | step | val loss | val bits/byte | task score | all words used | ended turn |'
          + (' KL to reference |' if reference else '') + '\n| --- | --- | --- | --- | --- | --- | --- | --- |'
          + (' --- |' if reference else ''))


def row(r):
    pct = lambda k: '-' if r.get(k) is None else f'{100 * r[k]:.1f}%'   # noqa: E731
    name = r['run'] + (f" ({r['quantized']})" if r.get('quantized') else '')
    return (f"| {name} | {r['stage']} | {r['step']} | {fmt(r['val/loss'])} | {fmt(r['val/bpb'])} | "
            f"{fmt(r.get('task/score'), '.3f')} | {pct('task/all_words')} | {pct('task/ended')} |"
            + (f" {fmt(r.get('kl_ref'), '.2f')} |" if reference else ''))


folders = [f.strip() for f in compare.split(',') if f.strip()] if compare else [out_dir or newest_run('evaluating')]
if compare and not folders:
    sys.exit(f'error: compare={compare!r} names no folder; e.g. --compare=out/a,out/b')
for folder in folders:        # each one checked before any is evaluated (a typo in the last one)
    if reuse and os.path.isfile(os.path.join(folder, f'eval{result_suffix(saved_quantized=False)}.json')):
        continue                              # (its results are read, not its checkpoint)
    p = checkpoint_path(folder)
    if not (os.path.isfile(p) or os.path.isdir(p)):
        load_checkpoint(folder)               # (exits naming it, and the run folders there are)
results = []
for folder in folders:
    cached = os.path.join(folder, f'eval{result_suffix(saved_quantized=False)}.json')
    if reuse and os.path.isfile(cached):
        with open(cached) as f:
            results.append(json.load(f))
    else:
        results.append(evaluate(folder))
if len(results) == 1 and 'task/example' in results[0]:
    ex = results[0]['task/example']
    print(f"prompt: {ex['prompt']}\nanswer: {ex['answer']}\n")
print(HEADER)
for r in results:
    print(row(r))
