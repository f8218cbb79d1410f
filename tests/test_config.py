import os

import pytest

from config import configure, model_config_from
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


def test_none_default_accepts_any_type():
    _, cfg = run(['--auto=5'])
    assert cfg['auto'] == 5
    _, cfg = run(['--auto=word'])
    assert cfg['auto'] == 'word'


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
    assert "unknown config key 'n_step'" in msg
    assert 'valid keys: auto, betas, flag, lr, n_steps, out_dir' in msg and '\n' not in msg


def test_config_file_runs_over_defaults_and_may_read_them(tmp_path):
    f = tmp_path / 'cfg.py'
    f.write_text('import math\nn_steps = 100\nlr = n_steps * 1e-5\n_private = 3\n')
    _, cfg = run([str(f), '--n_steps=7'])       # the command line comes after the file
    assert cfg['n_steps'] == 7 and cfg['lr'] == pytest.approx(1e-3)


def test_config_file_with_unknown_key_or_wrong_type(tmp_path):
    f = tmp_path / 'bad.py'
    f.write_text('n_stepz = 3\n')
    assert "sets unknown key 'n_stepz'" in exit_message([str(f)])
    f.write_text("n_steps = 'ten'\n")
    assert "'n_steps' takes int" in exit_message([str(f)])
    assert "config file 'missing.py' not found" in exit_message(['missing.py'])


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
