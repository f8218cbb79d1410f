"""
Settings, as nanoGPT's configurator does them: a script assigns its defaults as plain module-level
values, then

    config = configure(globals(), model_config=ModelConfig)

executes each config file named on the command line over them, then applies --key=value (or
--key value) overrides (after every config file, wherever they stand on the command line),
parsed as Python literals (true / false / none in any case too) and type-checked against the
default. An
unknown key or a value of the wrong type is an error that names the key and lists the valid
ones. The resolved values are written back into the script's globals and returned as a dict
(the checkpoint stores it). With init_from='resume', every key that no config file and no
--key=value sets takes the value the run was trained with, from out_dir's checkpoint, so that a
resumed run continues with its own settings (not those of RUN_ENVIRONMENT, nor the model's).
"""

import ast
import difflib
import os
import re
import sys
from dataclasses import fields


_CONFIG_TYPES = (int, float, bool, str, tuple, list, dict, type(None))
# what a resume does not take from the checkpoint: how this process runs, which may differ from the
# first run's (the device and precision; fsdp / expert_parallel under another number of processes,
# which the resume reshards to; compilation, graphs, profiling, logging), and what only a run's
# start reads (init_embedding)
RUN_ENVIRONMENT = {'init_from', 'out_dir', 'device', 'dtype', 'fsdp', 'expert_parallel', 'compile', 'compile_mode',
                   'cuda_graph', 'cuda_graph_train', 'profile', 'cuda_sync_check', 'peak_flops', 'eval_only',
                   'tensorboard', 'wandb_project', 'run_name', 'init_embedding'}
last_given = set()   # the keys the last configure() call's config files and --key=value set
last_set_by = {}     # ... and where each got its value: the config file's path, or '--key'
last_file_values = {}   # ... and the value the config files gave each key they set (before any --key=value)


def _config_keys(namespace):
    """The config keys of a script: its public module-level values of plain types
    (UPPER_CASE names are constants, e.g. imported lists of choices, not keys)."""
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and not k.isupper() and isinstance(v, _CONFIG_TYPES)}


def _checked(key, value, default, valid, origin, current=None):
    """Return `value` if it may replace `default`, else exit with one line saying why (naming
    `current`, the value in effect, where a config file changed it from the default).
    Rules: a None default accepts anything (it means 'auto' or 'off'); an int is accepted for
    a float; list and tuple are interchangeable; bool is never accepted for int or vice versa."""
    if default is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        value = type(default)(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        now = f'now {current[0]!r}, set by {current[1]}' if current else f'default {default!r}'
        sys.exit(f"error: {origin} sets '{key}' to {value!r} of type {type(value).__name__}, "
                 f"but '{key}' takes {type(default).__name__} ({now}); "
                 f"valid keys: {', '.join(sorted(valid))}")
    return value


def _parse_value(key, raw, default):
    """--key=value: a Python literal, or the raw text where the default is a string; true, false
    and none in any case are True, False, None. A key whose default is None ('auto': compile,
    cuda_graph, chat; ablate.py's base) keeps other text only where it reads as a path (a / or a .
    in it: --base=config/x.py); a bare word is refused, since kept as text, --compile=no or a typo
    such as --compile=flase would be a non-empty string, which is true."""
    if isinstance(default, str):
        return raw
    words = {'true': True, 'false': False, 'none': None}
    if raw.strip().lower() in words:
        return words[raw.strip().lower()]
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if default is None and re.fullmatch(r'[\w.~-]*[/.][\w./~-]*', raw):
            return raw
        takes = (f"True, False, None, a path or another Python literal; text in quotes: --{key}=\"'text'\""
                 if default is None else f'{type(default).__name__}, default {default!r}')
        sys.exit(f"error: --{key}={raw} is not a Python literal ('{key}' takes {takes})")


def configure(namespace, argv=None, model_config=None, verbose=True, ignore_unknown_in_files=False):
    """Resolve a script's config in place and return it as a dict.

    `namespace` is the script's globals(): every public int/float/bool/str/tuple/list/dict/None
    value in it is a config key. `model_config` (a dataclass such as model.ModelConfig) adds
    its fields as keys too, with the dataclass defaults unless the script set its own, so
    `--n_layer=4` works in every training script without repeating the model's fields.
    Then each config file named on the command line is executed over the values (a config file
    may read earlier values, e.g. `lr_decay_iters = max_iters`), then each --key=value (or
    --key value: the next argument is the value unless it starts with --).
    An unknown key or a value of the wrong type exits with one line naming the key.
    With ignore_unknown_in_files, keys a config file sets that this script does not have are
    skipped (so e.g. bench.py can read training configs); --key=value is always strict.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    config = _config_keys(namespace)
    if model_config is not None:
        for f in fields(model_config):
            if f.name not in config:
                config[f.name] = f.default
    defaults = dict(config)
    valid = set(defaults)

    if any(a in ('-h', '--help') for a in argv):
        print(_help(namespace, defaults, model_config))
        sys.exit(0)

    args, i = [], 0
    while i < len(argv):                                   # --key value -> --key=value
        arg = argv[i]
        if arg.startswith('--') and '=' not in arg:
            if i + 1 == len(argv) or argv[i + 1].startswith('--'):
                sys.exit(f"error: '{arg}' has no value; write --key=value or --key value")
            arg, i = f'{arg}={argv[i + 1]}', i + 1
        args.append(arg)
        i += 1
    set_by = {}                                            # key -> the config file that set it
    file_values = {}                                       # key -> the value a config file set
    given = set()                                          # the keys a config file or --key=value sets
    # the config files first, in their order, then the overrides: an override written before a
    # config file still wins over it
    args = [a for a in args if not a.startswith('--')] + [a for a in args if a.startswith('--')]
    for arg in args:
        if not arg.startswith('--'):                      # a config file
            if not os.path.isfile(arg):
                if '=' in arg and arg.split('=')[0] in valid:        # a setting without its dashes
                    sys.exit(f"error: config file '{arg}' not found; a setting is written --{arg}")
                folder = os.path.dirname(arg) or '.'
                there = sorted(f for f in os.listdir(folder) if f.endswith('.py')) if os.path.isdir(folder) else []
                sys.exit(f"error: config file '{arg}' not found"
                         + (f"; {folder}/ holds {', '.join(there)}" if there else ''))
            scope = dict(config)
            with open(arg) as f:
                source = f.read()
            exec(compile(source, arg, 'exec'), scope)
            given |= _assigned_names(source) & valid           # also where it assigns the value in effect
            for k, v in scope.items():
                if k.startswith('_') or k.isupper() or not isinstance(v, _CONFIG_TYPES):
                    continue                               # imports, helpers, constants, private
                if k not in valid and ignore_unknown_in_files:
                    continue
                if k not in valid:
                    hint = (_did_you_mean(k, valid)
                            or f" (a helper value of the file's own: name it _{k} or {k.upper()})")
                    sys.exit(f"error: config file {arg} sets unknown key '{k}'{hint}; "
                             f"valid keys: {', '.join(sorted(valid))}")
                if v is not config[k] and v != config[k]:
                    config[k] = _checked(k, v, defaults[k], valid, f'config file {arg}')
                    set_by[k] = arg
                    file_values[k] = config[k]
                    given.add(k)
        else:                                              # --key=value
            key, _, raw = arg[2:].partition('=')
            if key not in valid:
                sys.exit(f"error: unknown config key '{key}' (from {arg}){_did_you_mean(key, valid)}; "
                         f"valid keys: {', '.join(sorted(valid))}")
            value = _parse_value(key, raw, defaults[key])
            current = (config[key], set_by[key]) if key in set_by else None
            config[key] = _checked(key, value, defaults[key], valid, f'--{key}', current)
            given.add(key)
            set_by[key] = f'--{key}'
    if config.get('init_from') == 'resume' and isinstance(config.get('out_dir'), str):
        model_keys = {f.name for f in fields(model_config)} if model_config is not None else set()
        _resume_settings(config, defaults, valid - model_keys, given, verbose and int(os.environ.get('RANK', 0)) == 0)

    namespace.update(config)
    last_given.clear()
    last_given.update(given)
    last_set_by.clear()
    last_set_by.update(set_by)
    last_file_values.clear()
    last_file_values.update(file_values)
    if verbose and int(os.environ.get('RANK', 0)) == 0:
        # what this run changed; every value is in the checkpoint ('config') and --help lists the defaults
        changed = {k: v for k, v in config.items() if v != defaults[k]}
        print('config, changed from the defaults: ' + (', '.join(f'{k}={v!r}' for k, v in sorted(changed.items()))
                                                       or 'nothing'))
    return config


def _assigned_names(source):
    """The names a config file assigns at its top level (x = ..., x += ..., x: int = ...)."""
    names = set()
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def _resume_settings(config, defaults, valid, given, verbose):
    """init_from='resume': the keys in `valid` this command does not set take the values out_dir's
    checkpoint was trained with (the learning rate, the batch, the data), except RUN_ENVIRONMENT's;
    the ones it sets win, and both kinds of difference from the run's own values are printed. (The
    model's keys are left out of `valid`: the scripts build a resumed model from the checkpoint's own
    model_config.)"""
    from checkpoint import saved_meta
    saved = saved_meta(config['out_dir'], 'config')
    if not saved:
        return                                             # no checkpoint: the script says so
    restored, changed = {}, {}
    for k, v in saved.items():
        if k in RUN_ENVIRONMENT or k not in valid or v == config[k]:
            continue
        if k in given:
            changed[k] = v
        else:
            config[k] = restored[k] = _checked(k, v, defaults[k], valid, f"{config['out_dir']}'s checkpoint")
    if verbose and (restored or changed):
        print(f"resuming {config['out_dir']} with its own settings"
              + (f": {', '.join(f'{k}={v!r}' for k, v in sorted(restored.items()))}" if restored else '')
              + (f"; changed by this command: {', '.join(f'{k}={config[k]!r} (was {v!r})' for k, v in sorted(changed.items()))}"
                 if changed else ''))


def _key_comments(path):
    """{key: its comment} from the assignments of a source file, `key = value  # comment` (a
    script's config block) or `key: type = value  # comment` (a dataclass field), in the order the
    file first assigns each ('' where it has no comment), the comment lines right below that
    continue it joined on. A script that is also imported (convert_hf.py) keeps its config block
    indented under `if __name__ == '__main__':`; from that line on, indented `key = value` counts too."""
    comments, last, in_main = {}, None, False
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return comments
    in_string = False
    for line in lines:
        if in_string or line.count('"""') % 2:             # docstrings (their text may read key=value)
            in_string ^= line.count('"""') % 2 == 1
            last = None
            continue
        in_main = in_main or line.startswith('if __name__ ==')
        # module level: key = ... (indented too under __main__); a dataclass field (indented): key: type = ...
        key = r'\s*(\w+)\s*' if in_main else r'(\w+)\s*'
        m = re.match(rf'(?:{key}|\s+(\w+)\s*:[^=#]*)=(?!=)[^#]*(?:#\s?(.*))?$', line)
        if m:
            m = (m.group(1) or m.group(2), m.group(3))
            last = m[0] if m[0] not in comments else None
            if last:
                comments[last] = (m[1] or '').strip()                   # '' (no comment) keeps its place
        elif last and comments[last] and re.match(r'\s+#', line) and line.index('#') > 20:   # continued
            comments[last] += ' ' + line.strip().lstrip('#').strip()
        else:
            last = None
    return comments


def _help(namespace, defaults, model_config):
    """--help: the script's usage (the first paragraph of its docstring) and every key with its
    default and the comment beside it in the script (or in the model's config class)."""
    script = namespace.get('__file__') or 'SCRIPT.py'
    paragraphs = (namespace.get('__doc__') or '').strip().split('\n\n')
    doc = '\n\n'.join(paragraphs[:2] if paragraphs[0].endswith(':') else paragraphs[:1])   # (and what its ':' opens)
    comments = _key_comments(script)
    # in a training stage (it has a learning rate and a step count), a key the script leaves without
    # a comment but train.py describes (the optimizer, schedule, system and logging keys every stage
    # shares, set 'as in train.py') gets train.py's comment
    if {'learning_rate', 'max_iters'} <= set(defaults):
        shared = _key_comments(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py'))
        comments.update({k: shared[k] for k, text in comments.items() if not text and shared.get(k)})
    model_keys = []
    if model_config is not None:
        model_comments = _key_comments(sys.modules[model_config.__module__].__file__)
        model_keys = [f.name for f in fields(model_config) if f.name not in comments]
        comments = {**model_comments, **comments}
    order = {k: i for i, k in enumerate(comments)}           # the source's order: keys grouped as written
    own = sorted((k for k in defaults if k not in model_keys), key=lambda k: (order.get(k, len(order)), k))

    def rows(keys):
        return [f'  --{k}={defaults[k]!r}' + (f'\n      {comments[k]}' if comments.get(k) else '') for k in keys]
    out = [f'usage: python {os.path.relpath(script)} [config/FILE.py ...] [--key=value ...]']
    out += [doc, ''] if doc else []
    out += ['settings (default, then what it does):'] + rows(own)
    if model_keys:
        out += ['', f'model settings ({model_config.__name__}; a checkpoint keeps them):'] + rows(model_keys)
    return '\n'.join(out)


def _did_you_mean(key, valid):
    """' (did you mean 'n_layer'?)' for the closest valid keys of a mistyped one, else ''."""
    close = difflib.get_close_matches(key, sorted(valid), n=3, cutoff=0.75)
    return f" (did you mean {' or '.join(repr(k) for k in close)}?)" if close else ''


def model_config_from(config, model_config_cls):
    """The model dataclass built from the model fields of a resolved config dict."""
    return model_config_cls(**{f.name: config[f.name] for f in fields(model_config_cls)})
