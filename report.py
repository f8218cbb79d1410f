"""
The report card of a speedrun (speedrun.sh): one page that says what every stage of the life
cycle did, read from the folders it wrote (each stage's ckpt.pt, log.jsonl and eval.json, the
data's meta.json, times.tsv).

$ python report.py --out=out/speedrun_cpu

Writes OUT/report.md and OUT/report.json, and the plots they show: OUT/report_losses.png (every
stage's training loss and held-out loss; the reward model's held-out pair accuracy beside its
losses), OUT/report_rl.png (PPO's and GRPO's rewards and KL to
the SFT model against rollouts); the base model's expert load and max attention logit plots are
the ones train.py drew. Each target of the life-cycle run is checked and its margin printed.
"""

import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

from config import configure, model_config_from
from data import read_jsonl
from model import GPT, ModelConfig
from runlog import pyplot
from task import GAP_BUCKETS, RULE_PARTS

# -----------------------------------------------------------------------------
out = 'out/speedrun_cpu'     # the speedrun's folder
profile = ''                 # its profile (cpu | gpu), for the title
# -----------------------------------------------------------------------------
configure(globals(), verbose=False)
if not os.path.isdir(out):
    sys.exit(f"error: out='{out}' is not a folder (run speedrun.sh first)")

TRAINED = ('base', 'sft', 'reward', 'dpo_seed1', 'dpo_seed2', 'dpo_seed3', 'ppo', 'grpo', 'student_scratch',
           'student_distill', 'student_embed')
TARGETS = {'sft_all_words': 0.90, 'reward_accuracy': 0.90, 'distill_gap_closed': 0.50}


def read_json(*parts):
    path = os.path.join(out, *parts)
    return json.load(open(path)) if os.path.isfile(path) else None


def log_rows(name):
    path = os.path.join(out, name, 'log.jsonl')
    return [json.loads(line) for line in open(path)] if os.path.isfile(path) else []


def checkpoint_meta(name):
    """The small part of a checkpoint: stage, step, metrics, tokens, parameter counts (the weights
    are only counted)."""
    path = os.path.join(out, name, 'ckpt.pt')
    if not os.path.isfile(path):
        return None
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    # the model's own counts, from its config on the meta device (tied weights once; active: what
    # a token passes through); else each saved tensor once (a tied pair loads as one tensor)
    try:
        with torch.device('meta'):
            m = GPT(model_config_from(ckpt['config'], ModelConfig))
        n, active = m.num_params(), m.active_params()
    except (KeyError, TypeError, ValueError):
        n, active = sum(v.numel() for v in {v.data_ptr(): v for v in ckpt['model'].values()}.values()), None
    return {'stage': ckpt.get('stage'), 'step': ckpt.get('step'), 'metrics': ckpt.get('metrics', {}),
            'tokens': ckpt.get('tokens'), 'params': n, 'active_params': active, 'config': ckpt.get('config') or {}}


def fmt(x, spec='.3f'):
    return '-' if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def pct(x):
    return '-' if x is None else f'{100 * x:.1f}%'


def latest(rows):
    """The latest logged value of each key over a run's log rows."""
    last = {}
    for r in rows:
        last.update(r)
    return last


def held_out_from_log(name, rows):
    """For a stage eval.py did not evaluate (a run cut short): the eval.json values its own last
    held-out evaluation in log.jsonl also measured, on its own prompts and batches: the val loss
    and bits per byte on the pretraining data (base model, students), or the task score and the
    all-words rate of greedy answers (SFT, DPO, PPO, GRPO)."""
    last = latest(rows)
    if name in ('base', 'student_scratch', 'student_distill', 'student_embed'):
        keys = {'val/loss': 'val/loss', 'val/bpb': 'val/bpb', 'val_tinystories/bpb': 'val_tinystories/bpb'}
    else:
        keys = {'task/score': 'task/score_greedy', 'task/all_words': 'task/all_words_greedy'}
    return {k: last[v] for k, v in keys.items() if v in last}


def paired(a, b):
    """(mean, standard error, prompts) over the held-out prompts of the score of answers file b
    minus that of answers file a (paths under out; the same prompts, in order), or None where they
    are not both there or not for the same prompts."""
    paths = [os.path.join(out, f) for f in (a, b)]
    if not all(os.path.isfile(p) for p in paths):
        return None
    x, y = (read_jsonl(p, ('prompt', 'score')) for p in paths)
    if len(x) < 2 or [r['prompt'] for r in x] != [r['prompt'] for r in y]:
        return None
    d = [v['score'] - u['score'] for u, v in zip(x, y)]
    return statistics.mean(d), statistics.stdev(d) / math.sqrt(len(d)), len(d)


def penalized(name):
    """The run's greedy answers again under OpenAI's frequency / presence penalties (eval.py
    --frequency_penalty: eval_fp<f>_pp<p>.json, as speedrun.sh's eval stage writes for the runs that
    answer prompts), each with the task metrics and the paired change of the score from eval.json's."""
    found = []
    folder = os.path.join(out, name)
    for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if f.startswith('eval_fp') and f.endswith('.json'):
            ev = read_json(name, f)
            found.append({'file': f, 'frequency_penalty': ev.get('frequency_penalty'),
                          'presence_penalty': ev.get('presence_penalty'), 'task_score': ev.get('task/score'),
                          'all_words': ev.get('task/all_words'), 'repetition': ev.get('task/repetition'),
                          'gain': paired(os.path.join(name, 'eval_answers.jsonl'),
                                         os.path.join(name, 'eval_answers' + f[len('eval'):-len('.json')] + '.jsonl'))})
    return found


# --- what each stage did ------------------------------------------------------------------------
times = {}
if os.path.isfile(os.path.join(out, 'times.tsv')):
    for line in open(os.path.join(out, 'times.tsv')):
        name, seconds = line.split('\t')
        times[name] = int(seconds)       # (a stage run again: its last run's time)
wall = 0                                 # speedrun.sh's wall time (its runs summed, if resumed)
if os.path.isfile(os.path.join(out, 'wall.tsv')):
    wall = sum(int(line.split('\t')[1]) for line in open(os.path.join(out, 'wall.tsv')) if '\t' in line)
meta = read_json('data', 'meta.json') or {}
stages = {}
for name in TRAINED:
    ckpt = checkpoint_meta(name)
    if ckpt is None:
        continue
    ev = read_json(name, 'eval.json')
    rows = log_rows(name)
    from_log = ev is None and name != 'reward'
    ev = held_out_from_log(name, rows) if from_log else ev or {}
    stages[name] = {'time_s': times.get('train' if name == 'base' else name), 'step': ckpt['step'], 'tokens': ckpt['tokens'],
                    'params': ckpt['params'], 'active_params': ckpt['active_params'] or ev.get('active_params'),
                    'val_loss': ev.get('val/loss'), 'val_bpb': ev.get('val/bpb'),
                    'val_tinystories_bpb': ev.get('val_tinystories/bpb'),
                    'task_score': ev.get('task/score'), 'all_words': ev.get('task/all_words'),
                    'n_prompts': ev.get('task/n_prompts'),
                    'score_sampled': ev.get('task/score_sampled'),
                    'word_by_position': ev.get('task/word_by_position'),
                    'ended': ev.get('task/ended'), 'kl_ref': ev.get('kl_ref'), 'repetition': ev.get('task/repetition'),
                    'samples': ev.get('task/samples', []), 'continuations': ev.get('continuations', []),
                    'metrics': ckpt['metrics'], 'config': ckpt['config'], 'last_log': next((r for r in reversed(rows) if 'train/loss' in r), {}),
                    'source': 'log' if from_log and ev else 'eval', 'penalized': penalized(name),
                    'eval': ev}                # all of eval.json (or the log's last evaluation)
    if name == 'reward':      # its target is the held-out pair accuracy: [step, accuracy] at each evaluation
        stages[name]['accuracy_curve'] = [[r['step'], r['val/accuracy']] for r in rows if 'val/accuracy' in r]

# --- the targets ----------------------------------------------------------------------------------
checks = []


def check(name, value, target, passed, how, unit='share', threshold=None, standard_error=None):
    """unit: 'share' (a fraction, printed as %) or 'points' (a difference of task scores, 0..1,
    printed as a signed number of the same scale as the scores). threshold: the number the value
    must pass, so that the card says by how much it did or did not (margin = value - threshold);
    standard_error: the value's, where its sample gives one, to read the margin against."""
    margin = None if value is None or threshold is None else value - threshold
    checks.append({'target': name, 'value': value, 'goal': target, 'met': passed, 'how': how, 'unit': unit,
                   'margin': margin, 'standard_error': standard_error})


def binomial_se(p, n):
    """The standard error sqrt(p (1 - p) / n) of a share p measured on n items; None without them."""
    return math.sqrt(p * (1 - p) / n) if p is not None and n else None


def margin_text(c):
    """'-0.2 points (standard error 1.9)': a check's margin in the unit of its value (a share's in
    percentage points), and its standard error where there is one."""
    if c['margin'] is None:
        return '-'
    scale, form, unit = (100, '+.1f', ' points') if c['unit'] == 'share' else (1, '+.3f', '')
    text = f"{scale * c['margin']:{form}}{unit}"
    if c['standard_error']:
        text += f" (standard error {scale * c['standard_error']:{form[1:]}})"
    return text


if 'sft' in stages:
    v, base = stages['sft']['all_words'], stages.get('base', {}).get('all_words')
    by_position = stages['sft'].get('word_by_position')      # which listed word the answers drop
    per_word = (f"; the 1st / 2nd / 3rd listed word used in {' / '.join(pct(x) for x in by_position[:3])} of answers"
                if by_position else '')
    # the same greedy answers with a frequency penalty: another decoder, beside the target, not in it
    pen = ''.join(f"; greedy with a frequency penalty of {fmt(p['frequency_penalty'], 'g')}"
                  + (f" and a presence penalty of {fmt(p['presence_penalty'], 'g')}" if p['presence_penalty'] else '')
                  + f": {pct(p['all_words'])}" for p in stages['sft']['penalized'])
    n = stages['sft'].get('n_prompts')
    se = binomial_se(v, n)
    check('SFT: all required words used (greedy, held-out prompts)', v, f">= {pct(TARGETS['sft_all_words'])}",
          v is not None and v >= TARGETS['sft_all_words'],
          f'the base model with the template: {pct(base)}{per_word}{pen}' + (f'; over {n} prompts' if n else ''),
          threshold=TARGETS['sft_all_words'], standard_error=se)
if 'reward' in stages:
    acc = stages['reward']['metrics'].get('val/accuracy')
    prefs = read_json('prefs', 'meta.json') or {}      # prepare/preferences.py: how many pairs it made
    n_pairs = (f", on {prefs['val_pairs']:,} held-out pairs ({prefs['train_pairs']:,} for training; held out by "
               f"prompt: the pairs' prompts are all from training books)"
               if {'val_pairs', 'train_pairs'} <= set(prefs) else '')
    se = binomial_se(acc, prefs.get('val_pairs')) if n_pairs else None
    if se is not None:
        n_pairs += f", its standard error {pct(se)}"
    m = stages['reward']['metrics']                     # the accuracy on each kind of pair (reward.py)
    kinds = [f"{k} {pct(m[f'val/accuracy_{k}'])} of {m[f'val/pairs_{k}']:,}"
             for k in RULE_PARTS if f'val/accuracy_{k}' in m]
    by_kind = f"; by the part of the rule that separates the pair most: {', '.join(kinds)}" if kinds else ''
    gaps = [f"{name} ({span}) {pct(m[f'val/accuracy_{name}'])} of {m[f'val/pairs_{name}']:,}"
            for name, (span, _, _) in GAP_BUCKETS.items() if f'val/accuracy_{name}' in m]
    by_kind += f"; by the gap between the two answers' rule scores: {', '.join(gaps)}" if gaps else ''
    if m.get('val/word_check_accuracy') is not None:     # reward.py --word_check_weight: its checks of each word
        by_kind += f"; the head's word checks right for {pct(m['val/word_check_accuracy'])} of the required words"
    check('Reward model: pairwise accuracy on held-out pairs', acc, f">= {pct(TARGETS['reward_accuracy'])}",
          acc is not None and acc >= TARGETS['reward_accuracy'],
          f'reward.py val/accuracy at its last evaluation{n_pairs}{by_kind}',
          threshold=TARGETS['reward_accuracy'], standard_error=se)


def paired_gain(d):
    """' (per prompt: +0.040 +- 0.020, its standard error over 256 prompts)' for d = paired(...) of
    SFT's and a run's answers: the gain read against the noise of the prompt sample; '' for None."""
    return f' (per prompt: {d[0]:+.3f} ± {d[1]:.3f}, its standard error over {d[2]} prompts)' if d else ''


def task_scores(names):
    """The greedy task scores of the stages names (SFT first) that a target compares, and a note: all
    eval.py's; or, where eval.py did not evaluate some of them (a run cut short), all from the
    stages' own last evaluations in their logs, which answered the first eval_prompts held-out
    prompts with answers of at most max_new_tokens: comparable where every stage had the same two
    (else all None). eval.py's score for one and a log's for another would compare answers to
    different prompts."""
    if all(stages[k]['source'] == 'eval' for k in names):
        return [stages[k]['task_score'] for k in names], ''
    why = "eval.py did not evaluate all of them" if any(stages[k]['source'] == 'eval' for k in names) \
        else "eval.py evaluated none of them"
    for key, what in (('eval_prompts', 'prompts'), ('max_new_tokens', 'answer lengths')):
        settings = {stages[k]['config'].get(key) for k in names}
        if None in settings:
            return [None] * len(names), f"; not compared: {why}, and a checkpoint does not record its {key}"
        if len(settings) > 1:
            return [None] * len(names), (f"; not compared: {why}, and their own evaluations used different "
                                         f"{what} ({key} {', '.join(map(str, sorted(settings)))})")
    scores = [held_out_from_log(k, log_rows(k)).get('task/score') for k in names]
    return scores, (f"; all from the stages' training logs ({why}), each on the same first "
                    f"{stages[names[0]]['config']['eval_prompts']} held-out prompts")


# a score missing (a stage's eval.json not written) leaves its target unknown, never met or missed by default
seeds = [k for k in ('dpo_seed1', 'dpo_seed2', 'dpo_seed3') if stages.get(k, {}).get('task_score') is not None]
if seeds and 'sft' in stages:
    (sft_score, *dpo), measured = task_scores(['sft'] + seeds)
    if None in dpo:                    # (a seed's log without a score: the comparison is not whole)
        sft_score, dpo, measured = None, [], measured or "; not compared: a seed's log has no task score"
    spread = statistics.stdev(dpo) if len(dpo) > 1 else float('nan')   # the seeds' sample std
    gain = None if sft_score is None or not dpo else statistics.mean(dpo) - sft_score
    check('DPO: task score above SFT by more than the seed spread', gain,
          f'> spread {fmt(spread)} ({len(seeds)} seeds)' if len(seeds) > 1
          else '> the spread of 2 or more seeds (1 ran)',
          None if gain is None or len(dpo) < 2 else gain > spread,
          f"DPO {', '.join(fmt(x) for x in dpo)} vs SFT {fmt(sft_score)}{measured}", unit='points',
          threshold=spread if len(dpo) > 1 else None)
for name in ('ppo', 'grpo'):
    if name in stages and 'sft' in stages:
        scores, measured = task_scores([name, 'sft'])
        gain = None if None in scores else scores[0] - scores[1]
        d = paired(os.path.join('sft', 'eval_answers.jsonl'), os.path.join(name, 'eval_answers.jsonl'))
        check(f'{name.upper()}: task reward above SFT (greedy, held-out prompts)', gain, '> 0',
              None if gain is None else gain > 0,
              f"{fmt(scores[0])} vs SFT {fmt(scores[1])}{paired_gain(d)}{measured}; "
              f"on answers sampled at temperature 1: {fmt(stages[name]['score_sampled'])} vs "
              f"{fmt(stages['sft']['score_sampled'])}; KL to SFT {fmt(stages[name]['kl_ref'], '.2f')} nats per answer",
              unit='points', threshold=0, standard_error=d[1] if d else None)
if {'student_scratch', 'student_distill', 'base'} <= set(stages):
    trio = ('base', 'student_scratch', 'student_distill')
    t, s, d = (stages[k]['val_loss'] for k in trio)
    measured = ''
    if len({stages[k]['source'] for k in trio}) > 1:
        # some from eval.py, some from a stage's log (a run cut short): other batches, so all three
        # from the logs, the teacher's val loss as distill.py measured it on the students' batches
        t = latest(log_rows('student_distill')).get('val/teacher_loss')
        s, d = (held_out_from_log(k, log_rows(k)).get('val/loss') for k in trio[1:])
        measured = ("; all three from the students' training logs (eval.py did not evaluate all of them), "
                    "the teacher's on the same batches by distill.py")
    closed = (s - d) / (s - t) if None not in (t, s, d) and s != t else None
    sizes = (stages['student_distill']['active_params'], stages['base']['active_params'])
    ratio = sizes[0] / sizes[1] if None not in sizes and sizes[1] > 0 else None   # unknown: no model built
    borrowed = ("; the distilled student also starts from the teacher's token embeddings (init_embedding='teacher'), "
                "the scratch student from random ones" if stages['student_distill']['config'].get('init_embedding')
                == 'teacher' else '')
    # that start without distillation (speedrun.sh student_embed), measured as the three are: from
    # the logs where they are, else from eval.py where it evaluated it too
    e = None
    if 'student_embed' in stages and measured:
        e = held_out_from_log('student_embed', log_rows('student_embed')).get('val/loss')
    elif 'student_embed' in stages and stages['student_embed']['source'] == stages['base']['source']:
        e = stages['student_embed']['val_loss']
    if borrowed and None not in (t, d, e):
        borrowed += (f"; trained from that start without the teacher's distribution (student_embed) it reaches "
                     f"{fmt(e)}, so distillation itself closes {pct((e - d) / (e - t)) if e != t else '-'} of "
                     f"the gap from there")
    small = None if ratio is None else ratio <= 0.25
    if small is False:                  # too big a student: not met, whatever it closes
        met = False
    elif closed is None or small is None:
        met = None
    else:
        met = closed >= TARGETS['distill_gap_closed']
    check('Distillation: share of the scratch student -> teacher val-loss gap closed', closed,
          f">= {pct(TARGETS['distill_gap_closed'])}, student <= 25% of the teacher's active parameters", met,
          f'val loss: teacher {fmt(t)}, scratch student {fmt(s)}, distilled student {fmt(d)}; '
          f'student active parameters {pct(ratio) if ratio is not None else "unknown"} of the teacher\'s'
          f'{borrowed}{measured}',
          threshold=TARGETS['distill_gap_closed'] if small else None)   # (too big a student: no margin)

# --- plots --------------------------------------------------------------------------------------
plots = {}
plt = pyplot()
if plt is not None and stages:
    names = [n for n in stages if n != 'reward'] + (['reward'] if 'reward' in stages else [])
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(names) / cols), cols, figsize=(13, 3.2 * math.ceil(len(names) / cols)),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
        rows = log_rows(name)
        # the next-token loss where it is logged (train/loss is the objective: with MTP, balance or
        # distillation terms, not comparable with val/loss)
        train_key = 'train/lm_loss' if any('train/lm_loss' in r for r in rows) else 'train/loss'
        for key in (train_key, 'val/loss'):
            pts = [(r['step'], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=key, marker='o' if len(pts) < 20 else None, markersize=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel('rollout' if name in ('ppo', 'grpo') else 'step')
        ax.grid(alpha=0.3)
        handles = ax.lines[:]
        if stages[name].get('accuracy_curve'):          # the reward model's: its target, on a right axis
            acc = ax.twinx()
            handles += acc.plot(*zip(*stages[name]['accuracy_curve']), color='tab:green', marker='o', markersize=3,
                                label='val/accuracy (right)')
            handles.append(acc.axhline(TARGETS['reward_accuracy'], color='tab:green', linestyle='--', linewidth=0.8,
                                       label=f"accuracy target {pct(TARGETS['reward_accuracy'])}"))
            acc.set(ylim=(0.4, 1.0), ylabel='held-out pair accuracy')
        if handles:
            ax.legend(handles=handles, fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis('off')
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'report_losses.png'), dpi=100)
    plt.close(fig)
    plots['losses'] = 'report_losses.png'
    if {'ppo', 'grpo'} & set(stages):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
        for name in ('ppo', 'grpo'):
            rows = log_rows(name)
            pts = [(r['step'], r['train/reward']) for r in rows if 'train/reward' in r]
            if pts:
                a1.plot(*zip(*pts), label=f'{name}: mean reward of the rollout', marker='.')
            pts = [(r['step'], r['task/score_greedy']) for r in rows if 'task/score_greedy' in r]
            if pts:
                a1.plot(*zip(*pts), label=f'{name}: greedy task score, held out', marker='o')
            pts = [(r['step'], r['val/kl_ref']) for r in rows if 'val/kl_ref' in r]
            if pts:
                a2.plot(*zip(*pts), label=name, marker='o')
        a1.set(xlabel='rollout', ylabel='reward (task rule, with the stage\'s penalties)', title='rewards')
        a2.set(xlabel='rollout', ylabel='nats per answer',
               title="KL(policy || SFT) on the stage's own held-out samples")
        for a in (a1, a2):
            a.grid(alpha=0.3)
            if a.lines:
                a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, 'report_rl.png'), dpi=100)
        plt.close(fig)
        plots['rl'] = 'report_rl.png'
for name in ('expert_load.png', 'max_logit.png', 'loss.png'):
    if os.path.isfile(os.path.join(out, 'base', name)):
        plots[f'base_{name[:-4]}'] = f'base/{name}'

# --- report.json and report.md --------------------------------------------------------------------
try:
    # '-dirty' where the files differ from that commit (as a copied working tree can)
    commit = subprocess.run(['git', 'describe', '--always', '--dirty'], capture_output=True, text=True).stdout.strip()
except OSError:
    commit = ''
device = torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'
report = {'profile': profile, 'date': time.strftime('%Y-%m-%d %H:%M'), 'commit': commit, 'device': device,
          'torch': torch.__version__, 'total_time_s': sum(times.values()), 'wall_time_s': wall, 'times_s': times,
          'data': {k: v for k, v in meta.items() if k.endswith(('_tokens', '_docs', '_bytes'))},
          'stages': {n: {k: v for k, v in s.items() if k != 'eval'} for n, s in stages.items()},   # (each eval.json
          'targets': checks, 'plots': plots}                                              # lies in its stage's folder)
with open(os.path.join(out, 'report.json'), 'w') as f:
    json.dump(report, f, indent=2, default=str)

md = [f"# Report card: the life cycle on stories ({profile or '?'} profile)", '',
      f"{report['date']}, commit {commit or '?'}, {device}, torch {torch.__version__}; "
      f"{sum(times.values()) / 60:.1f} minutes of stages in all"
      + (f", {wall / 60:.1f} minutes of wall time (stages that do not need each other's output ran side by side)"
         if wall and wall < 0.95 * sum(times.values()) else '') + '.', '',
      *(['The cpu profile is a smoke test of the plumbing: its 2M-parameter model trained for minutes writes '
         'no story, so its answers loop and its targets, set for the gpu profile, are not expected to be met; '
         'it trains one DPO seed, which leaves the DPO target (a spread of seeds) undecided.',
         ''] if profile == 'cpu' else []),
      '## Data', '',
      '| split | documents | tokens | bytes |', '| --- | --- | --- | --- |']
for split in ('train', 'val', 'val_tinystories'):
    if f'{split}_tokens' in meta:
        md.append(f"| {split} | {meta.get(f'{split}_docs', 0):,} | {meta[f'{split}_tokens']:,} | {meta.get(f'{split}_bytes', 0):,} |")
md += ['', 'val: passages of whole held-out books; val_tinystories: the real TinyStories validation stories.', '',
       '## Stages', '']
# The stage table: (header, the cell of stage s) per column. A metric of your own that eval.py writes
# to eval.json is one more line here, e.g. ('distinct-2', lambda s: fmt(s['eval'].get('task/distinct2'))).
COLUMNS = [
    ('time', lambda s: f"{s['time_s'] if s['time_s'] is not None else '-'} s"),
    ('steps', lambda s: s['step']),
    ('tokens', lambda s: f"{s['tokens'] / 1e6:.2f}M" if s['tokens'] else '-'),
    ('parameters (active)', lambda s: f"{s['params'] / 1e6:.2f}M"
     + (f" ({s['active_params'] / 1e6:.2f}M)" if s['active_params'] else '')),
    ('val loss', lambda s: fmt(s['val_loss'])),
    ('val bits/byte', lambda s: fmt(s['val_bpb'])),
    ('TinyStories val bits/byte', lambda s: fmt(s['val_tinystories_bpb'])),
    ('task score', lambda s: fmt(s['task_score'])),
    ('task score, sampled', lambda s: fmt(s['score_sampled'])),
    ('all words', lambda s: pct(s['all_words'])),
    ('ended turn', lambda s: pct(s['ended'])),
    ('KL to SFT', lambda s: fmt(s['kl_ref'], '.2f')),
]


def table_row(*cells):
    return '| ' + ' | '.join(map(str, cells)) + ' |'


def time_row(name, seconds):          # a stage that trains nothing: its time alone
    return table_row(name, f'{seconds} s', *[''] * (len(COLUMNS) - 1))


md += [table_row('stage', *(header for header, _ in COLUMNS)), table_row(*['---'] * (len(COLUMNS) + 1))]
if times.get('prepare') is not None:
    md.append(time_row('prepare', times['prepare']))
prefs_row = time_row('prefs', times['prefs']) if 'prefs' in times else None
for name, s in stages.items():
    if prefs_row and name in ('reward', 'dpo_seed1', 'dpo_seed2', 'dpo_seed3'):   # in the order they ran
        md.append(prefs_row)
        prefs_row = None
    extra = f" (pair accuracy {pct(s['metrics'].get('val/accuracy'))})" if name == 'reward' else ''
    mark = ' †' if s['source'] == 'log' else ''
    md.append(table_row(f'{name}{mark}{extra}', *(cell(s) for _, cell in COLUMNS)))
if prefs_row:                       # no stage after it reported
    md.append(prefs_row)
md += ['', 'Task score: the reward rule of task.py (required words, requested features, a finished answer, '
       'no repetition) on greedy answers to the held-out prompts, from held-out books (sampled: on one answer '
       'per prompt sampled at temperature 1); KL: nats per sampled answer (eval.py --reference). '
       "The RL plot's numbers are PPO's and GRPO's own evaluations during training (their answer length and "
       'prompts, rewards with their penalties), so they differ from these.']
if any(s['penalized'] for s in stages.values()):
    md += ['', '### The same greedy answers with a frequency penalty', '',
           "OpenAI's frequency penalty (eval.py --frequency_penalty: each token's logit lowered by the penalty "
           'times its count in the answer so far), still greedy: greedy answers loop, and the task score '
           'counts repetition against them. Change of the score: mean over the held-out prompts, with its '
           'standard error.', '',
           '| run | penalty (frequency / presence) | task score | change | all words | 4-gram repetition |',
           '| --- | --- | --- | --- | --- | --- |']
    for name, s in stages.items():
        for p in s['penalized']:
            gain = '-' if p['gain'] is None else f"{p['gain'][0]:+.3f} ± {p['gain'][1]:.3f}"
            md.append(f"| {name} | {fmt(p['frequency_penalty'], 'g')} / {fmt(p['presence_penalty'], 'g')} | "
                      f"{fmt(s['task_score'])} -> {fmt(p['task_score'])} | {gain} | "
                      f"{pct(s['all_words'])} -> {pct(p['all_words'])} | "
                      f"{fmt(s['repetition'])} -> {fmt(p['repetition'])} |")
if any(s['source'] == 'log' for s in stages.values()):
    md += ['', "† eval.py did not evaluate this stage (a run cut short): its values are the stage's own last "
           "held-out evaluation in its log.jsonl, on its own prompts and batches (and so are the targets read "
           "from them)."]
md += ['', '## Targets', '', '| target | value | goal | met | by how much | how |',
       '| --- | --- | --- | --- | --- | --- |']
for c in checks:
    v = c['value']
    shown = '-' if v is None else pct(v) if c['unit'] == 'share' else f'{v:+.3f}'
    md.append(f"| {c['target']} | {shown} | {c['goal']} | "
              f"{'unknown' if c['met'] is None else 'yes' if c['met'] else '**no**'} | {margin_text(c)} | {c['how']} |")
md += ['', '## Plots', '']
for key, path in plots.items():
    md.append(f'![{key}]({path})')
md += ['', '## Samples', '']
for name, s in stages.items():
    if s['continuations'] and name in ('base', 'student_distill'):
        md += [f'### {name}: continuations of openings (as a language model)', '']
        md += [f'{i + 1}. {c.strip()[:600]!r}' for i, c in enumerate(s['continuations'])] + ['']
    if s['samples'] and name not in ('base', 'student_scratch', 'student_distill'):
        md += [f'### {name}: answers to held-out prompts', '']
        md += [f"{i + 1}. **{a['prompt']}** -> {a['answer'].strip()[:600]!r} (score {a['score']:.2f})"
               for i, a in enumerate(s['samples'])] + ['']
with open(os.path.join(out, 'report.md'), 'w') as f:
    f.write('\n'.join(md) + '\n')
print('\n'.join(md[:md.index('## Plots')]))            # the tables, the targets last (the plots and samples: in the file)
print(f'... wrote {out}/report.md and {out}/report.json')
