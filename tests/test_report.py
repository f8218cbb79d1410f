"""report.py: the report card of a speedrun, read from the folders its stages wrote (a tiny
pretrained model and its SFT model here; speedrun.sh --profile=cpu runs every stage in CI)."""

import json
import math
import os
import shutil
import statistics
import subprocess

import pytest

from conftest import run_script
from task import make_prompt, score as rule_score


def test_report_card_rows_targets_samples_and_plots(pipeline):
    out = pipeline / 'speedrun'
    out.mkdir(exist_ok=True)
    if not (pipeline / 'sft_report').exists():
        run_script('sft.py', '--init_from=base', '--out_dir=sft_report', '--task_dir=inst', '--max_iters=4',
                   '--eval_interval=4', '--batch_size=4', '--block_size=96', '--eval_prompts=2', '--max_new_tokens=8',
                   '--compile=False', '--device=cpu', '--peak_flops=1e12', cwd=pipeline)
    for name, src in (('base', 'base'), ('sft', 'sft_report'), ('data', 'data')):
        if not (out / name).exists():
            os.symlink(pipeline / src, out / name)
    # a reward model on 20 external pairs (5 held out): its target row names how many pairs it saw,
    # and how often its head's checks of the prompt's words were right (word_check_weight)
    words = ['cat', 'ran', 'home']        # (the words separate them most, and far: 1.0 against 0.4, a clear pair)
    pairs = [{'prompt': f'{make_prompt(words)} Use at most {5 * (i + 1)} sentences.', 'chosen': 'The cat ran home.',
              'rejected': 'cat cat cat',
              'words': words, 'chosen_score': rule_score('The cat ran home.', words)['score'],
              'rejected_score': rule_score('cat cat cat', words)['score']} for i in range(20)]
    (pipeline / 'report_pairs.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in pairs))
    run_script('prepare/preferences.py', '--source=report_pairs.jsonl', '--out_dir=speedrun/prefs',
               '--val_fraction=0.25', cwd=pipeline)
    run_script('reward.py', '--init_from=speedrun/sft', '--out_dir=speedrun/reward', '--prefs_dir=speedrun/prefs',
               '--task_dir=inst', '--max_iters=2', '--eval_interval=2', '--batch_size=4', '--n_fresh=2',
               '--max_new_tokens=8', '--compile=False', '--device=cpu', '--peak_flops=1e12', '--score_reread=True',
               '--word_check_weight=1.0', cwd=pipeline)
    for name in ('base', 'sft'):
        run_script('eval.py', f'--out_dir=speedrun/{name}', '--task_dir=inst', '--eval_iters=2', '--n_prompts=3',
                   '--max_new_tokens=8', '--sample_tokens=6', '--device=cpu', cwd=pipeline)
    # the SFT model's greedy answers again with a frequency penalty (no val loss: eval_iters 0), in a
    # file of their own beside eval.json, which stays as it was
    before = (out / 'sft' / 'eval.json').read_text()
    run_script('eval.py', '--out_dir=speedrun/sft', '--task_dir=inst', '--eval_iters=0', '--n_prompts=3',
               '--max_new_tokens=8', '--sample_tokens=6', '--device=cpu', '--frequency_penalty=2',
               '--sampled_score=False', cwd=pipeline)
    assert (out / 'sft' / 'eval.json').read_text() == before
    pen = json.loads((out / 'sft' / 'eval_fp2_pp0.json').read_text())
    assert pen['val/loss'] is None and pen['frequency_penalty'] == 2 and 0 <= pen['task/score'] <= 1
    assert len((out / 'sft' / 'eval_answers_fp2_pp0.jsonl').read_text().splitlines()) == 3
    (out / 'ppo').mkdir(exist_ok=True)            # a stage whose eval.json is missing: its target is unknown
    if not (out / 'ppo' / 'ckpt.pt').exists():
        os.symlink(pipeline / 'sft_report' / 'ckpt.pt', out / 'ppo' / 'ckpt.pt')
    (out / 'grpo').mkdir(exist_ok=True)           # a stage that scores as SFT does: a gain of +0.000, missed
    if not (out / 'grpo' / 'ckpt.pt').exists():
        os.symlink(pipeline / 'sft_report' / 'ckpt.pt', out / 'grpo' / 'ckpt.pt')
    shutil.copy(out / 'sft' / 'eval.json', out / 'grpo' / 'eval.json')
    shutil.copy(out / 'sft' / 'eval_answers.jsonl', out / 'grpo' / 'eval_answers.jsonl')
    # (train run twice: the report takes its last run's time)
    (out / 'times.tsv').write_text('train\t30\nsft\t5\neval_base\t3\ntrain\t12\nprefs\t4\n')
    (out / 'wall.tsv').write_text('wall\t9\n')          # stages side by side: less wall time than their sum
    p = run_script('report.py', '--out=speedrun', '--profile=test', cwd=pipeline)
    md = (out / 'report.md').read_text()
    assert '# Report card: the life cycle on stories (test profile)' in md
    assert '| base | 12 s | 60 |' in md and '| sft | 5 s | 4 |' in md
    assert md.index('| sft | 5 s |') < md.index('| prefs | 4 s |') < md.index('| reward')     # in the order they ran
    assert '## Targets' in p.stdout and '## Samples' not in p.stdout     # the screen: the tables, the targets last
    assert '| SFT: all required words used (greedy, held-out prompts) |' in md and '>= 90.0%' in md
    assert '| PPO: task reward above SFT (greedy, held-out prompts) | - | > 0 | unknown |' in md
    assert '| GRPO: task reward above SFT (greedy, held-out prompts) | +0.000 | > 0 | **no** | +0.000 |' in md   # score points
    # each target says by how much it was met or missed, a share's in percentage points, with its
    # standard error where its sample gives one (SFT's: binomial over the prompts eval.py answered)
    v = json.loads((out / 'sft' / 'eval.json').read_text())['task/all_words']
    se = math.sqrt(v * (1 - v) / 3)
    margin = f"{100 * (v - 0.9):+.1f} points" + (f" (standard error {100 * se:.1f})" if se else '')
    assert f"| {'yes' if v >= 0.9 else '**no**'} | {margin} | the base model with the template: " in md, margin
    assert '| target | value | goal | met | by how much | how |' in md
    assert '(per prompt: +0.000 ± 0.000, its standard error over 3 prompts)' in md    # the same answers
    # beside the greedy answers, one sampled at temperature 1 per prompt (seeded), scored the same way
    ev = json.loads((out / 'sft' / 'eval.json').read_text())
    assert 0 <= ev['task/score_sampled'] <= 1 and 0 <= ev['task/all_words_sampled'] <= 1
    assert '| task score | task score, sampled | all words |' in md
    assert f"on answers sampled at temperature 1: {ev['task/score_sampled']:.3f} vs {ev['task/score_sampled']:.3f}" in md
    assert 'the 1st / 2nd / 3rd listed word used in' in md         # which word the answers drop
    # the penalized answers: their own table (the change of the score paired over the prompts) and
    # their all-words rate beside the SFT target's greedy one
    ev = json.loads((out / 'sft' / 'eval.json').read_text())
    answers = [json.loads(line) for line in (out / 'sft' / 'eval_answers.jsonl').read_text().splitlines()]
    answers_pen = [json.loads(line) for line in (out / 'sft' / 'eval_answers_fp2_pp0.jsonl').read_text().splitlines()]
    d = [b['score'] - a['score'] for a, b in zip(answers, answers_pen)]
    assert '### The same greedy answers with a frequency penalty' in md
    assert (f"| sft | 2 / 0 | {ev['task/score']:.3f} -> {pen['task/score']:.3f} | "
            f"{statistics.mean(d):+.3f} ± {statistics.stdev(d) / 3 ** 0.5:.3f} | ") in md
    assert f"greedy with a frequency penalty of 2: {100 * pen['task/all_words']:.1f}%; over 3 prompts |" in md
    answers = [json.loads(line) for line in (out / 'sft' / 'eval_answers.jsonl').read_text().splitlines()]
    assert len(answers) == 3 and {'prompt', 'words', 'answer', 'score', 'used', 'words_share'} <= set(answers[0])
    for a in answers:                                  # the prompt's words, and which of them the answer used
        assert all(w in a['prompt'] for w in a['words']) and len(a['used']) == len(a['words'])
    assert 'reward.py val/accuracy at its last evaluation, on 5 held-out pairs (15 for training; held out by prompt' in md
    assert '; by the part of the rule that separates the pair most: words ' in md and '% of 5;' in md
    assert "; by the gap between the two answers' rule scores: clear (>= 0.4) " in md and '% of 5;' in md
    checked = [json.loads(line) for line in (out / 'reward' / 'log.jsonl').read_text().splitlines()][-1]
    assert (f"; the head's word checks right for {100 * checked['val/word_check_accuracy']:.1f}% of the required "
            'words |') in md
    acc = checked['val/accuracy']              # and its binomial standard error over the 5 held-out pairs
    assert f"all from training books), its standard error {100 * math.sqrt(acc * (1 - acc) / 5):.1f}%;" in md
    target = next(c for c in json.loads((out / 'report.json').read_text())['targets'] if c['target'].startswith('Reward'))
    assert math.isclose(target['margin'], acc - 0.9) and math.isclose(target['standard_error'], math.sqrt(acc * (1 - acc) / 5))
    assert '### sft: answers to held-out prompts' in md
    assert '### base: continuations of openings (as a language model)' in md
    assert '![losses](report_losses.png)' in md and (out / 'report_losses.png').stat().st_size > 0
    report = json.loads((out / 'report.json').read_text())
    assert report['stages']['base']['tokens'] > 0 and report['total_time_s'] == 24 and report['wall_time_s'] == 9
    # the reward model's held-out accuracy at each evaluation (steps 0 and 2), as its plot draws it
    logged = [json.loads(line) for line in (out / 'reward' / 'log.jsonl').read_text().splitlines()]
    assert report['stages']['reward']['accuracy_curve'] == [[r['step'], r['val/accuracy']] for r in logged
                                                            if 'val/accuracy' in r]
    assert [s for s, _ in report['stages']['reward']['accuracy_curve']] == [0, 2]
    assert '0.4 minutes of stages in all, 0.1 minutes of wall time' in md
    assert len(report['stages']['base']['continuations']) == 5 and 'wrote speedrun/report.md' in p.stdout
    # parameters counted once each: the tied embedding is also the output layer, not a second matrix
    assert report['stages']['base']['params'] == json.loads((out / 'base' / 'eval.json').read_text())['params']
    # the DPO seeds' spread is their sample standard deviation
    for seed, score in ((1, 0.60), (2, 0.58), (3, 0.61)):
        (out / f'dpo_seed{seed}').mkdir(exist_ok=True)
        if not (out / f'dpo_seed{seed}' / 'ckpt.pt').exists():
            os.symlink(pipeline / 'sft_report' / 'ckpt.pt', out / f'dpo_seed{seed}' / 'ckpt.pt')
        ev = json.loads((out / 'sft' / 'eval.json').read_text())
        ev['task/score'] = score
        (out / f'dpo_seed{seed}' / 'eval.json').write_text(json.dumps(ev))
        if seed == 1:               # one seed has no spread: the goal says so
            run_script('report.py', '--out=speedrun', '--profile=test', cwd=pipeline)
            assert '| > the spread of 2 or more seeds (1 ran) | unknown |' in (out / 'report.md').read_text()
    # GRPO ahead of SFT on one prompt of three by 0.3: a gain of 0.1 and its paired standard error
    # (0.3, 0, 0: sample std 0.173 over sqrt(3)), beside the margin
    answers = [json.loads(line) for line in (out / 'grpo' / 'eval_answers.jsonl').read_text().splitlines()]
    answers[0]['score'] += 0.3
    (out / 'grpo' / 'eval_answers.jsonl').write_text(''.join(json.dumps(a) + '\n' for a in answers))
    ev = json.loads((out / 'sft' / 'eval.json').read_text())
    ev['task/score'] += 0.1
    (out / 'grpo' / 'eval.json').write_text(json.dumps(ev))
    run_script('report.py', '--out=speedrun', '--profile=test', cwd=pipeline)
    assert f'> spread {statistics.stdev([0.60, 0.58, 0.61]):.3f} (3 seeds)' in (out / 'report.md').read_text()
    assert ('| GRPO: task reward above SFT (greedy, held-out prompts) | +0.100 | > 0 | yes | +0.100 (standard error '
            '0.100) |') in (out / 'report.md').read_text()
    # a run cut before eval.py reached PPO: its row and target come from PPO's own held-out evaluation
    # in its log (the latest of each value), marked as such
    rows = [{'step': 10, 'task/score_greedy': 0.5, 'task/all_words_greedy': 0.25}, {'step': 12, 'train/loss': 1.0},
            {'step': 20, 'task/score_greedy': 0.95, 'task/all_words_greedy': 0.75}]
    (out / 'ppo' / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    run_script('report.py', '--out=speedrun', '--profile=test', cwd=pipeline)
    md = (out / 'report.md').read_text()
    assert '| ppo † |' in md and '| 0.950 |' in md and '| 75.0% |' in md and "† eval.py did not evaluate" in md
    # its target compares it with SFT's own last evaluation in SFT's log, on the same first
    # eval_prompts prompts, not with eval.py's score of SFT (other prompts)
    sft_logged = [json.loads(line) for line in (out / 'sft' / 'log.jsonl').read_text().splitlines()]
    sft_score = [r for r in sft_logged if 'task/score_greedy' in r][-1]['task/score_greedy']
    assert sft_score != json.loads((out / 'sft' / 'eval.json').read_text())['task/score']   # (a test that can fail)
    assert f'| PPO: task reward above SFT (greedy, held-out prompts) | {0.95 - sft_score:+.3f} | > 0 |' in md
    assert "all from the stages' training logs (eval.py did not evaluate all of them), each on the same first 2" in md
    # DPO's seeds cut before eval.py likewise: their scores and SFT's all from the logs
    for i, x in enumerate((0.7, 0.75, 0.8)):
        (out / f'dpo_seed{i + 1}').mkdir(exist_ok=True)
        if not (out / f'dpo_seed{i + 1}' / 'ckpt.pt').exists():
            os.symlink(pipeline / 'sft_report' / 'ckpt.pt', out / f'dpo_seed{i + 1}' / 'ckpt.pt')
        (out / f'dpo_seed{i + 1}' / 'eval.json').unlink(missing_ok=True)
        (out / f'dpo_seed{i + 1}' / 'log.jsonl').write_text(json.dumps({'step': 5, 'task/score_greedy': x}) + '\n')
    run_script('report.py', '--out=speedrun', '--profile=test', cwd=pipeline)
    md = (out / 'report.md').read_text()
    assert (f'| DPO: task score above SFT by more than the seed spread | {0.75 - sft_score:+.3f} | > spread 0.050 '
            f'(3 seeds) |') in md
    # where a stage's own evaluations answered another number of prompts, the two are not compared
    import torch
    ckpt = torch.load(out / 'ppo' / 'ckpt.pt', map_location='cpu', weights_only=True)
    ckpt['config']['eval_prompts'] = 5
    (out / 'ppo' / 'ckpt.pt').unlink()
    torch.save(ckpt, out / 'ppo' / 'ckpt.pt')
    run_script('report.py', '--out=speedrun', '--profile=test', cwd=pipeline)
    md = (out / 'report.md').read_text()
    assert '| PPO: task reward above SFT (greedy, held-out prompts) | - | > 0 | unknown |' in md
    assert 'their own evaluations used different prompts (eval_prompts 2, 5)' in md
    # and where eval.py evaluated none of them, the same holds: different prompts are not compared
    grpo_eval = (out / 'grpo' / 'eval.json').read_text()
    (out / 'grpo' / 'eval.json').unlink()
    (out / 'grpo' / 'log.jsonl').write_text(json.dumps({'step': 3, 'task/score_greedy': 0.9}) + '\n')
    ckpt['config']['eval_prompts'], ckpt['config']['max_new_tokens'] = 2, ckpt['config']['max_new_tokens'] + 1
    (out / 'grpo' / 'ckpt.pt').unlink()
    torch.save(ckpt, out / 'grpo' / 'ckpt.pt')
    (out / 'sft' / 'eval.json').rename(out / 'sft' / 'eval.json.kept')
    run_script('report.py', '--out=speedrun', '--profile=test', cwd=pipeline)
    md = (out / 'report.md').read_text()
    (out / 'sft' / 'eval.json.kept').rename(out / 'sft' / 'eval.json')
    (out / 'grpo' / 'eval.json').write_text(grpo_eval)
    (out / 'grpo' / 'log.jsonl').unlink()
    assert '| GRPO: task reward above SFT (greedy, held-out prompts) | - | > 0 | unknown |' in md
    assert ('not compared: eval.py evaluated none of them, and their own evaluations used different answer '
            'lengths (max_new_tokens') in md
    for i in range(3):
        shutil.rmtree(out / f'dpo_seed{i + 1}')
    assert 'smoke test' not in md
    # students cut before eval.py (from their logs) and a teacher evaluated by eval.py (other batches):
    # the share of the gap comes from the logs alone, the teacher's as distill.py measured it
    for name, row in (('student_scratch', {'step': 10, 'val/loss': 5.0}),
                      ('student_distill', {'step': 10, 'val/loss': 4.5, 'val/teacher_loss': 4.0})):
        (out / name).mkdir(exist_ok=True)
        if not (out / name / 'ckpt.pt').exists():
            os.symlink(pipeline / 'base' / 'ckpt.pt', out / name / 'ckpt.pt')
        (out / name / 'log.jsonl').write_text(json.dumps(row) + '\n')
    run_script('report.py', '--out=speedrun', '--profile=test', cwd=pipeline)
    md = (out / 'report.md').read_text()
    assert "| Distillation: share of the scratch student -> teacher val-loss gap closed | 50.0% |" in md
    assert "all three from the students' training logs" in md
    # a distilled student from the teacher's embeddings: the scratch student from that start
    # (student_embed) is read as the three are, from its log (4.75), not from its eval.json (other batches)
    ckpt = torch.load(pipeline / 'base' / 'ckpt.pt', map_location='cpu', weights_only=True)
    ckpt['config']['init_embedding'] = 'teacher'
    (out / 'student_distill' / 'ckpt.pt').unlink()
    torch.save(ckpt, out / 'student_distill' / 'ckpt.pt')
    (out / 'student_embed').mkdir()
    os.symlink(pipeline / 'base' / 'ckpt.pt', out / 'student_embed' / 'ckpt.pt')
    (out / 'student_embed' / 'log.jsonl').write_text(json.dumps({'step': 10, 'val/loss': 4.75}) + '\n')
    (out / 'student_embed' / 'eval.json').write_text(json.dumps({'val/loss': 4.6}))
    run_script('report.py', '--out=speedrun', '--profile=test', cwd=pipeline)
    md = (out / 'report.md').read_text()
    assert 'it reaches 4.750, so distillation itself closes 33.3% of the gap from there' in md
    # a student whose model cannot be built again (its config lacks a field): its size is unknown, and
    # so is the target, not met at "0.0% of the teacher's"
    del ckpt['config']['n_layer']
    (out / 'student_distill' / 'ckpt.pt').unlink()
    torch.save(ckpt, out / 'student_distill' / 'ckpt.pt')
    run_script('report.py', '--out=speedrun', '--profile=test', cwd=pipeline)
    md = (out / 'report.md').read_text()
    assert "| Distillation: share of the scratch student -> teacher val-loss gap closed | 50.0% |" in md
    row = next(line for line in md.splitlines() if line.startswith('| Distillation'))
    assert "| unknown |" in row and "student active parameters unknown of the teacher's" in row
    shutil.rmtree(out / 'student_embed')
    run_script('report.py', '--out=speedrun', '--profile=cpu', cwd=pipeline)     # the cpu card says what it is
    assert 'The cpu profile is a smoke test of the plumbing' in (out / 'report.md').read_text()
    assert '| sft |' in md and '| sft † |' not in md           # evaluated stages keep eval.py's values
    (out / 'ppo' / 'log.jsonl').unlink()


def test_speedrun_dry_run_prints_every_stage_command_and_runs_nothing(tmp_path):
    """--dry_run: one line per stage, NAME: its full command with the profile's settings and the
    environment's <NAME>_EXTRA (what a stage run alone takes), in order; no folder is written."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run(['bash', 'speedrun.sh', '--profile=cpu', f'--out={tmp_path}/run', '--dry_run'], cwd=repo,
                       env=dict(os.environ, DPO_EXTRA='--beta=0.2'), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith('export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COALESCE_TILING_ANALYSIS=0 ')   # as the stages run
    names = [line.split(':')[0] for line in lines[1:]]
    assert names[:5] == ['prepare', 'train', 'sft', 'prefs', 'reward'] and names[-1] == 'report'
    assert {'dpo_seed1', 'ppo', 'grpo', 'student_scratch', 'student_distill', 'eval_sft'} <= set(names)
    dpo = next(line for line in p.stdout.splitlines() if line.startswith('dpo_seed1: '))
    assert f'python dpo.py --init_from={tmp_path}/run/sft ' in dpo
    assert '--beta=0.2' in dpo and '--device=cpu' in dpo
    assert not (tmp_path / 'run').exists()
    # the GPU profile's DPO adds RPO's NLL term at weight 1 (DPO_EXTRA, after it, can take it out)
    gpu = subprocess.run(['bash', 'speedrun.sh', '--profile=gpu', f'--out={tmp_path}/gpu', '--dry_run'], cwd=repo,
                         env=dict(os.environ, DPO_EXTRA='--sft_weight=0'), capture_output=True, text=True, timeout=60)
    dpo = next(line for line in gpu.stdout.splitlines() if line.startswith('dpo_seed1: '))
    assert dpo.endswith('--sft_weight=1.0 --sft_weight=0') and '--sft_weight=1.0' not in p.stdout


FAKE_PYTHON = """#!/usr/bin/env bash
# python for speedrun.sh's stages: logs when each stage script starts and ends, and writes the
# files that mark it done. The distillation ends only once the reward model has started (or a
# stage failed): if it held up the phases after SFT, it would wait 30 s and end before reward
# starts. FAIL names a script that fails. With SFT_WAITS, SFT ends only once the distillation has
# started (it would wait 30 s and end first if the distillation did not start beside it), so how
# fast the machine starts the two cannot decide the order the test reads.
[ "$1" = -c ] && exec {python} "$@"
script=$1; shift; out=''
for a in "$@"; do case $a in --out_dir=*|--out=*) out=${{a#*=}} ;; esac; done
echo "start $script $out" >> {log}
[ "$script" = reward.py ] && touch {marks}/reward_started
[ "$script" = distill.py ] && touch {marks}/distill_started
if [ "$script" = sft.py ] && [ -n "$SFT_WAITS" ]; then
  for i in $(seq 300); do [ -e {marks}/distill_started ] && break; sleep 0.1; done
fi
[ "$script" = "$FAIL" ] && {{ touch {marks}/failed; exit 1; }}
if [ "$script" = distill.py ]; then
  for i in $(seq 300); do [ -e {marks}/reward_started ] || [ -e {marks}/failed ] && break; sleep 0.1; done
fi
mkdir -p $out && touch $out/ckpt.pt $out/meta.json $out/prefs_val.jsonl $out/eval.json $out/eval_fp0.5_pp0.json
echo "end $script $out" >> {log}
"""


def stub_python(tmp_path, exit_code):
    """An environment whose `python` runs no stage: each stage script exits with exit_code at once
    (`python -c` still runs), for tests that read what speedrun.sh prints and decides, not what
    the stages do; a real stage would spend seconds importing torch to fail or to do work the
    test does not read."""
    import sys
    (tmp_path / 'stub_bin').mkdir(exist_ok=True)
    (tmp_path / 'stub_bin' / 'python').write_text(f'#!/usr/bin/env bash\n[ "$1" = -c ] && exec {sys.executable} "$@"\n'
                                                  f'exit {exit_code}\n')
    (tmp_path / 'stub_bin' / 'python').chmod(0o755)
    return dict(os.environ, PATH=f"{tmp_path / 'stub_bin'}:{os.environ['PATH']}")


def test_speedrun_runs_the_distilled_student_beside_the_stages_after_sft(tmp_path):
    """--parallel=1: the distilled student starts with SFT and runs beside the post-training
    phases (it needs only the base model, and only eval needs it), so it does not hold them up;
    it is evaluated once it has finished. A phase that fails lets it finish, then the run stops;
    if it fails itself, the other runs are still evaluated and the card written, and the run
    ends with an error that says so."""
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / 'bin').mkdir()
    log = tmp_path / 'stages.log'
    (tmp_path / 'bin' / 'python').write_text(FAKE_PYTHON.format(python=sys.executable, log=log, marks=tmp_path))
    (tmp_path / 'bin' / 'python').chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")

    def speedrun(out, fail=''):
        for mark in ('reward_started', 'distill_started', 'failed', 'stages.log'):
            (tmp_path / mark).unlink(missing_ok=True)
        p = subprocess.run(['bash', 'speedrun.sh', '--profile=cpu', f'--out={tmp_path}/{out}', '--parallel=1'],
                           cwd=repo, env=dict(env, FAIL=fail, SFT_WAITS='1'), capture_output=True, text=True,
                           timeout=120)
        events = [tuple(line.split()[:2]) + (os.path.basename(line.split()[2]),) for line in log.read_text().splitlines()]
        return p, events

    p, events = speedrun('run')
    assert p.returncode == 0, p.stdout + p.stderr
    at = {e: i for i, e in enumerate(events)}
    distill_end = at['end', 'distill.py', 'student_distill']
    assert at['start', 'distill.py', 'student_distill'] < at['end', 'sft.py', 'sft']              # with SFT
    assert at['start', 'reward.py', 'reward'] < distill_end and at['start', 'ppo.py', 'ppo'] < distill_end
    assert distill_end < at['start', 'eval.py', 'student_distill'] < at['start', 'report.py', 'run']
    assert at['start', 'report.py', 'run'] == len(events) - 2                                      # the report last
    p, events = speedrun('stopped', fail='ppo.py')            # a phase fails: the student finishes, then the stop
    assert p.returncode == 1 and 'error: stage ppo failed' in p.stdout, p.stdout
    assert 'waiting for it to finish' in p.stdout and events[-1][:2] == ('end', 'distill.py')
    assert ('start', 'dpo.py', 'dpo_seed1') not in events
    p, events = speedrun('no_student', fail='distill.py')     # the student fails: the rest goes on
    assert p.returncode == 1, p.stdout
    assert 'error: student_distill (run beside the phases after SFT) failed: see ' in p.stdout
    assert ('start', 'report.py', 'no_student') in events and ('end', 'eval.py', 'grpo') in events
    assert ('start', 'eval.py', 'student_distill') not in events


@pytest.mark.parametrize('parallel', [0, 1])
@pytest.mark.parametrize('how', ['ctrl-c', 'kill', 'hangup'])
def test_speedrun_stopped_stops_the_stages_it_started(tmp_path, how, parallel):
    """Ctrl-C (to the whole process group, as a terminal sends it) or a kill (to the script alone),
    with the stages side by side or one at a time: every stage it started stops too, and it says
    how to go on. Ctrl-C reaches the stages as Ctrl-C (PPO's stand-in, a python that runs for a
    minute, saves and stops as training.Run does; GRPO's, a plain python, stops at once); a stage
    that goes on (the distillation's stand-in ignores Ctrl-C) stops at a second Ctrl-C. A kill
    or a hangup (the terminal closed) stops them at once."""
    import contextlib
    import signal
    import sys
    import time
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / 'bin').mkdir()
    log = tmp_path / 'stages.log'
    # PPO runs for a minute and stops on Ctrl-C as training.Run does: it saves, says so, exits 130
    ppo = ("import signal, sys, time\n"
           "def stop(*_):\n"
           f"    open('{log}', 'a').write('saved and stopped ppo.py\\n')\n"
           "    sys.exit(130)\n"
           "signal.signal(signal.SIGINT, stop)\n"
           "time.sleep(60)\n")
    (tmp_path / 'ppo_stand_in.py').write_text(ppo)
    (tmp_path / 'grpo_stand_in.py').write_text('import time\ntime.sleep(60)\n')    # a python as it comes
    stand_in = FAKE_PYTHON.format(python=sys.executable, log=log, marks=tmp_path).replace(
        'mkdir -p $out', f'[ "$script" = ppo.py ] && exec {sys.executable} {tmp_path}/ppo_stand_in.py ppo.py\n'
                         f'[ "$script" = grpo.py ] && exec {sys.executable} {tmp_path}/grpo_stand_in.py grpo.py\n'
                         'mkdir -p $out').replace(   # and the distillation's (a shell loop) ignores Ctrl-C
        'if [ "$script" = distill.py ]; then', 'if [ "$script" = distill.py ]; then\n  trap "" INT')
    (tmp_path / 'bin' / 'python').write_text(stand_in)
    (tmp_path / 'bin' / 'python').chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    # a session of its own, as a terminal gives a command: Ctrl-C goes to its whole process group
    p = subprocess.Popen(['bash', 'speedrun.sh', '--profile=cpu', f'--out={tmp_path}/run', f'--parallel={parallel}'], cwd=repo,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for _ in range(600):
        if log.exists() and 'start ppo.py' in log.read_text():
            break
        time.sleep(0.1)
    time.sleep(0.5)

    def stand_ins():
        ps = subprocess.run(['ps', '-A', '-ww', '-o', 'pid=', '-o', 'args='], capture_output=True, text=True).stdout
        return [line for line in ps.splitlines() if str(tmp_path) in line]     # stages, and speedrun.sh's shells

    assert any('ppo.py' in line for line in stand_ins()), log.read_text()
    if how == 'ctrl-c':
        os.killpg(p.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)
        # a python stage stops at the first Ctrl-C (GRPO's, beside PPO's)
        assert not any('grpo_stand_in' in line for line in stand_ins()), stand_ins()
        if p.poll() is None:    # a stage that goes on (the distillation's stand-in): Ctrl-C again
            os.killpg(p.pid, signal.SIGINT)
    else:                       # a kill, or the terminal closed: to the script alone
        os.kill(p.pid, signal.SIGTERM if how == 'kill' else signal.SIGHUP)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == {'ctrl-c': 130, 'kill': 143, 'hangup': 129}[how], out
    said = {'kill': 'SIGTERM', 'hangup': 'SIGHUP'}.get(how, 'a second Ctrl-C' if parallel else 'Ctrl-C')
    assert f"speedrun: stopped by {said}, and with it the stages" in out, out
    assert 'Interrupt ' not in out, out                                # no job notices
    for _ in range(50):                     # (SIGTERM takes a moment to reach them)
        if not stand_ins():
            break
        time.sleep(0.1)
    assert stand_ins() == [], stand_ins()
    assert 'end ppo.py' not in log.read_text()
    # Ctrl-C reaches a training stage as Ctrl-C (it stops cleanly); a kill stops it at once
    assert ('saved and stopped ppo.py' in log.read_text()) == (how == 'ctrl-c'), log.read_text()


def test_speedrun_without_its_report_stage_says_there_is_no_card_yet(tmp_path):
    """A run of some stages only (here prepare, its python a stand-in) ends by saying where the
    card will be, not by pointing at a report.md it did not write."""
    from conftest import SHARED_DATA, shared_file
    shared_file('stories')                                   # skips with a message where it is absent
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run(['bash', 'speedrun.sh', '--profile=cpu', f'--out={tmp_path}/run', '--stages=prepare'], cwd=repo,
                       env=dict(stub_python(tmp_path, 0), SHARED_DATA=SHARED_DATA), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    last = p.stdout.strip().splitlines()[-1]
    assert 'no report card yet (--stages=report writes' in last and not (tmp_path / 'run' / 'report.md').exists(), last


def test_speedrun_with_a_card_names_the_chat_model_to_talk_to(tmp_path):
    """A run that ends with its card says how to serve the chat model with the best greedy task score
    on it (not the newest checkpoint, which a bare serve.py would take); without a chat model on the
    card it says nothing of the kind."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'report.md').write_text('# card\n')
    stages = {'base': {'task_score': 0.9}, 'sft': {'task_score': 0.66}, 'grpo': {'task_score': 0.759},
              'ppo': {'task_score': 0.716}, 'dpo_seed1': {'task_score': None}, 'student_distill': {'task_score': None}}
    for card, said in ((stages, f'talk to it: python serve.py --out_dir={out}/grpo --page_temperature=0 '
                                '--page_frequency_penalty=0.5   (the chat model with the best task score on the card, '
                                '0.759; a chat page at http://127.0.0.1:8000)'),
                       ({'base': {'task_score': 0.1}}, None)):
        (out / 'report.json').write_text(json.dumps({'stages': card}))
        p = subprocess.run(['bash', 'speedrun.sh', '--profile=cpu', f'--out={out}', '--stages=report'], cwd=repo,
                           env=stub_python(tmp_path, 0), capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        last = p.stdout.strip().splitlines()[-1]
        assert last == said if said else 'talk to it' not in p.stdout, p.stdout
    (out / 'report.json').unlink()            # a card without its data (deleted, damaged): no line, no failure
    p = subprocess.run(['bash', 'speedrun.sh', '--profile=cpu', f'--out={out}', '--stages=report'], cwd=repo,
                       env=stub_python(tmp_path, 0), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and 'talk to it' not in p.stdout, p.stdout + p.stderr


def test_speedrun_prints_a_running_stages_progress(tmp_path):
    """A stage's output goes to its log; every PROGRESS_EVERY seconds its latest progress line (a
    progress bar redrawn with carriage returns, here a stand-in's) is printed, when it changed."""
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / 'bin').mkdir()
    (tmp_path / 'bin' / 'python').write_text(
        f'#!/usr/bin/env bash\n[ "$1" = -c ] && exec {sys.executable} "$@"\n'
        "printf 'sft: step 1/4\\r'; sleep 1.5; printf 'sft: step 2/4\\r'; sleep 2\n")
    (tmp_path / 'bin' / 'python').chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", PROGRESS_EVERY='1')
    p = subprocess.run(['bash', 'speedrun.sh', '--profile=cpu', f'--out={tmp_path}/run', '--stages=sft'], cwd=repo,
                       env=env, capture_output=True, text=True, timeout=120)
    ticks = [line for line in p.stdout.splitlines() if line.startswith('  sft (')]
    assert p.returncode == 0 and ticks and ticks[-1].endswith(': sft: step 2/4'), p.stdout
    assert len(ticks) == len(set(line.split(': ', 1)[1] for line in ticks)), ticks   # only when it changed
    for bad in ('soon', '08'):                    # (a leading zero: bash would read it as octal)
        p = subprocess.run(['bash', 'speedrun.sh', '--profile=cpu', f'--out={tmp_path}/run', '--stages=sft'],
                           cwd=repo, env=dict(env, PROGRESS_EVERY=bad), capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and f"PROGRESS_EVERY='{bad}' is not a whole number" in p.stdout


def test_speedrun_starts_a_stage_that_ran_out_of_gpu_memory_again(tmp_path):
    """Stages side by side share one GPU: a stage that fails out of GPU memory (torch's message in
    its log) starts again after OOM_WAIT seconds, up to OOM_RETRIES times, its failed log kept; a
    stage that fails otherwise, or runs out of memory past the retries, stops the run."""
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / 'bin').mkdir()
    # a stage that runs out of memory the first OOMS times it starts (it counts its starts in a file)
    (tmp_path / 'bin' / 'python').write_text(
        f'#!/usr/bin/env bash\n[ "$1" = -c ] && exec {sys.executable} "$@"\n'
        f'echo start >> {tmp_path}/starts; n=$(wc -l < {tmp_path}/starts)\n'
        'if [ $n -le $OOMS ]; then echo "${MESSAGE:-torch.OutOfMemoryError: CUDA out of memory. Tried to allocate}"; '
        'exit 1; fi\n[ -z "$OTHER_FAILURE" ] || { echo "ValueError: bad"; exit 1; }\n'
        'for a in "$@"; do case $a in --out_dir=*) mkdir -p ${a#*=} && touch ${a#*=}/ckpt.pt ;; esac; done\n')
    (tmp_path / 'bin' / 'python').chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", OOM_WAIT='1', PROGRESS_EVERY='0')

    def speedrun(out, **extra):
        (tmp_path / 'starts').unlink(missing_ok=True)
        p = subprocess.run(['bash', 'speedrun.sh', '--profile=cpu', f'--out={tmp_path}/{out}', '--stages=sft'],
                           cwd=repo, env=dict(env, **extra), capture_output=True, text=True, timeout=120)
        return p, len((tmp_path / 'starts').read_text().splitlines()) if (tmp_path / 'starts').exists() else 0

    p, starts = speedrun('two', OOMS='2')
    assert p.returncode == 0 and starts == 3, p.stdout + p.stderr
    assert 'sft: out of GPU memory (logs/sft.oom1.log); starting it again in ' in p.stdout and '(retry 2 of 3)' in p.stdout
    assert 'CUDA out of memory' in (tmp_path / 'two' / 'logs' / 'sft.oom2.log').read_text()
    assert 'CUDA out of memory' not in (tmp_path / 'two' / 'logs' / 'sft.log').read_text()
    assert 'sft\t' in (tmp_path / 'two' / 'times.tsv').read_text()
    for message in ('RuntimeError: CUDA error: out of memory', 'CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate'):
        p, starts = speedrun('cuda' + str(len(message)), OOMS='1', MESSAGE=message)    # CUDA's own words for it
        assert p.returncode == 0 and starts == 2, p.stdout
    p, starts = speedrun('never', OOMS='1', OOM_RETRIES='0')
    assert p.returncode == 1 and starts == 1 and 'error: stage sft failed' in p.stdout, p.stdout
    p, starts = speedrun('other', OOMS='0', OTHER_FAILURE='1')        # another error: not started again
    assert p.returncode == 1 and starts == 1 and 'out of GPU memory' not in p.stdout, p.stdout
    p, _ = speedrun('bad', OOMS='0', OOM_WAIT='soon')
    assert p.returncode == 2 and "error: OOM_WAIT='soon' is not a whole number" in p.stdout


def test_speedrun_takes_stage_settings_and_eval_runs_from_the_environment(tmp_path):
    """speedrun.sh: <NAME>_EXTRA is appended to a stage's settings (so it wins over the profile's
    value) and EVAL_RUNS names the runs eval evaluates. The stages fail here (a python that
    fails at once stands in for them); the command lines they print are what is checked."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(stub_python(tmp_path, 1), SFT_EXTRA='--learning_rate=3e-4 --max_iters=7', EVAL_RUNS='sft student_scratch')
    p = subprocess.run(['bash', 'speedrun.sh', '--profile=cpu', f'--out={tmp_path}/run', '--stages=sft'],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    line = next(x for x in p.stdout.splitlines() if x.startswith('sft: python sft.py'))
    line, log = line.split('   (log: ')                                  # each stage names its log
    assert log == f'{tmp_path}/run/logs/sft.log)'
    assert line.endswith('--learning_rate=3e-4 --max_iters=7 --device=cpu --compile=False'), line
    assert line.index('--learning_rate=1e-3') < line.index('--learning_rate=3e-4')    # the profile's, then ours
    p = subprocess.run(['bash', 'speedrun.sh', '--profile=cpu', f'--out={tmp_path}/run', '--stages=eval'],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    runs = [x.split(':')[0] for x in p.stdout.splitlines() if x.startswith('eval_')]
    assert runs[0] == 'eval_sft' and 'eval_base' not in runs, p.stdout
    # a run that answers prompts is evaluated again, greedy with a frequency penalty (eval_fp<f>_pp0.json),
    # after its plain evaluation (done before here; the penalized one fails: no checkpoint); not with 0
    (tmp_path / 'pen' / 'sft').mkdir(parents=True)
    (tmp_path / 'pen' / 'sft' / 'eval.json').write_text('{}')
    (tmp_path / 'pen' / 'times.tsv').write_text('eval_sft\t1\n')
    for penalty in ('0.50', '0.0'):               # as eval.py names its file: 0.50 -> 0.5, 0.0 -> none
        p = subprocess.run(['bash', 'speedrun.sh', '--profile=cpu', f'--out={tmp_path}/pen', '--stages=eval'],
                           cwd=repo, env=dict(env, FREQUENCY_PENALTY=penalty, EVAL_RUNS='sft'), capture_output=True, text=True,
                           timeout=300)
        started = [x.split(':')[0] for x in p.stdout.splitlines() if x.startswith('eval_')]
        if penalty == '0.0':
            assert started == ['eval_sft'] and p.returncode == 0, p.stdout
            continue
        assert started == ['eval_sft', 'eval_penalized_sft'] and p.returncode != 0, p.stdout
        line = next(x for x in p.stdout.splitlines() if x.startswith('eval_penalized_sft: python eval.py'))
        assert '--frequency_penalty=0.5 --eval_iters=0 --sampled_score=False' in line, line
        assert line.index('--eval_iters=5') < line.index('--eval_iters=0'), line     # the profile's, then 0
        (tmp_path / 'pen' / 'sft' / 'eval_fp0.5_pp0.json').write_text('{}')       # its file, as eval.py names it
        with open(tmp_path / 'pen' / 'times.tsv', 'a') as f:         # and its line, its start's mark gone
            f.write('eval_penalized_sft\t1\n')
        (tmp_path / 'pen' / 'logs' / 'eval_penalized_sft.running').unlink()
        p = subprocess.run(['bash', 'speedrun.sh', '--profile=cpu', f'--out={tmp_path}/pen', '--stages=eval'],
                           cwd=repo, env=dict(env, FREQUENCY_PENALTY=penalty, EVAL_RUNS='sft'), capture_output=True,
                           text=True, timeout=300)
        assert 'eval_penalized_sft: done before' in p.stdout and p.returncode == 0, p.stdout
    p = subprocess.run(['bash', 'speedrun.sh', '--profile=cpu', f'--out={tmp_path}/pen', '--stages=eval'],
                       cwd=repo, env=dict(env, FREQUENCY_PENALTY='half'), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "error: FREQUENCY_PENALTY='half' is not a number" in p.stdout, p.stdout
    # without EVAL_RUNS: the default list (student_embed only where that stage is named); the runs
    # of one phase start together with --parallel=1, so each prints its command line
    env.pop('EVAL_RUNS')
    p = subprocess.run(['bash', 'speedrun.sh', '--profile=cpu', f'--out={tmp_path}/run', '--stages=eval',
                        '--parallel=1'], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    runs = sorted(x.split(':')[0] for x in p.stdout.splitlines() if x.startswith('eval_'))
    assert runs == ['eval_base', 'eval_dpo_seed1', 'eval_grpo', 'eval_ppo', 'eval_sft', 'eval_student_distill',
                    'eval_student_scratch'], p.stdout + p.stderr
    # one student alone (a side run beside another run's scratch student), in sequence and in phases
    for parallel in ('0', '1'):
        p = subprocess.run(['bash', 'speedrun.sh', '--profile=cpu', f'--out={tmp_path}/alone', '--stages=student_distill',
                            f'--parallel={parallel}'], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        started = [x.split(':')[0] for x in p.stdout.splitlines() if x.startswith('student_')]
        assert started == ['student_distill'] and 'unknown stage' not in p.stdout, p.stdout
    # a stage stopped midway left its checkpoint but no line in times.tsv: it runs again (and fails
    # here, without a base model); a failed run still writes its wall time
    (tmp_path / 'run' / 'sft').mkdir(parents=True, exist_ok=True)
    (tmp_path / 'run' / 'sft' / 'ckpt.pt').write_bytes(b'')
    (tmp_path / 'run' / 'wall.tsv').unlink(missing_ok=True)
    p = subprocess.run(['bash', 'speedrun.sh', '--profile=cpu', f'--out={tmp_path}/run', '--stages=sft'],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert 'sft/ckpt.pt is there but the stage did not finish' in p.stdout and p.returncode != 0
    assert (tmp_path / 'run' / 'wall.tsv').read_text().startswith('wall\t')
    with open(tmp_path / 'run' / 'times.tsv', 'a') as f:     # as a stage that finished leaves it: its line,
        f.write('sft\t5\n')
    (tmp_path / 'run' / 'logs' / 'sft.running').unlink()     # and its start's mark gone
    p = subprocess.run(['bash', 'speedrun.sh', '--profile=cpu', f'--out={tmp_path}/run', '--stages=sft'],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert 'sft: done before' in p.stdout and p.returncode == 0
    assert 'to run it again with the settings now, delete that folder or use --out=' in p.stdout
    # run again as that says (its folder deleted), it fails midway and leaves a checkpoint: its old line
    # in times.tsv does not make it done, and the next run starts it again
    shutil.rmtree(tmp_path / 'run' / 'sft')
    p = subprocess.run(['bash', 'speedrun.sh', '--profile=cpu', f'--out={tmp_path}/run', '--stages=sft'],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert 'sft: python sft.py' in p.stdout and p.returncode != 0, p.stdout
    (tmp_path / 'run' / 'sft').mkdir()
    (tmp_path / 'run' / 'sft' / 'ckpt.pt').write_bytes(b'')
    p = subprocess.run(['bash', 'speedrun.sh', '--profile=cpu', f'--out={tmp_path}/run', '--stages=sft'],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert 'sft/ckpt.pt is there but the stage did not finish' in p.stdout and p.returncode != 0, p.stdout
    # an evaluation older than its run's checkpoint (the run trained again since) is not done: it runs again
    (tmp_path / 'pen' / 'sft' / 'ckpt.pt').write_bytes(b'')
    os.utime(tmp_path / 'pen' / 'sft' / 'eval.json', (0, 0))
    p = subprocess.run(['bash', 'speedrun.sh', '--profile=cpu', f'--out={tmp_path}/pen', '--stages=eval'],
                       cwd=repo, env=dict(env, FREQUENCY_PENALTY='0.0', EVAL_RUNS='sft'), capture_output=True,
                       text=True, timeout=300)
    assert 'eval_sft: python eval.py' in p.stdout and 'done before' not in p.stdout, p.stdout
    p = subprocess.run(['bash', 'speedrun.sh', '--profile=cpu', f'--out={tmp_path}/a run', '--stages=sft'],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and 'holds a space' in p.stdout and not (tmp_path / 'a run').exists(), p.stdout
    p = subprocess.run(['bash', 'speedrun.sh', '--help'], cwd=repo, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith('The whole life cycle on real stories')


def test_speedrun_evaluates_each_run_in_the_phase_after_it(tmp_path):
    """speedrun.sh --parallel=1: a run is evaluated beside the next phase's stages, not only in the
    eval phase at the end, so a run cut short still has its rows. Here train and SFT finished before;
    the base model's eval starts in SFT's phase (and fails: its checkpoint is empty), so the run
    stops before SFT's own eval. Without the eval stage nothing is evaluated."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = tmp_path / 'run'
    for d in ('base', 'sft'):
        (run / d).mkdir(parents=True)
        (run / d / 'ckpt.pt').write_bytes(b'')
    (run / 'times.tsv').write_text('train\t1\nsft\t1\n')
    env = {k: v for k, v in os.environ.items() if k != 'EVAL_RUNS'}
    args = ['bash', 'speedrun.sh', '--profile=cpu', f'--out={run}', '--parallel=1']
    p = subprocess.run(args + ['--stages=train,sft,eval'], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=300)
    out = p.stdout
    assert 'train: done before' in out and 'sft: done before' in out, out
    assert 'eval_base: python eval.py' in out and 'eval_sft' not in out and p.returncode != 0, out
    p = subprocess.run(args + ['--stages=train,sft'], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and 'eval_' not in p.stdout, p.stdout and '--profile=' in p.stdout
