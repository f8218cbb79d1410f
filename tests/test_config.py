import ast
import glob
import os
import re

import pytest

from config import configure, model_config_from
from conftest import REPO
from model import ModelConfig


def defaults():
    return {'out_dir': 'out/run', 'n_steps': 10, 'lr': 3e-4, 'flag': False, 'betas': (0.9, 0.95),
            'auto': None, 'os': os}          # a module is not a key


def run(argv, ns=None, **kw):
    ns = defaults() if ns is None else ns
    cfg = configure(ns, argv, verbose=False, **kw)
    return ns, cfg


def exit_message(argv, **kw):
    with pytest.raises(SystemExit) as e:
        run(argv, **kw)
    return str(e.value)


def test_overrides_are_python_literals_of_the_default_type():
    ns, cfg = run(['--n_steps=20', '--lr=1', '--flag=True', '--betas=[0.8, 0.9]', '--out_dir=out/x'])
    assert cfg == {'out_dir': 'out/x', 'n_steps': 20, 'lr': 1.0, 'flag': True, 'betas': (0.8, 0.9),
                   'auto': None}
    assert isinstance(cfg['lr'], float) and ns['n_steps'] == 20   # written back into the namespace


def test_a_string_default_keeps_the_raw_text():
    _, cfg = run(['--out_dir=123'])
    assert cfg['out_dir'] == '123'


def test_none_default_accepts_any_literal_but_no_bare_word():
    _, cfg = run(['--auto=5'])
    assert cfg['auto'] == 5
    _, cfg = run(["--auto='word'"])                       # a quoted string is a literal
    assert cfg['auto'] == 'word'
    for raw in ('no', 'off', 'flase', '[1,2'):             # kept as text, each would be true
        with pytest.raises(SystemExit, match=f'--auto={re.escape(raw)} is not a Python literal'):
            run([f'--auto={raw}'])
    assert run(['--auto=config/x.py'])[1]['auto'] == 'config/x.py'   # a path is text (ablate.py's base)


def test_true_false_none_in_any_case_are_the_python_values():
    """--compile=false on a key whose default is None (auto) was the text 'false', which is true."""
    for raw, value in (('false', False), ('FALSE', False), ('true', True), ('None', None), ('none', None)):
        assert run([f'--auto={raw}'])[1]['auto'] is value
    assert run(['--flag=true'])[1]['flag'] is True
    assert run(['--out_dir=none'])[1]['out_dir'] == 'none'       # a string key keeps its text


@pytest.mark.parametrize('arg,expect', [
    ('--n_steps=2.5', "'n_steps' to 2.5 of type float, but 'n_steps' takes int"),
    ('--n_steps=True', "takes int"),
    ('--flag=1', "'flag' takes bool"),
    ('--lr=abc', "--lr=abc is not a Python literal"),
])
def test_wrong_type_exits_with_one_line(arg, expect):
    msg = exit_message([arg])
    assert expect in msg and '\n' not in msg


def test_unknown_key_lists_the_valid_keys():
    msg = exit_message(['--n_step=3'])
    assert "unknown config key 'n_step' (from --n_step=3) (did you mean 'n_steps'?)" in msg
    assert 'valid keys: auto, betas, flag, lr, n_steps, out_dir' in msg and '\n' not in msg
    assert 'did you mean' not in exit_message(['--zzz=3'])     # nothing close: no guess


def test_a_scripts_valid_keys_are_its_settings_not_what_it_imported():
    """config's record of where each setting came from (dicts train.py reads) is no setting of
    train.py: not listed as a valid key, not saved in its checkpoints' config."""
    import subprocess
    import sys
    p = subprocess.run([sys.executable, 'train.py', '--max_iter=1'], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode and 'valid keys: always_save_checkpoint' in p.stderr + p.stdout
    assert 'last_set_by' not in p.stderr + p.stdout and 'last_file_values' not in p.stderr + p.stdout


def test_config_file_runs_over_defaults_and_may_read_them(tmp_path):
    f = tmp_path / 'cfg.py'
    f.write_text('import math\nn_steps = 100\nlr = n_steps * 1e-5\n_private = 3\n')
    _, cfg = run([str(f), '--n_steps=7'])       # the command line comes after the file
    assert cfg['n_steps'] == 7 and cfg['lr'] == pytest.approx(1e-3)
    _, cfg = run(['--n_steps=7', str(f)])       # written before the file, it still wins
    assert cfg['n_steps'] == 7 and cfg['lr'] == pytest.approx(1e-3)


def test_config_file_with_unknown_key_or_wrong_type(tmp_path):
    f = tmp_path / 'bad.py'
    f.write_text('n_stepz = 3\n')
    assert "sets unknown key 'n_stepz' (did you mean 'n_steps'?)" in exit_message([str(f)])
    f.write_text('scale = 2\nn_steps = 10 * scale\n')              # a helper of its own
    assert "unknown key 'scale' (a helper value of the file's own: name it _scale or SCALE)" in exit_message([str(f)])
    f.write_text("n_steps = 'ten'\n")
    assert "'n_steps' takes int" in exit_message([str(f)])
    assert "config file 'missing.py' not found" in exit_message(['missing.py'])
    # a setting written without its dashes is named as one; a file not there lists its folder's configs
    assert "config file 'n_steps=3' not found; a setting is written --n_steps=3" in exit_message(['n_steps=3'])
    assert exit_message([str(tmp_path / 'typo.py')]) == f"error: config file '{tmp_path}/typo.py' not found; {tmp_path}/ holds bad.py"


def test_model_fields_become_keys_with_script_defaults_winning():
    ns = {'n_layer': 2, 'lr': 0.1}
    _, cfg = run(['--n_head=4', '--pos_emb=rope'], ns=ns, model_config=ModelConfig)
    mc = model_config_from(cfg, ModelConfig)
    assert (mc.n_layer, mc.n_head, mc.pos_emb, mc.n_embd) == (2, 4, 'rope', 768)
    assert 'lr' in cfg


def test_help_lists_keys(capsys):
    with pytest.raises(SystemExit) as e:
        run(['--help'])
    assert e.value.code == 0
    assert '--n_steps=10' in capsys.readouterr().out


def test_help_gives_each_key_its_comment_in_the_scripts_order(tmp_path, capsys):
    """--help: the script's name and the first paragraph of its docstring, then each key in the
    order the script sets it with the comment beside it (a comment continued on the lines below
    joined on; key=value text in the docstring ignored), then the model's keys with ModelConfig's
    comments."""
    script = tmp_path / 'stage.py'
    script.write_text('"""\nA toy stage.\n\nwith\nlr=3 in the text of the docstring\n"""\n'
                      "out_dir = 'out/x'     # where it writes\n"
                      'lr = 0.1              # the learning rate,\n'
                      '                      # decayed to a tenth\n'
                      'steps = 10\n')
    ns = {'__file__': str(script), '__doc__': '\nA toy stage.\n\nwith\nlr=3\n', 'out_dir': 'out/x', 'lr': 0.1,
          'steps': 10}
    with pytest.raises(SystemExit) as e:
        configure(ns, ['--help'], model_config=ModelConfig)
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f'usage: python {os.path.relpath(script)} ')
    assert 'A toy stage.' in out and 'lr=3' not in out
    own = out.split('model settings')[0]
    assert own.index('--out_dir=') < own.index('--lr=') < own.index('--steps=10')
    assert "--out_dir='out/x'\n      where it writes" in own
    assert '--lr=0.1\n      the learning rate, decayed to a tenth' in own
    model = out.split('model settings')[1]
    assert '--kv_lora_rank=512\n      width of the compressed key/value latent (what is cached)' in model


def test_help_reads_a_config_block_indented_under_main(tmp_path, capsys):
    """A script that is also imported as a module (convert_hf.py) sets its keys under
    `if __name__ == '__main__':`; --help gives them their comments too, and an indented assignment
    before that line (in a function) is not taken for a key's."""
    script = tmp_path / 'tool.py'
    script.write_text('"""\nA tool.\n"""\n'
                      'def f():\n    direction = 1   # not this one\n\n'
                      "if __name__ == '__main__':\n"
                      "    direction = 'export'   # 'export' or 'import'\n"
                      "    hf_dir = ''            # the folder\n"
                      "    hf_dir = hf_dir or 'x'\n")
    ns = {'__file__': str(script), '__doc__': '\nA tool.\n', 'direction': 'export', 'hf_dir': ''}
    with pytest.raises(SystemExit):
        configure(ns, ['--help'])
    out = capsys.readouterr().out
    assert "--direction='export'\n      'export' or 'import'\n" in out
    assert "--hf_dir=''\n      the folder" in out and 'not this one' not in out


def test_help_borrows_train_pys_comments_in_a_stage_and_shows_what_a_colon_opens(tmp_path, capsys):
    """In a training stage (a learning rate and a step count), a key the script leaves without a
    comment gets train.py's (the keys every stage shares); its own comment wins; a tool that trains
    nothing borrows none (its out_dir is no run folder). A first paragraph ending in ':' is shown
    with the paragraph it opens."""
    script = tmp_path / 'stage.py'
    script.write_text('"""\nA stage. Each step:\n\n    step one\n\nMore.\n"""\n'
                      "out_dir = 'x'\nwarmup_iters = 0\nmin_lr = 1e-5             # its own\n"
                      'learning_rate = 0.1\nmax_iters = 5\n')
    ns = {'__file__': str(script), '__doc__': '\nA stage. Each step:\n\n    step one\n\nMore.\n',
          'out_dir': 'x', 'warmup_iters': 0, 'min_lr': 1e-5, 'learning_rate': 0.1, 'max_iters': 5}
    with pytest.raises(SystemExit):
        configure(ns, ['--help'])
    out = capsys.readouterr().out
    assert 'A stage. Each step:\n\n    step one\n' in out and 'More.' not in out
    assert '--warmup_iters=0\n      steps of linear warm-up to learning_rate (from' in out
    assert '--min_lr=1e-05\n      its own' in out
    tool = {k: v for k, v in ns.items() if k not in ('learning_rate', 'max_iters')}
    with pytest.raises(SystemExit):
        configure(tool, ['--help'])
    assert "--out_dir='x'\n  --warmup_iters=0\n" in capsys.readouterr().out


def test_a_resumed_run_takes_the_settings_it_was_trained_with(tmp_path, capsys):
    """init_from='resume': keys this command does not set come from out_dir's checkpoint; those a
    config file assigns (also to the value in effect) or --key=value sets win, and both are printed;
    how this process runs (device, fsdp, ...) and the model's keys stay this command's; keys the
    script no longer has are skipped; without a checkpoint nothing changes."""
    import torch
    out = tmp_path / 'run'
    out.mkdir()
    torch.save({'config': {'init_from': 'out/sft', 'out_dir': 'elsewhere', 'lr': 2e-5, 'n_steps': 6, 'flag': True,
                           'betas': [0.8, 0.9], 'gone': 1, 'device': 'cuda', 'fsdp': True, 'n_layer': 8},
                'model': {}}, out / 'ckpt.pt')
    (tmp_path / 'cfg.py').write_text('lr = 1e-3\nn_steps = 10\n')          # n_steps: the default's value
    ns = {**defaults(), 'init_from': 'scratch', 'device': 'auto', 'fsdp': False}
    cfg = configure(ns, [str(tmp_path / 'cfg.py'), '--init_from=resume', f'--out_dir={out}', '--flag=False'],
                    model_config=ModelConfig)
    assert cfg['betas'] == (0.8, 0.9)                                     # restored (a tuple, as its default)
    assert cfg['lr'] == 1e-3 and cfg['n_steps'] == 10 and cfg['flag'] is False   # set by this command
    assert cfg['device'] == 'auto' and cfg['fsdp'] is False               # this process's own
    assert cfg['n_layer'] == ModelConfig().n_layer                        # the model: the checkpoint's config
    assert cfg['init_from'] == 'resume' and cfg['out_dir'] == str(out) and 'gone' not in cfg
    assert ns['betas'] == (0.8, 0.9)                                      # written back into the script
    printed = capsys.readouterr().out
    assert f"resuming {out} with its own settings: betas=(0.8, 0.9); changed by this command: flag=False " \
           "(was True), lr=0.001 (was 2e-05), n_steps=10 (was 6)" in printed
    _, fresh = run(['--init_from=resume', f'--out_dir={tmp_path / "none"}'], {**defaults(), 'init_from': 'scratch'})
    assert fresh['n_steps'] == 10 and fresh['lr'] == 3e-4                 # no checkpoint: the defaults


def test_a_run_prints_only_what_it_changed(capsys):
    configure(defaults(), ['--n_steps=20', '--lr=3e-4'])              # lr given its default: not a change
    assert capsys.readouterr().out == 'config, changed from the defaults: n_steps=20\n'
    configure(defaults(), [])
    assert capsys.readouterr().out == 'config, changed from the defaults: nothing\n'


def test_key_space_value_is_accepted_and_a_bare_flag_is_refused():
    _, cfg = run(['--n_steps', '20', '--out_dir', 'out/y', '--flag=True'])
    assert cfg['n_steps'] == 20 and cfg['out_dir'] == 'out/y' and cfg['flag'] is True
    msg = exit_message(['--flag', '--n_steps=3'])
    assert "'--flag' has no value; write --key=value or --key value" in msg


def test_wrong_type_names_the_value_a_config_file_set(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text('n_steps = 8\n')
    msg = exit_message([str(f), '--n_steps=2.5'])
    assert f"takes int (now 8, set by {f})" in msg and 'default' not in msg.split('valid keys')[0]


def rebound_settings(path):
    """(line, name) of each module-level statement after configure() in a script that assigns to
    one of its settings (the names assigned before configure()) without reading it: neither the
    new value nor an enclosing if / while mentions the name. `block_size = block_size or ...` and
    `if vocab_size == 0: vocab_size = ...` resolve a setting; `loss, tokens = 0, 0` in a training
    loop would silently replace the setting `loss` for every line after it."""
    src = open(path).read()
    tree = ast.parse(src)
    settings, configured = set(), None
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.Expr)) and 'configure(' in ast.get_source_segment(src, node):
            configured = node.lineno
            break
        if isinstance(node, ast.Assign):
            settings |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    found = []

    def names(node):
        return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}

    def visit(statements, guards):
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.lineno <= (configured or 1e9):
                continue
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.For)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                read = guards | (set() if isinstance(node, ast.For) else names(node.value))
                found.extend((node.lineno, n) for t in targets for n in sorted(names(t) & settings - read))
            for field in ('body', 'orelse', 'handlers', 'finalbody'):
                inner = guards | (names(node.test) if isinstance(node, (ast.If, ast.While)) and field == 'body'
                                  else set())
                visit(getattr(node, field, None) or [], inner)
    visit(tree.body, set())
    return found


def test_no_script_replaces_one_of_its_settings_by_accident(tmp_path):
    """A stage script's settings are module globals: a later assignment to the same name (a loop's
    running `loss` once replaced reward.py's loss='bt' setting, so it trained with the other loss)
    changes what every line after it reads. Each script's rebindings must resolve the setting."""
    deliberate = {('ablate.py', 'variants')}                         # a grid becomes the variants
    scripts = [os.path.relpath(p, REPO) for pattern in ('*.py', 'prepare/*.py', 'experiments/*.py')
               for p in glob.glob(os.path.join(REPO, pattern))]
    found = {(s, line, name) for s in scripts for line, name in rebound_settings(os.path.join(REPO, s))
             if (s, name) not in deliberate}
    assert len(scripts) > 30 and not found, sorted(found)
    bug = 'loss = "bt"\nconfig = configure(globals())\nfor step in range(3):\n    loss, tokens = 0.0, 0\n'
    (tmp_path / 'example.py').write_text(bug)
    assert rebound_settings(tmp_path / 'example.py') == [(4, 'loss')]

