"""Preference pairs, the reward model (reward.py) and DPO (dpo.py)."""

import json
import math
import os
import random
import re
import shutil

import pytest
import torch

from checkpoint import load_checkpoint, load_model
from data import chat_batch
from task import rank_correlation, score
from conftest import REPO, TINY_MODEL, run_script, run_scripts
from model import GPT, ModelConfig, ScalarModel, token_logprobs
from tokenizer import ByteTokenizer, with_chat_tokens

WORDS = 'the cat dog sun ran big red happy tree ball park home mom dad friend day play jump'.split()


def planted_pairs(n, seed=0):
    """Chosen answers contain 'banana', rejected ones do not: a preference a reward model
    must discover from the pairs alone."""
    rng = random.Random(seed)
    sent = lambda k: ' '.join(rng.choice(WORDS) for _ in range(k)) + '.'     # noqa: E731
    rows = []
    for i in range(n):
        w = sent(rng.randint(6, 14)).split()
        w.insert(rng.randint(0, 5), 'banana')
        rows.append({'prompt': f'Write a story number {i}.', 'chosen': ' '.join(w),
                     'rejected': sent(rng.randint(6, 15))})
    return rows


@pytest.fixture(scope='module')
def planted(pipeline):
    src = pipeline / 'planted.jsonl'
    src.write_text(''.join(json.dumps(r) + '\n' for r in planted_pairs(240)))
    run_script('prepare/preferences.py', f'--source={src}', '--out_dir=planted', '--val_fraction=0.2',
               cwd=pipeline)
    return pipeline


def test_sequence_logprobs_count_response_tokens_only():
    tok = with_chat_tokens(ByteTokenizer())
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=320, n_layer=1, n_head=2, n_embd=16, block_size=64)).eval()
    rows = [tok.encode_chat('Hi.', 'Yo!'), tok.encode_chat('A longer prompt.', 'Ok.')]
    x, y = chat_batch(rows, tok.eot_id)
    lp = token_logprobs(model(x)[0], y)
    for b, (ids, mask) in enumerate(rows):
        logits, _ = model(torch.tensor([ids[:-1]]))
        full = torch.log_softmax(logits[0], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        response = full[torch.tensor(mask[1:])]                     # positions predicting the response
        torch.testing.assert_close(lp[b].sum(), response.sum(), atol=1e-5, rtol=1e-5)
        assert (lp[b][y[b] < 0] == 0).all()                          # prompt and padding add nothing


def test_rank_correlation():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9487, abs=1e-4)   # ties averaged
    assert math.isnan(rank_correlation([1, 1], [1, 2]))


def test_external_pairs_are_checked_and_split(tmp_path):
    src = tmp_path / 'pairs.jsonl'
    src.write_text(''.join(json.dumps(r) + '\n' for r in planted_pairs(20)))
    run_script('prepare/preferences.py', f'--source={src}', '--out_dir=p', '--val_fraction=0.25', cwd=tmp_path)
    train = [json.loads(line) for line in open(tmp_path / 'p' / 'prefs_train.jsonl')]
    val = [json.loads(line) for line in open(tmp_path / 'p' / 'prefs_val.jsonl')]
    assert (len(train), len(val)) == (15, 5) and train[0]['chosen_ended'] is True
    src.write_text(json.dumps({'prompt': 'x', 'chosen': 'y'}) + '\n')
    p = run_script('prepare/preferences.py', f'--source={src}', '--out_dir=q', cwd=tmp_path, check=False)
    assert "line 1 lacks ['rejected']" in p.stderr
    from conftest import run_script_many
    cases = [({'chosen': 'same', 'rejected': 'same'}, 'chosen and rejected are the same text'),
             ({'chosen': 123, 'rejected': None}, "['chosen', 'rejected'] are not text"),
             ({'chosen_score': 0.1, 'rejected_score': 0.9}, 'chosen_score < rejected_score')]
    for k, (bad, _) in enumerate(cases):
        (tmp_path / f'bad{k}.jsonl').write_text(''.join(json.dumps({**r, **(bad if i == 3 else {})}) + '\n'
                                                        for i, r in enumerate(planted_pairs(6))))
    runs = run_script_many('prepare/preferences.py', [[f'--source=bad{k}.jsonl', '--out_dir=q'] for k in range(3)],
                           cwd=tmp_path)
    for p, (_, message) in zip(runs, cases):
        assert p.returncode and f'pair 4 (of the non-empty lines): {message}' in p.stderr


def test_sampled_pairs_from_a_model(pipeline):
    run_script('prepare/preferences.py', '--init_from=base', '--task_dir=inst', '--out_dir=sampled',
               '--samples_per_prompt=3', '--max_new_tokens=12', '--margin=0.0', '--device=cpu', cwd=pipeline)
    rows = [json.loads(line) for line in open(pipeline / 'sampled' / 'prefs_train.jsonl')]
    rows += [json.loads(line) for line in open(pipeline / 'sampled' / 'prefs_val.jsonl')]
    assert len(rows) == 3                                            # one pair per prompt (margin 0)
    assert all(r['chosen_score'] >= r['rejected_score'] and {'words', 'features'} <= set(r) for r in rows)
    # a prepared folder without its meta.json (written last, removed first) is half-written: refused
    import shutil
    shutil.copytree(pipeline / 'sampled', pipeline / 'half', dirs_exist_ok=True)
    (pipeline / 'half' / 'meta.json').unlink()
    p = run_script('reward.py', '--init_from=base', '--prefs_dir=half', '--device=cpu', cwd=pipeline, check=False)
    assert p.returncode and "'half' has no meta.json: its preparation did not finish" in p.stderr
    # all_pairs: every two of the 3 answers (margin 0: all 3 pairs a prompt), split by prompt
    run_script('prepare/preferences.py', '--init_from=base', '--task_dir=inst', '--out_dir=all_pairs',
               '--all_pairs=True', '--samples_per_prompt=3', '--max_new_tokens=12', '--margin=0.0', '--device=cpu',
               cwd=pipeline)
    files = {s: [json.loads(line) for line in open(pipeline / 'all_pairs' / f'prefs_{s}.jsonl')]
             for s in ('train', 'val')}
    assert len(files['train']) + len(files['val']) == 9 and len(files['val']) == 3
    assert not {r['prompt'] for r in files['train']} & {r['prompt'] for r in files['val']}
    assert all(r['chosen_score'] >= r['rejected_score'] for r in files['train'] + files['val'])
    p = run_script('prepare/preferences.py', '--init_from=base', '--task_dir=inst', '--out_dir=none',
                   '--samples_per_prompt=2', '--max_new_tokens=4', '--margin=2', '--device=cpu',
                   cwd=pipeline, check=False)
    assert 'lower margin= or sample more prompts' in p.stderr
    assert "base is a pretrain checkpoint, which never learned the chat template's answers: fine-tune it" in p.stderr
    # greedy_rejected: under each training prompt, the model's greedy answer (the same whatever the
    # seed) rejected under the best sample that beats it by margin; none among the held-out pairs
    greedy = {}
    for seed in (1, 2):
        run_script('prepare/preferences.py', '--init_from=base', '--task_dir=inst', f'--out_dir=greedy{seed}',
                   '--greedy_rejected=True', '--all_pairs=True', '--samples_per_prompt=3', '--max_new_tokens=12',
                   '--margin=0.0', f'--seed={seed}', '--device=cpu', cwd=pipeline)
        files = {s: [json.loads(line) for line in open(pipeline / f'greedy{seed}' / f'prefs_{s}.jsonl')]
                 for s in ('train', 'val')}
        made = [r for r in files['train'] if r.get('greedy')]
        assert not any(r.get('greedy') for r in files['val'])
        assert len(made) == json.loads((pipeline / f'greedy{seed}' / 'meta.json').read_text())['greedy_pairs']
        assert all(r['chosen_score'] >= r['rejected_score'] for r in made)
        assert {r['prompt'] for r in made} <= {r['prompt'] for r in files['train'] if not r.get('greedy')}
        greedy[seed] = {r['prompt']: r['rejected'] for r in made}
    both = set(greedy[1]) & set(greedy[2])          # (2 of the 3 prompts train under each seed)
    assert both and all(greedy[1][k] == greedy[2][k] for k in both)
    p = run_script('prepare/preferences.py', '--source=x.jsonl', '--greedy_rejected=True', cwd=pipeline, check=False)
    assert p.returncode and 'greedy_rejected=True rejects the SFT model' in p.stderr


def test_best_answers_make_an_sft_set_a_second_sft_round_reads(pipeline):
    """best_dir: per prompt the best-scoring answer that ended its turn, if it scores at least
    best_min_score, with the task's held-out files beside it; sft.py fine-tunes on it."""
    run_script('sft.py', '--init_from=base', '--task_dir=inst', '--out_dir=sft_for_best', '--max_iters=40',
               '--eval_interval=40', '--batch_size=8', '--block_size=256', '--learning_rate=3e-3', '--eval_prompts=0',
               '--compile=False', '--device=cpu', cwd=pipeline)
    run_script('prepare/preferences.py', '--init_from=sft_for_best', '--task_dir=inst', '--out_dir=p_best',
               '--best_dir=best', '--best_min_score=0.0', '--samples_per_prompt=6', '--max_new_tokens=120',
               '--margin=0.0', '--device=cpu', cwd=pipeline)
    best = [json.loads(line) for line in open(pipeline / 'best' / 'sft_train.jsonl')]
    prompts = {json.loads(line)['prompt']: json.loads(line) for line in open(pipeline / 'inst' / 'prompts_train.jsonl')}
    assert 1 <= len(best) <= len(prompts) and len({b['prompt'] for b in best}) == len(best), (len(best), len(prompts))
    for b in best:                                   # the score is the rule's on that answer
        p = prompts[b['prompt']]
        assert b['words'] == p['words'] and b['score'] == score(b['response'], p['words'], p.get('features'))['score']
    for name in ('sft_val.jsonl', 'prompts_val.jsonl'):
        assert (pipeline / 'best' / name).read_text() == (pipeline / 'inst' / name).read_text()
    assert json.loads((pipeline / 'best' / 'meta.json').read_text())['sft_train'] == len(best)
    run_script('sft.py', '--init_from=sft_for_best', '--task_dir=best', '--out_dir=sft_best', '--max_iters=2',
               '--eval_interval=2', '--batch_size=2', '--block_size=256', '--eval_prompts=1', '--max_new_tokens=8',
               '--compile=False', '--device=cpu', cwd=pipeline)
    assert load_checkpoint(str(pipeline / 'sft_best'))['task_dir'] == 'best'
    none, external = run_scripts([                 # none good enough: the pairs still, and a note
        ('prepare/preferences.py', ['--init_from=sft_for_best', '--task_dir=inst', '--out_dir=p_none',
                                    '--best_dir=none', '--best_min_score=2', '--samples_per_prompt=2',
                                    '--max_new_tokens=4', '--margin=0.0', '--device=cpu']),
        ('prepare/preferences.py', ['--source=planted.jsonl', '--best_dir=x'])], cwd=pipeline)
    assert none.returncode == 0 and 'no prompt had an answer scoring at least best_min_score=2' in none.stderr
    assert not (pipeline / 'none').exists() and (pipeline / 'p_none' / 'prefs_train.jsonl').exists()
    assert external.returncode and 'an external set of pairs (source=) has none' in external.stderr


COMMON = ['--compile=False', '--device=cpu', '--peak_flops=1e12', '--log_interval=1', '--warmup_iters=5',
          '--task_dir=inst', '--max_new_tokens=8']


def test_reward_model_learns_a_planted_preference(planted):
    run_script('reward.py', '--init_from=base', '--out_dir=rm', '--prefs_dir=planted', '--max_iters=60',
               '--eval_interval=30', '--batch_size=8', '--learning_rate=1e-3', '--n_fresh=3', *COMMON, cwd=planted)
    rows = [json.loads(line) for line in open(planted / 'rm' / 'log.jsonl')]
    evals = [r for r in rows if 'val/accuracy' in r]
    assert evals[-1]['val/accuracy'] > 0.9, evals                   # held-out pairs
    assert {'val/length_corr', 'fresh/rank_corr'} <= set(evals[-1])
    assert 'train/accuracy' in rows[1]
    # with micro-batches the step's accuracy is over all of its pairs (2 x 2 here: quarters), not the last
    run_script('reward.py', '--init_from=base', '--out_dir=rm_micro', '--prefs_dir=planted', '--max_iters=8',
               '--eval_interval=8', '--batch_size=2', '--gradient_accumulation_steps=2', '--n_fresh=0', *COMMON,
               cwd=planted)
    micro = [r['train/accuracy'] for r in map(json.loads, open(planted / 'rm_micro' / 'log.jsonl'))
             if 'train/accuracy' in r]
    assert len(micro) == 8 and {0.25, 0.75} & set(micro), micro
    ckpt = load_checkpoint(str(planted / 'rm'))
    assert ckpt['stage'] == 'reward' and ckpt['model_class'] == 'scalar' and ckpt['parent'] == 'base'
    model, tok, _ = load_model(str(planted / 'rm'), scalar=None)    # ppo / grpo load it like this
    assert isinstance(model, ScalarModel)
    good, _ = tok.encode_chat('Write a story number 1.', 'the big banana ran home.')
    bad, _ = tok.encode_chat('Write a story number 1.', 'the big dog ran home.')
    x = torch.full((2, max(len(good), len(bad))), tok.eot_id)
    x[0, :len(good)], x[1, :len(bad)] = torch.tensor(good), torch.tensor(bad)
    r = model(x, last=torch.tensor([len(good) - 1, len(bad) - 1]))
    assert r[0] > r[1]


def test_reward_model_trains_with_the_loss_it_is_given(planted):
    """One pair a step: the logged training loss is -log sigmoid(r_c - r_r) (Bradley-Terry) or
    max(0, 1 - (r_c - r_r)) (margin) of the logged reward margin r_c - r_r, at every step."""
    for loss_type in ('bt', 'margin'):
        out = f'rm_{loss_type}'
        run_script('reward.py', '--init_from=base', f'--out_dir={out}', '--prefs_dir=planted', '--max_iters=4',
                   '--eval_interval=4', '--batch_size=1', f'--loss_type={loss_type}', '--n_fresh=0', *COMMON,
                   cwd=planted)
        rows = [json.loads(line) for line in open(planted / out / 'log.jsonl') if 'train/loss' in line]
        assert len(rows) == 4
        for r in rows:
            d = torch.tensor(r['train/reward_margin'])
            expected = -torch.nn.functional.logsigmoid(d) if loss_type == 'bt' else (1 - d).clamp(min=0)
            assert r['train/loss'] == pytest.approx(expected.item(), rel=1e-4, abs=1e-5), (loss_type, r)
    # Llama 2's margin: pairs whose rule scores are 0.5 apart, rule_gap_margin 2: -log sigmoid(r_c - r_r - 1),
    # whether the batches hold pairs or prompts (each prompt here has one pair)
    (planted / 'scored').mkdir(exist_ok=True)
    shutil.copy(planted / 'planted' / 'meta.json', planted / 'scored' / 'meta.json')
    for split in ('train', 'val'):
        rows = [json.loads(line) for line in open(planted / 'planted' / f'prefs_{split}.jsonl')]
        (planted / 'scored' / f'prefs_{split}.jsonl').write_text(''.join(
            json.dumps({**r, 'chosen_score': 0.75, 'rejected_score': 0.25}) + '\n' for r in rows))
    for by in ('pair', 'prompt'):
        run_script('reward.py', '--init_from=base', f'--out_dir=rm_gap_{by}', '--prefs_dir=scored', '--max_iters=3',
                   '--eval_interval=3', '--batch_size=1', f'--batch_by={by}', '--rule_gap_margin=2.0', '--n_fresh=0',
                   *COMMON, cwd=planted)
        rows = [json.loads(line) for line in open(planted / f'rm_gap_{by}' / 'log.jsonl') if 'train/loss' in line]
        for r in rows:
            expected = -torch.nn.functional.logsigmoid(torch.tensor(r['train/reward_margin']) - 1.0)
            assert r['train/loss'] == pytest.approx(expected.item(), rel=1e-4, abs=1e-5), (by, r)


def test_reward_model_that_rereads_the_prompt_keeps_it_in_its_checkpoint(planted):
    """score_reread=True trains on prompt + answer + the prompt again and saves the flag, so that
    ppo.py / grpo.py (rl.Rewards) score their rollouts the same way."""
    run_script('reward.py', '--init_from=base', '--out_dir=rm_reread', '--prefs_dir=planted', '--max_iters=4',
               '--eval_interval=4', '--batch_size=2', '--score_reread=True', '--n_fresh=2', *COMMON, cwd=planted)
    model, _, _ = load_model(str(planted / 'rm_reread'), scalar=None)
    assert model.config.score_reread and not load_model(str(planted / 'base'))[0].config.score_reread
    rows = [json.loads(line) for line in open(planted / 'rm_reread' / 'log.jsonl')]
    assert {'val/accuracy', 'fresh/rank_corr'} <= set(rows[-1])


def test_reward_model_batched_by_prompt_learns_from_all_pairs_of_each_prompt(pipeline):
    """batch_by='prompt': per prompt 2 answers with 'banana' and 2 without, and every (banana, plain)
    pair (4 a prompt, each answer in 2 of them, as prepare/preferences.py --all_pairs makes them);
    a batch holds whole prompts, each answer read once."""
    rng = random.Random(1)
    sent = lambda k: ' '.join(rng.choice(WORDS) for _ in range(k)) + '.'     # noqa: E731
    rows = []
    for i in range(100):
        good = [sent(rng.randint(5, 12)).replace('.', ' banana.') for _ in range(2)]
        bad = [sent(rng.randint(6, 13)) for _ in range(2)]
        rows += [{'prompt': f'Write a story number {i}.', 'chosen': g, 'rejected': b} for g in good for b in bad]
    (pipeline / 'grouped.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    run_script('prepare/preferences.py', '--source=grouped.jsonl', '--out_dir=grouped', '--val_fraction=0.2',
               cwd=pipeline)
    run_script('reward.py', '--init_from=base', '--out_dir=rm_grouped', '--prefs_dir=grouped', '--batch_by=prompt',
               '--max_iters=60', '--eval_interval=30', '--batch_size=2', '--learning_rate=1e-3', '--n_fresh=0',
               *COMMON, cwd=pipeline)
    rows = [json.loads(line) for line in open(pipeline / 'rm_grouped' / 'log.jsonl')]
    evals = [r for r in rows if 'val/accuracy' in r]
    assert evals[0]['val/accuracy'] < 0.8 and evals[-1]['val/accuracy'] > 0.9, evals
    assert rows[1]['train/accuracy'] is not None


def test_reward_model_reports_its_accuracy_on_each_kind_of_pair(pipeline):
    """Held-out pairs of the task (with the prompt's words) are sorted by the part of the rule that
    favours the chosen answer most: the required words, the ending, repetition; the log has the
    accuracy and the count of each kind, which add up to the overall accuracy."""
    rng = random.Random(2)
    rows, expected = [], {}
    for i in range(30):
        w = rng.sample(WORDS[1:], 3)
        other = ' '.join(rng.choice([x for x in WORDS if x not in w]) for _ in range(6))
        story = f'the {w[0]} and the {w[1]} saw a {w[2]} {other}.'
        kind = ('words', 'ending', 'repetition')[i % 3]
        rejected = {'words': f'the {w[0]} {other}.',                             # one word of three
                    'ending': story[:-1] + ' and then',                          # no last sentence end
                    'repetition': ' '.join([f'the {w[0]} and the {w[1]} saw a {w[2]}'] * 4) + '.'}[kind]
        prompt = f'Write a story that uses the words: {", ".join(w)}. ({i})'
        # the rule's scores, as prepare/preferences.py records them (task.score, unrounded: two words
        # apart is a gap of 0.3999999999999999, the ending alone 0.19999999999999996)
        rows.append({'prompt': prompt, 'chosen': story, 'rejected': rejected, 'words': w, 'features': {},
                     'chosen_score': score(story, w)['score'], 'rejected_score': score(rejected, w)['score']})
        expected[prompt] = kind
    (pipeline / 'kinds.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    run_script('prepare/preferences.py', '--source=kinds.jsonl', '--out_dir=kinds', '--val_fraction=0.5',
               cwd=pipeline)
    p = run_script('reward.py', '--init_from=base', '--out_dir=rm_kinds', '--prefs_dir=kinds', '--max_iters=2',
                   '--eval_interval=2', '--batch_size=4', '--n_fresh=0', *COMMON, cwd=pipeline)
    val = [json.loads(line) for line in open(pipeline / 'kinds' / 'prefs_val.jsonl')]
    counts = {k: sum(expected[r['prompt']] == k for r in val) for k in ('words', 'ending', 'repetition')}
    assert f"held-out pairs by what separates them: words {counts['words']}, features 0, ending " \
           f"{counts['ending']}, repetition {counts['repetition']}" in p.stdout
    last = [json.loads(line) for line in open(pipeline / 'rm_kinds' / 'log.jsonl') if 'val/accuracy' in line][-1]
    assert {k: last.get(f'val/pairs_{k}', 0) for k in counts} == counts and 'val/pairs_features' not in last
    weighted = sum(last[f'val/accuracy_{k}'] * n for k, n in counts.items() if n) / len(val)
    assert last['val/accuracy'] == pytest.approx(weighted)
    right = round(last['val/accuracy'] * len(val))        # an exact share (9 of 10 is 0.9, not 0.8999999762)
    assert last['val/accuracy'] == right / len(val)
    # the same pairs by the rule's gap between the answers, and each with its rewards in val_scored.jsonl
    # two words apart (0.4) and the repeated sentence are clear pairs, the ending alone (0.2) a middle one
    by_gap = {'clear': counts['words'] + counts['repetition'], 'middle': counts['ending'], 'close': 0}
    assert {k: last.get(f'val/pairs_{k}', 0) for k in by_gap} == by_gap
    scored = [json.loads(line) for line in open(pipeline / 'rm_kinds' / 'val_scored.jsonl')]
    assert [r['prompt'] for r in scored] == [r['prompt'] for r in val]
    assert all(r['kind'] == expected[r['prompt']] and r['correct'] == (r['reward_chosen'] > r['reward_rejected'])
               for r in scored)
    assert sum(r['correct'] for r in scored) == right
    if counts['ending']:
        assert last['val/accuracy_middle'] == last['val/accuracy_ending']
    # experiments/reward_misses.py splits the same accuracy by kind, by the words each answer uses, ...
    p = run_script('experiments/reward_misses.py', '--out_dir=rm_kinds', '--examples=1', cwd=pipeline)
    assert f"{len(val)} held-out pairs, accuracy {100 * right / len(val):.1f}%" in p.stdout
    for kind, n in counts.items():
        if n:
            assert f"| {kind} | {n} | {100 * last[f'val/accuracy_{kind}']:.1f}% |" in p.stdout
    assert f"| 3 / 1 | {counts['words']} |" in p.stdout          # the words pairs: all three against one


def test_reward_model_learns_whether_the_answer_uses_each_required_word(planted):
    """word_check_weight: beside the pairs, the head's output at each required word of the reread
    prompt learns whether the answer uses that word (a label per word and answer): its held-out
    accuracy rises from the untrained head's, and the log has the checks' loss and accuracy."""
    rng = random.Random(3)
    rows = []
    for i in range(240):
        w = rng.sample(WORDS[1:], 3)
        other = ' '.join(rng.choice([x for x in WORDS if x not in w]) for _ in range(5))
        kept = rng.choice(w)                              # the rejected answer uses one word of three
        rows.append({'prompt': f'Write a story that uses the words: {", ".join(w)}.', 'words': w, 'features': {},
                     'chosen': f'the {w[0]} saw the {w[1]} and a {w[2]} {other}.', 'rejected': f'the {kept} {other}.'})
    (planted / 'checked.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    run_script('prepare/preferences.py', '--source=checked.jsonl', '--out_dir=checked', '--val_fraction=0.25',
               cwd=planted)
    run_script('reward.py', '--init_from=base', '--out_dir=rm_checked', '--prefs_dir=checked', '--max_iters=100',
               '--eval_interval=50', '--batch_size=8', '--learning_rate=3e-3', '--n_fresh=0', '--score_reread=True',
               '--word_check_weight=1.0', *COMMON, cwd=planted)
    log = [json.loads(line) for line in open(planted / 'rm_checked' / 'log.jsonl')]
    evals = [r['val/word_check_accuracy'] for r in log if 'val/word_check_accuracy' in r]
    train = [r for r in log if 'train/word_check_loss' in r]
    # the untrained head is on one side of 0 for every check: the share of labels 1 (4 of 6)
    assert len(evals) == 3 and evals[-1] > evals[0] + 0.1, evals
    assert train[-1]['train/word_check_loss'] < train[0]['train/word_check_loss'] and \
        0 <= train[-1]['train/word_check_accuracy'] <= 1
    # the logged training loss is the pair loss alone, as val/loss is (one pair a step: -log sigmoid(margin))
    run_script('reward.py', '--init_from=base', '--out_dir=rm_checked1', '--prefs_dir=checked', '--max_iters=3',
               '--eval_interval=3', '--batch_size=1', '--n_fresh=0', '--score_reread=True', '--word_check_weight=1.0',
               *COMMON, cwd=planted)
    rows = [json.loads(line) for line in open(planted / 'rm_checked1' / 'log.jsonl') if 'train/loss' in line]
    assert len(rows) == 3 and all(r['train/word_check_loss'] > 0 for r in rows)
    for r in rows:
        pair = -torch.nn.functional.logsigmoid(torch.tensor(r['train/reward_margin'])).item()
        assert r['train/loss'] == pytest.approx(pair, rel=1e-4, abs=1e-5), r
    plain, negative, no_words = run_scripts([
        ('reward.py', ['--init_from=base', '--prefs_dir=checked', '--word_check_weight=1.0', '--device=cpu']),
        ('reward.py', ['--word_check_weight=-1.0']),
        ('reward.py', ['--init_from=base', '--prefs_dir=planted', '--word_check_weight=1.0', '--score_reread=True',
                       '--device=cpu'])], cwd=planted)
    assert plain.returncode and 'set score_reread=True' in plain.stderr, plain.stderr
    assert negative.returncode and 'word_check_weight=-1.0 must be 0 (off) or positive' in negative.stderr
    assert no_words.returncode and 'no training pair in planted has any' in no_words.stderr, no_words.stderr


def test_dpo_starts_at_log_2_and_falls(planted):
    run_script('dpo.py', '--init_from=base', '--out_dir=dpo', '--prefs_dir=planted', '--max_iters=30',
               '--eval_interval=15', '--batch_size=8', '--learning_rate=1e-3', '--eval_prompts=2', *COMMON,
               cwd=planted)
    rows = [json.loads(line) for line in open(planted / 'dpo' / 'log.jsonl')]
    evals = [r for r in rows if 'val/loss' in r]
    train = [r['train/loss'] for r in rows if 'train/loss' in r]
    assert evals[0]['val/loss'] == pytest.approx(math.log(2), abs=1e-5)   # policy == reference
    assert evals[0]['val/accuracy'] == 0.5                                # every pair a tie: half right
    assert train[0] == pytest.approx(math.log(2), abs=1e-5)
    assert evals[-1]['val/loss'] < 0.6 and evals[-1]['val/accuracy'] > 0.8   # from log 2 = 0.693
    last_train = [r for r in rows if 'train/loss' in r][-1]
    assert {'train/reward_margin', 'train/accuracy'} <= set(last_train) and 'task/score_greedy' in evals[-1]
    ckpt = load_checkpoint(str(planted / 'dpo'))
    assert ckpt['stage'] == 'dpo' and ckpt['reference'] == 'base'
    # an odd batch size: the reference passes over the held-out pairs in evaluation's own batches, so
    # the untrained policy ties on every pair (in batches of twice as many, padded longer, the
    # float32 sums differed in their last bits and decided ties: 0.4583)
    odd = run_script('dpo.py', '--init_from=base', '--out_dir=dpo_odd', '--prefs_dir=planted', '--eval_only=True',
                     '--batch_size=3', '--eval_prompts=0', *COMMON, cwd=planted)
    assert 'step 0: val/loss 0.6931, val/reward_margin 0.0000, val/accuracy 0.5000' in odd.stdout, odd.stdout[-800:]


def test_dpo_variants_ipo_and_an_sft_term(planted):
    """loss_type='ipo' starts at (0 - 1 / (2 beta))^2, the policy being its reference; sft_weight
    adds that many times the chosen answers' NLL per token (val/nll_chosen) to DPO's log 2."""
    args = ['--init_from=base', '--prefs_dir=planted', '--max_iters=2', '--eval_interval=2', '--batch_size=4',
            '--eval_prompts=0', *COMMON]
    ipo, rpo, bad, negative, no_task = run_scripts([
        ('dpo.py', ['--out_dir=ipo', '--loss_type=ipo', '--beta=0.2', *args, '--max_iters=12', '--eval_interval=12',
                    '--learning_rate=1e-3']),
        ('dpo.py', ['--out_dir=rpo', '--sft_weight=0.5', *args]),
        ('dpo.py', ['--loss_type=hinge', *args]),
        ('dpo.py', ['--sft_weight=-1.0', *args]),
        # a task folder without held-out prompts (prepare/chat.py's): no task score, as in sft.py
        ('dpo.py', ['--out_dir=no_task', *args, '--eval_prompts=2', '--task_dir=planted'])], cwd=planted)
    assert no_task.returncode == 0 and 'planted has no prompts_val.jsonl' in no_task.stdout, no_task.stderr[-500:]
    assert not any('task/score_greedy' in line for line in open(planted / 'no_task' / 'log.jsonl'))
    assert ipo.returncode == 0 and rpo.returncode == 0, ipo.stderr[-500:] + rpo.stderr[-500:]
    evals = {name: [json.loads(line) for line in open(planted / name / 'log.jsonl') if 'val/loss' in line]
             for name in ('ipo', 'rpo')}
    assert evals['ipo'][0]['val/loss'] == pytest.approx(1 / (2 * 0.2) ** 2, rel=1e-5)
    # trained, IPO prefers the chosen answers (a sign error would prefer the rejected ones) and its
    # loss falls from (0 - 1 / (2 beta))^2
    assert evals['ipo'][-1]['val/reward_margin'] > 0 and evals['ipo'][-1]['val/loss'] < evals['ipo'][0]['val/loss']
    first = evals['rpo'][0]
    assert first['val/nll_chosen'] > 0
    assert first['val/loss'] == pytest.approx(math.log(2) + 0.5 * first['val/nll_chosen'], rel=1e-5)
    assert bad.returncode and "loss_type='hinge'; valid: sigmoid, ipo" in bad.stderr, bad.stderr[-500:]
    assert negative.returncode and 'sft_weight=-1.0 must be 0 (DPO alone) or positive' in negative.stderr


def test_bad_settings(planted):
    loss, prefs, by, rm_block, dpo_block, pooling, dpo_short, speed, gap, no_answer, beta = run_scripts([
        ('reward.py', ['--loss_type=hinge']),
        ('dpo.py', ['--init_from=base', '--prefs_dir=nowhere', '--device=cpu']),
        ('reward.py', ['--batch_by=answer']),
        ('reward.py', ['--init_from=base', '--block_size=9999', '--device=cpu']),
        ('dpo.py', ['--init_from=base', '--block_size=9999', '--device=cpu']),
        ('reward.py', ['--score_pooling=max']),
        # answers start at token 27 to 29 with the template: the longest prompts leave none in 29 tokens
        ('dpo.py', ['--init_from=base', '--out_dir=dpo_short', '--prefs_dir=planted', '--block_size=28',
                    '--max_iters=1', '--eval_interval=1', '--batch_size=2', '--eval_prompts=0', *COMMON]),
        ('reward.py', ['--bias_update_speed=-0.001']),
        ('reward.py', ['--init_from=base', '--prefs_dir=planted', '--rule_gap_margin=1.0', '--device=cpu']),
        ('dpo.py', ['--init_from=base', '--prefs_dir=planted', '--block_size=12', '--device=cpu']),
        ('dpo.py', ['--init_from=base', '--prefs_dir=planted', '--beta=-0.1', '--device=cpu'])],
        cwd=planted)
    # a pair whose answers are cut away scored 0 against 0: a loss of log 2 and no gradient, trained on
    assert no_answer.returncode and ('error: no training pair keeps a token of both answers within block_size + 1 = '
                                     '13 tokens') in no_answer.stderr, no_answer.stderr[-500:]
    assert beta.returncode and 'beta=-0.1 must be positive' in beta.stderr, beta.stderr[-500:]
    assert gap.returncode and 'rule_gap_margin > 0 reads the rule scores of both answers' in gap.stderr, gap.stderr
    assert speed.returncode and 'bias_update_speed=-0.001 must be 0 (the biases as SFT left them) or positive' \
        in speed.stderr, speed.stderr
    assert dpo_short.returncode == 0 and 'longer than block_size + 1 = 29 tokens and were cut' in dpo_short.stdout, \
        dpo_short.stderr
    left_out = re.search(r'note: (\d+) of the 240 pairs are left out: an answer has no token within block_size \+ 1 = 29 tokens',
                         dpo_short.stdout)
    assert left_out and 0 < int(left_out.group(1)) < 240, dpo_short.stdout[-1000:]
    for p in (rm_block, dpo_block):
        assert p.returncode and 'block_size=9999 exceeds the context of' in p.stderr, p.stderr
    assert loss.returncode != 0 and "loss_type='hinge'; valid: bt, margin" in loss.stderr
    assert by.returncode != 0 and "batch_by='answer'; valid: pair, prompt" in by.stderr
    assert pooling.returncode != 0 and "score_pooling='max'; valid: last, last+mean" in pooling.stderr
    assert prefs.returncode != 0
    assert "'nowhere/prefs_train.jsonl' not found; run python prepare/preferences.py --init_from=out/sft (or set " \
           "prefs_dir=)" in prefs.stderr


def test_epochs_read_every_item_once_before_any_again_whatever_the_split_of_batches():
    """data.epoch_batch: 10 items in batches of 3 over two epochs: each epoch's 10 positions hold
    every item once, the two epochs differ in order, and a batch is a function of its number only
    (a resumed run reads the same)."""
    from data import epoch_batch
    stream = [i for k in range(7) for i in epoch_batch(10, 3, 1337, k)]          # 21 positions
    assert sorted(stream[:10]) == sorted(stream[10:20]) == list(range(10)) and stream[:10] != stream[10:20]
    assert epoch_batch(10, 3, 1337, 5) == stream[15:18] and epoch_batch(10, 3, 7, 0) != stream[:3]


def test_stages_on_padded_batches_leave_the_router_biases_as_they_were(planted):
    """reward.py and dpo.py from an MoE model: their padding would count as expert load, so the
    auxiliary-loss-free biases stay where pretraining left them (checkpoint.FROZEN_ROUTING) while
    the weights learn; the base model's own training moved them."""
    moe = ['--n_routed_experts=4', '--num_experts_per_tok=2', '--moe_intermediate_size=16', '--n_shared_experts=1',
           '--first_k_dense_replace=1', '--scoring_func=sigmoid', '--bias_update_speed=0.01']
    run_script('train.py', '--data_dir=data', '--out_dir=moe_base', *TINY_MODEL, *moe, '--block_size=256',
               '--max_iters=6', '--eval_interval=6', '--pos_emb=rope', cwd=planted)
    for script, extra in (('reward.py', ['--n_fresh=0']), ('dpo.py', ['--eval_prompts=0'])):
        out = f'moe_{script[:-3]}'
        run_script(script, '--init_from=moe_base', f'--out_dir={out}', '--prefs_dir=planted', '--max_iters=3',
                   '--eval_interval=3', '--batch_size=4', *extra, *COMMON, cwd=planted)
        before, after = (load_checkpoint(str(planted / d))['model'] for d in ('moe_base', out))
        bias = [k for k in before if k.endswith('e_score_correction_bias')]
        assert bias and before[bias[0]].abs().sum() > 0                       # train.py moved them
        assert all(torch.equal(before[k], after[k]) for k in bias), script
        assert not torch.equal(before['layers.1.mlp.router.weight'], after['layers.1.mlp.router.weight'])
    # the reward model's bias_update_speed > 0 keeps balancing the load: its biases move again
    run_script('reward.py', '--init_from=moe_base', '--out_dir=moe_reward_balanced', '--prefs_dir=planted',
               '--max_iters=3', '--eval_interval=3', '--batch_size=4', '--n_fresh=0', '--bias_update_speed=0.01',
               *COMMON, cwd=planted)
    after = load_checkpoint(str(planted / 'moe_reward_balanced'))['model']
    assert not any(torch.equal(before[k], after[k]) for k in bias)
    assert load_checkpoint(str(planted / 'moe_reward_balanced'))['model_config']['bias_update_speed'] == 0.01


def test_the_scalar_head_runs_in_float32_under_autocast():
    """Rewards are read in float32 even where the backbone runs in bf16: in bf16 a score near 2.5
    has steps of 1/64, and the two answers of a pair would often tie."""
    torch.manual_seed(0)
    model = ScalarModel(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    idx = torch.randint(0, 64, (2, 8))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        values = model.values(idx)
        h = model.norm(model.trunk(idx)[0])
    expected = (h.float() @ model.score_head.weight.float().T + model.score_head.bias).squeeze(-1)
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, expected, rtol=1e-6, atol=1e-6)


def test_score_pooling_adds_the_mean_over_the_sequence_and_ignores_padding():
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)
    last_only = ScalarModel(ModelConfig(**cfg)).eval()
    pooled = ScalarModel(ModelConfig(**cfg, score_pooling='last+mean')).eval()
    pooled.load_state_dict(last_only.state_dict())
    idx = torch.randint(0, 64, (2, 10))
    last = torch.tensor([9, 5])                      # the second row right-padded after position 5
    with torch.no_grad():
        v = last_only.values(idx)
        s_last, s_pooled = last_only(idx, last=last), pooled(idx, last=last)
        other_padding = pooled(torch.cat([idx[:, :6], torch.randint(0, 64, (2, 4))], 1), last=torch.tensor([5, 5]))
    torch.testing.assert_close(s_last, v[[0, 1], last])
    torch.testing.assert_close(s_pooled, v[[0, 1], last] + torch.stack([v[0].mean(), v[1, :6].mean()]))
    torch.testing.assert_close(other_padding[1], s_pooled[1])            # the padding is not read
    with pytest.raises(ValueError, match='score_pooling'):
        ModelConfig(**cfg, score_pooling='max')


def test_swapped_pairs_are_minimal_pairs_only_the_prompt_decides(tmp_path):
    """swap_pairs=1: for each training prompt, its best answer with one required word swapped for
    another word of the same list, in two pairs (the prompt prefers the answer, the swapped prompt
    the swapped answer), each labelled as the rule scores it; held-out pairs are never swapped."""
    rng = random.Random(3)
    rows = []
    for i in range(20):
        w = ['jump', 'dog', 'happy']
        chosen = f'The happy dog likes to jump. It ran home ({i}).'
        rejected = ' '.join(rng.choice(WORDS[1:]) for _ in range(8)) + '.'
        rows.append({'prompt': f'Write a story that uses the words: {", ".join(w)}. ({i})', 'chosen': chosen,
                     'rejected': rejected, 'words': w, 'features': {}})
    (tmp_path / 'src.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    p = run_script('prepare/preferences.py', '--source=src.jsonl', '--out_dir=sw', '--val_fraction=0.25',
                   '--swap_pairs=1', cwd=tmp_path)
    train = [json.loads(line) for line in open(tmp_path / 'sw' / 'prefs_train.jsonl')]
    val = [json.loads(line) for line in open(tmp_path / 'sw' / 'prefs_val.jsonl')]
    swaps = [r for r in train if r.get('swap')]
    assert len(swaps) == 2 * 15 and not any(r.get('swap') for r in val) and '30 of the pairs swapped' in p.stdout
    for r in swaps:
        assert score(r['chosen'], r['words'])['score'] - score(r['rejected'], r['words'])['score'] >= 0.1
        a, b = r['chosen'].split(), r['rejected'].split()
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1       # one word swapped
        mirror = [m for m in swaps if m['chosen'] == r['rejected'] and m['rejected'] == r['chosen']]
        assert len(mirror) == 1 and mirror[0]['prompt'] != r['prompt']
    bad = run_scripts([('prepare/preferences.py', ['--source=src.jsonl', '--out_dir=bad', '--swap_pairs=-1'])],
                      cwd=tmp_path)[0]
    assert bad.returncode and 'swap_pairs=-1 must be 0 (none) or a positive number' in bad.stderr
    assert not (tmp_path / 'bad').exists()


def test_reference_swaps_are_minimal_pairs_from_the_task_passages(tmp_path):
    """reference_swaps=N: N reference passages of sft_train.jsonl that ask only for list words give
    two mirrored swapped pairs each (the passage, which uses all its words, against itself with one
    of them swapped); passages asking for other words, and the held-out pairs' prompts, give none."""
    rows = [{'prompt': f'Write a story that uses the words: jump, dog, happy. ({i})',
             'chosen': f'The happy dog likes to jump ({i}).', 'rejected': 'Rain fell.', 'words': ['jump', 'dog', 'happy'],
             'features': {}} for i in range(8)]
    (tmp_path / 'src.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    task = tmp_path / 'task'
    task.mkdir()
    refs = [{'prompt': f'Write a story that uses the words: cat, tree, red. [{i}]', 'response':
             f'A red cat sat in a tree [{i}].', 'words': ['cat', 'tree', 'red'], 'features': {}} for i in range(10)]
    refs += [{'prompt': 'Write a story that uses the words: zeppelin, tree, red.', 'response': 'A red zeppelin.',
              'words': ['zeppelin', 'tree', 'red'], 'features': {}}]      # not all list words: never used
    refs += [{'prompt': r['prompt'], 'response': r['chosen'], 'words': r['words'], 'features': {}} for r in rows]
    (task / 'sft_train.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in refs))
    (task / 'meta.json').write_text('{}')
    p = run_script('prepare/preferences.py', '--source=src.jsonl', '--task_dir=task', '--out_dir=rs',
                   '--val_fraction=0.25', '--reference_swaps=100', cwd=tmp_path)
    train = [json.loads(line) for line in open(tmp_path / 'rs' / 'prefs_train.jsonl')]
    val = [json.loads(line) for line in open(tmp_path / 'rs' / 'prefs_val.jsonl')]
    made = [r for r in train if r.get('reference')]
    held_out = {r['prompt'] for r in val}
    # 10 + the 6 training pairs' passages (the 2 held-out prompts' are left out): 16 passages, 2 pairs each
    assert len(made) == 2 * 16 and 'made 16 passages' in p.stderr, p.stdout + p.stderr
    assert not held_out & {r['prompt'] for r in made} and all('zeppelin' not in r['chosen'] for r in made)
    for r in made:
        assert r['swap'] and score(r['chosen'], r['words'])['score'] - score(r['rejected'], r['words'])['score'] >= 0.1
        mirror = [m for m in made if m['chosen'] == r['rejected'] and m['rejected'] == r['chosen']]
        assert len(mirror) == 1 and mirror[0]['prompt'] != r['prompt']
    assert '32 swapped from reference passages' in p.stdout
    bad = run_scripts([('prepare/preferences.py', ['--source=src.jsonl', '--task_dir=task', '--out_dir=bad',
                                                   '--reference_swaps=-2'])], cwd=tmp_path)[0]
    assert bad.returncode and 'reference_swaps=-2 must be 0 (none) or a positive number' in bad.stderr
    assert not (tmp_path / 'bad').exists()


def test_a_pair_two_parts_of_the_rule_separate_equally_is_of_no_kind(pipeline):
    """A rejected answer that lacks a required word (0.2 of the score) and its ending (0.2) could be
    told from the chosen one by either: it is counted as neither a words nor an ending pair."""
    rows = []
    for i in range(8):
        w = ['cat', 'dog', 'sun']
        prompt = f'Write a story that uses the words: {", ".join(w)}. ({i})'
        story = 'the cat and the dog saw the sun in the park today.'
        rejected = {0: 'the cat and the dog saw a tree in the park and then',          # a word and the ending
                    1: 'the cat and the dog saw a tree in the park today.'}[i % 2]     # a word only
        rows.append({'prompt': prompt, 'chosen': story, 'rejected': rejected, 'words': w, 'features': {}})
    (pipeline / 'ties.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    run_script('prepare/preferences.py', '--source=ties.jsonl', '--out_dir=ties', '--val_fraction=0.5', cwd=pipeline)
    p = run_script('reward.py', '--init_from=base', '--out_dir=rm_ties', '--prefs_dir=ties', '--max_iters=1',
                   '--eval_interval=1', '--batch_size=2', '--n_fresh=0', *COMMON, cwd=pipeline)
    val = [json.loads(line) for line in open(pipeline / 'ties' / 'prefs_val.jsonl')]
    words_only = sum(r['rejected'].endswith('.') for r in val)
    assert 0 < words_only < len(val)
    assert f'held-out pairs by what separates them: words {words_only}, features 0, ending 0, repetition 0' in p.stdout


@pytest.mark.parametrize('script', ['reward.py', 'dpo.py'])
def test_reward_and_dpo_resume_continue_exactly(planted, script):
    """4 steps, then a resume to 8, log the losses of 8 straight steps: the epochs' batch order, the
    schedule, the optimizer state and the RNG all come back (the reward model reading the prompt
    again, its pairs by prompt)."""
    name = script[:-3]
    extra = (['--n_fresh=0', '--score_reread=True', '--batch_by=prompt', '--batch_size=2'] if script == 'reward.py'
             else ['--eval_prompts=0', '--batch_size=4', '--dropout=0.1'])
    args = ['--init_from=base', '--prefs_dir=planted', '--eval_interval=4', '--lr_decay_iters=8', *extra, *COMMON]
    run_script(script, f'--out_dir={name}_straight', *args, '--max_iters=8', cwd=planted)
    run_script(script, f'--out_dir={name}_split', *args, '--max_iters=4', cwd=planted)
    # the resume names only what changes: every other setting is the run's own, from its checkpoint
    p = run_script(script, f'--out_dir={name}_split', '--max_iters=8', '--init_from=resume',
                   *(['--score_reread=False'] if script == 'reward.py' else []), cwd=planted)
    assert f'resuming {name}_split with its own settings: ' in p.stdout and "prefs_dir='planted'" in p.stdout
    assert 'changed by this command: max_iters=8 (was 4)' in p.stdout
    if script == 'reward.py':   # how the score is read is the checkpoint's: said, and saved
        assert "keeps its score_pooling='last', score_reread=True" in p.stdout
        assert load_checkpoint(str(planted / f'{name}_split'))['config']['score_reread'] is True
    losses = [[r['train/loss'] for r in map(json.loads, open(planted / f'{name}_{run}' / 'log.jsonl'))
               if 'train/loss' in r] for run in ('straight', 'split')]
    assert losses[0] == losses[1] and len(losses[0]) == 8, losses
    a, b = (load_checkpoint(str(planted / f'{name}_{run}'))['model'] for run in ('straight', 'split'))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_greedy_pairs_also_under_prompts_whose_samples_tied_and_no_pair_of_one_text(tmp_path, monkeypatch):
    """prepare/preferences.py with scripted answers: where every sample of a prompt scores the same
    (all words used) but the greedy answer misses them, that prompt had no sampled pair, so its
    greedy pair (the most useful there is) was dropped; it now trains, outside the held-out split.
    At margin 0 an answer sampled twice is never chosen and rejected at once."""
    import runpy
    import sys as _sys
    import checkpoint
    import generate
    from task import make_prompt
    words = [['fox', 'key', 'door'], ['cat', 'ball', 'tree'], ['sun', 'hat', 'boat'], ['dog', 'cake', 'bird'],
             ['king', 'ring', 'road'], ['girl', 'box', 'hill']]
    prompts = [{'prompt': make_prompt(w, {}), 'words': w, 'features': {}} for w in words]
    (tmp_path / 'task').mkdir()
    (tmp_path / 'task' / 'prompts_train.jsonl').write_text(''.join(json.dumps(p) + '\n' for p in prompts))
    (tmp_path / 'task' / 'meta.json').write_text('{}')
    full = {p['prompt']: ' '.join(f'The {w} was here.' for w in p['words']) for p in prompts}
    tied = {p['prompt'] for p in prompts[3:]}       # three prompts: all samples equal, a greedy answer missing words
    def fake_generate_chat(model, tok, batch, max_new_tokens, temperature, **kw):
        seen = {}
        out = []
        for p in batch:
            seen[p] = seen.get(p, 0) + 1
            text = ('The end.' if p in tied else f'A {seen[p]} day.') if temperature == 0 else \
                full[p] if p in tied or seen[p] == 1 else 'The end.'
            out.append({'ids': [], 'text': text, 'ended': True})
        return out
    monkeypatch.setattr(checkpoint, 'load_chat_model', lambda *a, **k: (torch.nn.Linear(1, 1), with_chat_tokens(
        ByteTokenizer()), {'stage': 'sft'}))
    monkeypatch.setattr(generate, 'generate_chat', fake_generate_chat)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(_sys, 'argv', ['preferences.py', '--task_dir=task', '--out_dir=prefs', '--greedy_rejected=True',
                                       '--samples_per_prompt=3', '--margin=0.0', '--val_fraction=0.34',
                                       '--device=cpu'])
    runpy.run_path(os.path.join(REPO, 'prepare', 'preferences.py'), run_name='__main__')
    files = {s: [json.loads(line) for line in open(tmp_path / 'prefs' / f'prefs_{s}.jsonl')] for s in ('train', 'val')}
    assert all(r['chosen'] != r['rejected'] for r in files['train'] + files['val'])
    sampled_prompts = {r['prompt'] for r in files['train'] + files['val'] if not r.get('greedy')}
    assert sampled_prompts == {p['prompt'] for p in prompts[:3]}        # the tied prompts made none
    greedy = {r['prompt'] for r in files['train'] if r.get('greedy')}
    assert tied <= greedy and not greedy & {r['prompt'] for r in files['val']}
    monkeypatch.setattr(_sys, 'argv', ['preferences.py', '--task_dir=task', '--margin=-1.0'])
    with pytest.raises(SystemExit, match='margin=-1.0 must be 0 or positive'):
        runpy.run_path(os.path.join(REPO, 'prepare', 'preferences.py'), run_name='__main__')


def test_reward_and_dpo_count_no_flops_for_the_mtp_modules_they_do_not_run(planted):
    """A forward without targets runs no MTP module, so the MFU of reward.py and dpo.py counts the
    main model alone: logged mfu x peak / tokens_per_sec is that model's FLOPs per token."""
    run_script('train.py', '--data_dir=data', '--out_dir=mtp_base', *TINY_MODEL, '--mtp_depth=1', '--block_size=256',
               '--max_iters=2', '--eval_interval=2', '--pos_emb=rope', cwd=planted)
    cfg = ModelConfig(**load_checkpoint(str(planted / 'mtp_base'))['model_config'])
    for script, extra in (('reward.py', ['--n_fresh=0']), ('dpo.py', ['--eval_prompts=0'])):
        out = f'mtp_{script[:-3]}'
        run_script(script, '--init_from=mtp_base', f'--out_dir={out}', '--prefs_dir=planted', '--max_iters=2',
                   '--eval_interval=2', '--batch_size=4', *extra, *COMMON, cwd=planted)
        row = next(r for r in map(json.loads, open(planted / out / 'log.jsonl')) if 'mfu' in r)
        model = (ScalarModel if script == 'reward.py' else GPT)(cfg)
        expected = model.flops_per_token(cfg.block_size, mtp=False)
        assert expected < GPT(cfg).flops_per_token(cfg.block_size)         # the MTP module's share is left out
        assert row['mfu'] * 1e12 / row['tokens_per_sec'] == pytest.approx(expected, rel=1e-6), script


def test_dpo_logs_the_whole_steps_implicit_rewards_under_accumulation(planted):
    """With gradient_accumulation_steps=2 the logged implicit rewards, accuracy and nll_chosen are
    the step's (both micro-batches'), as one batch of twice the size logs them: the same pairs,
    the same update (they were the last micro-batch's alone)."""
    rows = {}
    for accumulation, batch in ((1, 8), (2, 4)):
        out = f'dpo_acc{accumulation}'
        run_script('dpo.py', '--init_from=base', f'--out_dir={out}', '--prefs_dir=planted', '--max_iters=3',
                   '--eval_interval=3', f'--batch_size={batch}', f'--gradient_accumulation_steps={accumulation}',
                   '--learning_rate=1e-3', '--eval_prompts=0', '--dropout=0.0', *COMMON, cwd=planted)
        rows[accumulation] = [r for r in map(json.loads, open(planted / out / 'log.jsonl')) if 'train/loss' in r]
    for one, two in zip(rows[1][1:], rows[2][1:]):                 # after the first update: margins apart from 0
        assert one['train/reward_margin'] != 0
        for key in ('train/loss', 'train/reward_margin', 'train/reward_chosen', 'train/reward_rejected',
                    'train/nll_chosen', 'train/accuracy'):
            assert two[key] == pytest.approx(one[key], rel=1e-3, abs=1e-5), key
