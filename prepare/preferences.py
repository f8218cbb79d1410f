"""
Preference pairs for reward.py and dpo.py -> data/prefs/{prefs_train,prefs_val}.jsonl

$ python prepare/preferences.py --init_from=out/sft                     # sample and score
$ python prepare/preferences.py --source=pairs.jsonl --out_dir=data/hh   # an external set of pairs

Sampling: for each prompt of task_dir/prompts_train.jsonl, `samples_per_prompt` answers from the
SFT checkpoint (batched, KV cache, temperature `temperature`), scored with the task rule
(task.score); the best and the worst answer form a pair when their scores differ by at least
`margin` (with all_pairs, every two answers whose scores differ by that much: up to K(K-1)/2 pairs
a prompt, as InstructGPT trained its reward model). val_fraction of the prompts go to prefs_val,
with all their pairs (no prompt is in both files). Each record:
  {"prompt", "chosen", "rejected", "chosen_score", "rejected_score", "chosen_ended",
   "rejected_ended", "words", "features"}
An external JSONL needs prompt, chosen and rejected (scores and the rest are optional); it is
checked and split the same way (HH-RLHF-style sets converted to these fields work).

Swapped pairs (swap_pairs=N, training prompts only): minimal pairs whose label only the prompt
decides. For up to N required words w that a training prompt's best answer A uses as written, A'
is A with w replaced by a word v of the same common-word list (task.POS_LISTS) that A does not
use, and P' is the prompt asking for v instead of w. Two pairs join the training file: under the
prompt, A over A'; under P', A' over A (each kept only if task.score agrees by the margin both
ways). Each answer is then once chosen and once rejected, so nothing in the answer alone predicts
the label: the reward model has to compare the answer with the prompt's words, which pairs of
two unrelated samples (most of them differing in one required word among 150 tokens) teach
slowly. The held-out pairs stay the sampled ones. Records carry "swap": true.
reference_swaps=N adds the same minimal pairs made from N reference passages of
task_dir/sft_train.jsonl that ask only for common-list words, as the held-out prompts do (A is the
passage, which uses all its words; one word swapped each; none whose prompt is a held-out pair's):
many more such pairs than the sampled answers give, without sampling. Records also carry
"reference": true.

Greedy rejected (greedy_rejected=True, every prompt outside the held-out split, also one whose
samples made no pair, all tied at 1.0, say): the SFT model's own greedy answer as the rejected one,
under the prompt's best sampled answer where that scores at least `margin` more. The pairs are
sampled at `temperature` (1.0), where answers rarely loop; greedy decoding,
which the task's evaluation reads, loops and leaves its turn unended more often, and DPO trained
on sampled pairs alone did not learn to avoid that (docs/results.md). Records carry
"greedy": true; the held-out pairs stay the sampled ones.

Rejection sampling (best_dir): the same samples also give an SFT set, each prompt's best answer
where it scores at least best_min_score and ended its turn (DeepSeek-V3 and R1 made SFT data this
way from their own models), written as best_dir/sft_train.jsonl beside task_dir's sft_val.jsonl
and prompts_val.jsonl, so that a second SFT round reads it as its task:
$ python prepare/preferences.py --init_from=out/sft --best_dir=data/best
$ python sft.py --init_from=out/sft --task_dir=data/best --out_dir=out/sft_best
"""

import os
import random
import sys
from itertools import combinations

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from checkpoint import load_chat_model  # noqa: E402
from config import configure  # noqa: E402
from data import read_jsonl, read_prepared, start_prepared, write_json, write_jsonl  # noqa: E402
from generate import generate_chat, use_cuda_graph  # noqa: E402
from runlog import progress  # noqa: E402
from runtime import init_runtime  # noqa: E402
from task import (POS_LISTS, WORD, LIST_WORDS, make_prompt, score, straight_quotes, word_used,  # noqa: E402
                  words_of)

# -----------------------------------------------------------------------------
init_from = 'out/sft'        # the SFT checkpoint to sample from
task_dir = 'data/tinystories_instruct'
source = ''                  # an external JSONL of pairs instead of sampling
out_dir = 'data/prefs'
n_prompts = 0                # prompts to use from prompts_train.jsonl (0: all)
samples_per_prompt = 4       # K answers per prompt
temperature = 1.0
top_k = 0
max_new_tokens = 300
margin = 0.1                 # keep a pair only if score(chosen) - score(rejected) >= margin
all_pairs = False            # every two answers of a prompt that differ by margin (False: best vs worst)
val_fraction = 0.1
swap_pairs = 0               # per training prompt, up to this many swapped-word minimal pairs (see the top; 0: none)
reference_swaps = 0          # swapped pairs from this many reference passages of sft_train.jsonl (see the top)
greedy_rejected = False      # also the SFT model's greedy answer as rejected under the best sample (see the top)
best_dir = ''                # also write each prompt's best answer as SFT data here ('': none)
best_min_score = 1.0         # ... if it scores at least this (1.0: every word, feature and the ending)
batch_size = 64              # prompts per generation batch (x samples_per_prompt sequences)
device = 'auto'
dtype = 'auto'
seed = 1337
cuda_graph = None            # answers: one-token steps replayed as a CUDA graph; None: on for CUDA
# -----------------------------------------------------------------------------
configure(globals())
if margin < 0:
    sys.exit(f'error: margin={margin} must be 0 or positive (the least score gap a pair keeps)')
if samples_per_prompt < 2:
    sys.exit(f'error: samples_per_prompt={samples_per_prompt} must be at least 2 to make a pair')
if swap_pairs < 0:
    sys.exit(f'error: swap_pairs={swap_pairs} must be 0 (none) or a positive number of swapped pairs per prompt')
if reference_swaps < 0:
    sys.exit(f'error: reference_swaps={reference_swaps} must be 0 (none) or a positive number of passages')
if best_dir and source:
    sys.exit('error: best_dir= keeps the best of sampled answers; an external set of pairs (source=) has none')
if greedy_rejected and source:
    sys.exit('error: greedy_rejected=True rejects the SFT model\'s greedy answers; an external set of pairs (source=) '
             'has none')


if source:
    pairs = read_jsonl(source, ('prompt', 'chosen', 'rejected'))
    for n, p in enumerate(pairs, 1):
        bad = [k for k in ('prompt', 'chosen', 'rejected') if not isinstance(p[k], str)]
        problem = (f'{bad} are not text' if bad else 'chosen and rejected are the same text'
                   if p['chosen'] == p['rejected'] else 'chosen_score < rejected_score'
                   if p.get('chosen_score', 0) < p.get('rejected_score', 0) else '')
        if problem:
            sys.exit(f'error: {source}: pair {n} (of the non-empty lines): {problem}')
        p.setdefault('chosen_ended', True)
        p.setdefault('rejected_ended', True)
    stats = {'source': source}
else:
    rt = init_runtime(device, dtype, seed)
    cuda_graph = use_cuda_graph(cuda_graph, rt.device_type)
    model, tok, ckpt = load_chat_model(init_from, rt.device)
    model.eval()
    stage = ckpt.get('stage')
    prompts = read_prepared(task_dir, 'prompts_train.jsonl', ('prompt', 'words'),
                            hint='run python prepare/tinystories_instruct.py')
    prompts = prompts[:n_prompts] if n_prompts else prompts
    g = torch.Generator(device=rt.device).manual_seed(seed)
    pairs, gaps, best_answers = [], [], []
    greedy_pairs = {}                                   # prompt -> its pair (best sample, greedy answer)
    for i in progress(range(0, len(prompts), batch_size), desc='sampling', unit='batch'):
        chunk = prompts[i:i + batch_size]
        # each prompt K times in one batch: K independent samples
        flat = [p['prompt'] for p in chunk for _ in range(samples_per_prompt)]
        answers = generate_chat(model, tok, flat, max_new_tokens, temperature, top_k=top_k or None,
                                batch_size=len(flat), autocast=rt.autocast, generator=g, cuda_graph=cuda_graph)
        greedy = generate_chat(model, tok, [p['prompt'] for p in chunk], max_new_tokens, 0.0, batch_size=len(chunk),
                               autocast=rt.autocast, cuda_graph=cuda_graph) if greedy_rejected else []
        for j, p in enumerate(chunk):
            group = answers[j * samples_per_prompt:(j + 1) * samples_per_prompt]
            scored = [(score(a['text'], p['words'], p.get('features'), a['ended'])['score'], a) for a in group]
            scored.sort(key=lambda sa: sa[0])
            gaps.append(scored[-1][0] - scored[0][0])
            top, top_answer = max(((sc, a) for sc, a in scored if a['ended']), key=lambda sa: sa[0],
                                  default=(None, None))          # the best answer that ended its turn
            if top is not None and top >= best_min_score:
                best_answers.append({'prompt': p['prompt'], 'response': top_answer['text'], 'words': p['words'],
                                     'features': p.get('features', {}), 'score': top})
            if greedy:                  # the greedy answer under the best sample, if that beats it by margin
                g_answer, (hi, best) = greedy[j], scored[-1]
                lo = score(g_answer['text'], p['words'], p.get('features'), g_answer['ended'])['score']
                if hi - lo >= margin - 1e-9 and best['text'] != g_answer['text']:
                    greedy_pairs[p['prompt']] = {
                        'prompt': p['prompt'], 'chosen': best['text'], 'rejected': g_answer['text'],
                        'chosen_score': hi, 'rejected_score': lo, 'chosen_ended': best['ended'],
                        'rejected_ended': g_answer['ended'], 'words': p['words'], 'features': p.get('features', {}),
                        'greedy': True}
            # (rejected, chosen) index pairs, chosen scoring at least `margin` more
            for a, b in (combinations(range(len(scored)), 2) if all_pairs else [(0, len(scored) - 1)]):
                (lo, worst), (hi, best) = scored[a], scored[b]
                # a gap of exactly margin, whatever the rounding, between two different answers (at margin 0
                # the same text sampled twice would be chosen and rejected at once)
                if hi - lo >= margin - 1e-9 and best['text'] != worst['text']:
                    pairs.append({'prompt': p['prompt'], 'chosen': best['text'], 'rejected': worst['text'],
                                  'chosen_score': hi, 'rejected_score': lo, 'chosen_ended': best['ended'],
                                  'rejected_ended': worst['ended'], 'words': p['words'],
                                  'features': p.get('features', {})})
    stats = {'init_from': init_from, 'prompts': len(prompts), 'samples_per_prompt': samples_per_prompt,
             'greedy_rejected': greedy_rejected,
             'temperature': temperature, 'margin': margin, 'all_pairs': all_pairs,
             'mean_score_gap': sum(gaps) / max(len(gaps), 1)}
    print(f"{len(pairs)} pairs from {len({p['prompt'] for p in pairs})} of {len(prompts)} prompts (score gap >= "
          f"{margin}); mean best-worst gap {stats['mean_score_gap']:.3f}")
if best_dir and not best_answers:  # the pairs are still wanted: a note, not an error
    print(f'note: no prompt had an answer scoring at least best_min_score={best_min_score}, so {best_dir} is '
          f'not written; lower best_min_score= or sample more answers (samples_per_prompt=)', file=sys.stderr)
elif best_dir:                   # the rejection-sampled SFT set
    start_prepared(best_dir)                                  # incomplete until its meta.json lands
    write_jsonl(os.path.join(best_dir, 'sft_train.jsonl'), best_answers)
    for name in ('sft_val.jsonl', 'prompts_val.jsonl'):      # the held-out data stays the task's
        write_jsonl(os.path.join(best_dir, name), read_prepared(task_dir, name))
    write_json(os.path.join(best_dir, 'meta.json'), {**stats, 'task_dir': task_dir, 'best_min_score': best_min_score,
                                                     'sft_train': len(best_answers)})
    print(f'wrote {best_dir}: {len(best_answers)} best answers of {len(prompts)} prompts (score >= '
          f'{best_min_score}, ended), mean score {sum(b["score"] for b in best_answers) / len(best_answers):.3f}')
if len(pairs) < 2:
    untuned = (f"; {init_from} is a {stage} checkpoint, which never learned the chat template's answers: "
               f"fine-tune it first (sft.py) and sample from that" if not source and stage == 'pretrain' else '')
    sys.exit(f'error: only {len(pairs)} pair(s); lower margin= or sample more prompts{untuned}')
# the split is by prompt: a prompt's pairs share its answers, so they all go to one file
by_prompt = {}
for p in pairs:
    by_prompt.setdefault(p['prompt'], []).append(p)
groups = list(by_prompt.values())
random.Random(seed).shuffle(groups)
n_val = max(1, round(len(groups) * val_fraction)) if len(groups) > 1 else 0
val_pairs = [p for g in groups[:n_val] for p in g]
train_pairs = [p for g in groups[n_val:] for p in g]
if not val_pairs or not train_pairs:
    sys.exit(f'error: {len(pairs)} pairs from {len(groups)} prompt(s) cannot be split into train and val '
             f'(val_fraction={val_fraction}); sample more prompts')


def swapped(pair, w, rng):
    """The two swapped pairs of `pair`'s chosen answer A and its required word w (see the top), or
    [] where A does not use w as written, no list word fits, or the rule does not agree."""
    A, words, features = pair['chosen'], pair['words'], pair.get('features') or {}
    hits = [m for m in WORD.finditer(straight_quotes(A)) if m.group().lower() == w.lower()]   # (A's positions)
    if not hits:
        return []
    pool = next((sorted(ws) for ws in POS_LISTS.values() if w in ws), sorted(LIST_WORDS))
    used = words_of(A)
    candidates = [v for v in pool if v not in words and not word_used(v, used)]
    if not candidates:
        return []
    v = rng.choice(candidates)
    out, at = [], 0
    for m in hits:                                   # every use as written, keeping a capital
        out += [A[at:m.start()], v.capitalize() if m.group()[0].isupper() else v]
        at = m.end()
    A2 = ''.join(out) + A[at:]
    words2 = [v if x == w else x for x in words]
    ended = pair.get('chosen_ended', True)
    s = {(text, k): score(text, ws, features, ended)['score']
         for text in (A, A2) for k, ws in (('p', words), ('p2', words2))}
    if s[A, 'p'] - s[A2, 'p'] < margin - 1e-9 or s[A2, 'p2'] - s[A, 'p2'] < margin - 1e-9:
        return []
    prompt2 = make_prompt(words2, features)
    common = {'chosen_ended': ended, 'rejected_ended': ended, 'features': features, 'swap': True}
    return [{'prompt': pair['prompt'], 'chosen': A, 'rejected': A2, 'chosen_score': s[A, 'p'],
             'rejected_score': s[A2, 'p'], 'words': words, **common},
            {'prompt': prompt2, 'chosen': A2, 'rejected': A, 'chosen_score': s[A2, 'p2'],
             'rejected_score': s[A, 'p2'], 'words': words2, **common}]


n_greedy = 0
if greedy_rejected and not source:   # under every prompt but the held-out ones, which keep the sampled pairs:
    # also those whose samples made no pair (all tied, say at 1.0, while the greedy answer loops)
    held_out = {g[0]['prompt'] for g in groups[:n_val]}
    new = [pair for prompt, pair in greedy_pairs.items() if prompt not in held_out]
    train_pairs += new
    n_greedy = len(new)
    if not new:
        print('note: greedy_rejected made no pair (no best sample beat its greedy answer by margin)', file=sys.stderr)
n_swapped = 0
if swap_pairs:
    rng = random.Random(seed + 2)
    for g in groups[n_val:]:
        if not g[0].get('words'):
            continue
        best = max(g, key=lambda p: p.get('chosen_score', 0))
        made = 0
        for w in best['words']:
            new = swapped(best, w, rng) if made < swap_pairs else []
            train_pairs += new
            made += bool(new)
        n_swapped += 2 * made
    if n_swapped == 0:
        print('note: swap_pairs made no pair (no best answer uses a required word as written)', file=sys.stderr)
n_reference = 0
if reference_swaps:
    rng = random.Random(seed + 3)
    held_out = {p['prompt'] for p in val_pairs}
    refs = [r for r in read_prepared(task_dir, 'sft_train.jsonl', ('prompt', 'response', 'words'))
            if r['words'] and all(w in LIST_WORDS for w in r['words']) and r['prompt'] not in held_out]
    rng.shuffle(refs)
    for r in refs:
        if n_reference >= 2 * reference_swaps:
            break
        ref = {'prompt': r['prompt'], 'chosen': r['response'], 'words': r['words'], 'features': r.get('features') or {}}
        # one word each, the first (in a random order) that the passage uses as written
        new = next((pp for w in rng.sample(r['words'], len(r['words'])) if (pp := swapped(ref, w, rng))), [])
        train_pairs += [{**pp, 'reference': True} for pp in new]
        n_reference += len(new)
    if n_reference < 2 * reference_swaps:
        print(f'note: reference_swaps={reference_swaps} made {n_reference // 2} passages\' pairs (too few '
              f'passages ask only for list words and use one as written)', file=sys.stderr)
random.Random(seed + 1).shuffle(train_pairs)
start_prepared(out_dir)                                       # incomplete until its meta.json lands
write_jsonl(os.path.join(out_dir, 'prefs_val.jsonl'), val_pairs)
write_jsonl(os.path.join(out_dir, 'prefs_train.jsonl'), train_pairs)
write_json(os.path.join(out_dir, 'meta.json'), {**stats, 'train_pairs': len(train_pairs), 'val_pairs': len(val_pairs),
                                                'swap_pairs': n_swapped, 'reference_swap_pairs': n_reference,
                                                'greedy_pairs': n_greedy,
                                                'val_prompts': n_val, 'train_prompts': len(groups) - n_val})
print(f'wrote {out_dir}: {len(train_pairs)} train pairs ({len(groups) - n_val} prompts'
      f'{f", {n_swapped} of the pairs swapped" if swap_pairs else ""}'
      f'{f", {n_greedy} with the greedy answer rejected" if greedy_rejected else ""}'
      f'{f", {n_reference} swapped from reference passages" if reference_swaps else ""}) and {len(val_pairs)} val '
      f'pairs ({n_val} prompts)')
