"""
The plumbing every stage shares, kept in one small file so no stage copies it:

  configure()            module-level defaults <- config file(s) <- --key=value overrides
  init_runtime()         device, dtype, autocast, seeds, torch.distributed (torchrun)
  save/load_checkpoint   atomic checkpoint I/O; load_model() rebuilds model + tokenizer
  lr_at()                warmup + cosine / warmup-stable-decay / constant schedules
  TokenData              memory-mapped train.bin / val.bin batches (the prepare/ format)
  write_token_dataset()  the writer of that format (used by prepare/ and distill)
  RunLog                 log.jsonl, loss-curve PNG, optional TensorBoard / wandb
  measure_peak_flops()   the denominator of MFU, measured with a large matmul
"""

import ast
import contextlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, fields

import numpy as np
import torch

# -----------------------------------------------------------------------------
# Config: python SCRIPT.py [config/FILE.py ...] [--key=value ...]

_CONFIG_TYPES = (int, float, bool, str, tuple, list, dict, type(None))


def _config_keys(namespace):
    """The config keys of a script: its public module-level values of plain types
    (UPPER_CASE names are constants, e.g. imported lists of choices, not keys)."""
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and not k.isupper() and isinstance(v, _CONFIG_TYPES)}


def _checked(key, value, default, valid, origin):
    """Return `value` if it may replace `default`, else exit with one line saying why.
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
        sys.exit(f"error: {origin} sets '{key}' to {value!r} of type {type(value).__name__}, "
                 f"but '{key}' takes {type(default).__name__} (default {default!r}); "
                 f"valid keys: {', '.join(sorted(valid))}")
    return value


def _parse_value(key, raw, default):
    """--key=value: a Python literal, or the raw text where the default is a string."""
    if isinstance(default, str):
        return raw
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if default is None:
            return raw          # an 'auto' key given a bare word, e.g. --compile=... stays text
        sys.exit(f"error: --{key}={raw} is not a Python literal "
                 f"('{key}' takes {type(default).__name__}, default {default!r})")


def configure(namespace, argv=None, model_config=None, verbose=True, ignore_unknown_in_files=False,
              defaults=None):
    """Resolve a script's config in place and return it as a dict.

    `namespace` is the script's globals(): every public int/float/bool/str/tuple/list/dict/None
    value in it is a config key. `model_config` (a dataclass such as model.ModelConfig) adds
    its fields as keys too, with the dataclass defaults unless the script set its own, so
    `--n_layer=4` works in every training script without repeating the model's fields;
    `defaults` (e.g. training_defaults()) adds shared keys the same way.
    Then each config file named on the command line is executed over the values (a config file
    may read earlier values, e.g. `lr_decay_iters = max_iters`), then each --key=value.
    An unknown key or a value of the wrong type exits with one line naming the key.
    With ignore_unknown_in_files, keys a config file sets that this script does not have are
    skipped (so e.g. bench.py can read training configs); --key=value is always strict.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    config = _config_keys(namespace)
    for k, v in (defaults or {}).items():                  # shared defaults (training_defaults())
        config.setdefault(k, v)
    if model_config is not None:
        for f in fields(model_config):
            if f.name not in config:
                config[f.name] = f.default
    defaults = dict(config)
    valid = set(defaults)

    if any(a in ('-h', '--help') for a in argv):
        print('usage: python SCRIPT.py [config/FILE.py ...] [--key=value ...]\nconfig keys:')
        for k in sorted(defaults):
            print(f'  --{k}={defaults[k]!r}')
        sys.exit(0)

    for arg in argv:
        if not arg.startswith('--'):                      # a config file
            if not os.path.isfile(arg):
                sys.exit(f"error: config file '{arg}' not found")
            scope = dict(config)
            with open(arg) as f:
                exec(compile(f.read(), arg, 'exec'), scope)
            for k, v in scope.items():
                if k.startswith('_') or k.isupper() or not isinstance(v, _CONFIG_TYPES):
                    continue                               # imports, helpers, constants, private
                if k not in valid and ignore_unknown_in_files:
                    continue
                if k not in valid:
                    sys.exit(f"error: config file {arg} sets unknown key '{k}'; "
                             f"valid keys: {', '.join(sorted(valid))}")
                if v is not config[k] and v != config[k]:
                    config[k] = _checked(k, v, defaults[k], valid, f'config file {arg}')
        else:                                              # --key=value
            key, eq, raw = arg[2:].partition('=')
            if not eq:
                sys.exit(f"error: '{arg}' must look like --key=value")
            if key not in valid:
                sys.exit(f"error: unknown config key '{key}' (from {arg}); "
                         f"valid keys: {', '.join(sorted(valid))}")
            value = _parse_value(key, raw, defaults[key])
            config[key] = _checked(key, value, defaults[key], valid, f'--{key}')

    namespace.update(config)
    if verbose and int(os.environ.get('RANK', 0)) == 0:
        changed = {k: v for k, v in config.items() if v != defaults[k]}
        print('config: ' + ', '.join(f'{k}={v!r}' for k, v in sorted(config.items())))
        if changed:
            print('changed from defaults: ' + ', '.join(f'{k}={v!r}' for k, v in sorted(changed.items())))
    return config


def model_config_from(config, model_config_cls):
    """The model dataclass built from the model fields of a resolved config dict."""
    return model_config_cls(**{f.name: config[f.name] for f in fields(model_config_cls)})


# -----------------------------------------------------------------------------
# Runtime: device, dtype, autocast, distributed

@dataclass
class Runtime:
    device: str            # 'cuda:0', 'cpu', 'mps'
    device_type: str       # 'cuda', 'cpu', 'mps'
    dtype: str             # 'float32' | 'bfloat16' | 'float16' (compute dtype under autocast)
    ddp: bool
    rank: int
    local_rank: int
    world_size: int

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        """bf16/fp16 autocast on accelerators; plain float32 otherwise."""
        if self.dtype == 'float32':
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=getattr(torch, self.dtype))


def init_runtime(device='auto', dtype='auto', seed=1337):
    """Pick the device and dtype, start torch.distributed when launched by torchrun (one process
    per GPU: NCCL on CUDA, gloo on the CPU), and seed every RNG with `seed` on EVERY rank, so that
    every rank builds the same model (FSDP shards it without a broadcast). Trainer then moves ranks
    > 0 to their own stream (seed + rank) for dropout; batches are drawn from explicit generators
    (Trainer.batch_generator), so they differ per rank by construction."""
    ddp = int(os.environ.get('RANK', -1)) != -1
    if ddp:
        rank, local_rank = int(os.environ['RANK']), int(os.environ['LOCAL_RANK'])
        world_size = int(os.environ['WORLD_SIZE'])
    else:
        rank, local_rank, world_size = 0, 0, 1
    if device == 'auto':
        if torch.cuda.is_available():
            device = 'cuda'
        elif getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
            device = 'mps'
        else:
            device = 'cpu'
    if device == 'cuda':
        device = f'cuda:{local_rank}'                  # set_device needs the index (torch 2.11)
    device_type = device.split(':')[0]
    if device_type == 'cuda':
        if not torch.cuda.is_available():
            sys.exit(f"error: device='{device}' but CUDA is not available; use --device=cpu or auto")
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if dtype == 'auto':
        dtype = 'bfloat16' if device_type == 'cuda' and torch.cuda.is_bf16_supported() else 'float32'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        sys.exit(f"error: dtype='{dtype}'; valid: auto, float32, bfloat16, float16")
    if ddp:
        import datetime
        import torch.distributed as dist
        # rank 0 evaluates (and may sample text) while the others wait in a collective: allow it
        # an hour rather than the default 10 minutes before a waiting rank gives up
        dist.init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo',
                                timeout=datetime.timedelta(hours=1))
    torch.manual_seed(seed)
    return Runtime(device, device_type, dtype, ddp, rank, local_rank, world_size)


def close_runtime(rt):
    if rt.ddp:
        import torch.distributed as dist
        dist.barrier()              # rank 0 may still be writing plots: leave together (a rank
        dist.destroy_process_group()   # that tears gloo down alone can abort the other)


def all_ranks(x):
    """The concatenation over ranks of a tensor x (the same shape on every rank) along dim 0,
    e.g. every rank's rollout rewards for statistics that must agree everywhere; x itself in a
    single process. A collective: every rank must call it."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def synchronize(device_type):
    if device_type == 'cuda':
        torch.cuda.synchronize()


class CUDAGraphStep:
    """A whole training step (forward, backward, optimizer, ...) replayed as one CUDA graph: its
    ~1,300 kernels go to the GPU in one launch, so the GPU no longer idles while Python catches up
    (the gaps in bench.py's idle table).
        step = CUDAGraphStep(fn, warmup=3);  out = step(*inputs)   # every step
    The first `warmup` calls run fn as it is, on a side stream (torch.compile, autotuning and the
    allocator settle there, as capture requires); the next call captures fn in a graph, then
    replays it, and every later call only replays it. Each call copies `inputs` (tensors, or
    lists / tuples of them, e.g. this step's batches) into the tensors fn was first given, so fn
    must read its inputs only from its arguments. fn must never wait on the device (no .item(),
    no shapes that depend on data) and must keep what it returns in tensors: after the capture,
    every call returns the same objects, the captured step's outputs, rewritten by each replay.
    Gradients set to None at the end of fn are right: the captured backward then writes them
    afresh at every replay instead of adding to them."""

    def __init__(self, fn, warmup=3):
        self.fn, self.warmup_left = fn, warmup
        self.static, self.graph, self.out, self.side = None, None, None, None

    @staticmethod
    def _copy(dst, src):
        if torch.is_tensor(dst):
            dst.copy_(src, non_blocking=True)
        else:
            for d, s in zip(dst, src):
                CUDAGraphStep._copy(d, s)

    def __call__(self, *inputs):
        if self.static is None:
            self.static = inputs
        else:
            self._copy(self.static, inputs)
        if self.warmup_left > 0:
            self.warmup_left -= 1
            self.side = self.side or torch.cuda.Stream()
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = self.fn(*self.static)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.fn(*self.static)
        self.graph.replay()
        return self.out


# -----------------------------------------------------------------------------
# Checkpoints: one dict, loadable with torch.load(weights_only=True), written atomically

def save_checkpoint(out_dir, ckpt, name='ckpt.pt'):
    """Write to a temporary name and rename, so a crash never leaves a broken checkpoint."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    tmp = path + '.tmp'
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    return path


SHARDED_DIR = 'ckpt_dcp'       # out_dir/ckpt_dcp/: the sharded checkpoint of an fsdp=True run


def checkpoint_path(path):
    """Where the checkpoint of a run folder is: 'out/run' -> 'out/run/ckpt.pt', or
    'out/run/ckpt_dcp' for a sharded (FSDP) one, whichever was written last; a file path is
    returned unchanged."""
    if not os.path.isdir(path):
        return path
    candidates = [p for p in (os.path.join(path, 'ckpt.pt'), os.path.join(path, SHARDED_DIR, 'meta.pt'))
                  if os.path.isfile(p)]
    if not candidates:
        return os.path.join(path, 'ckpt.pt')
    newest = max(candidates, key=os.path.getmtime)
    return os.path.dirname(newest) if newest.endswith('meta.pt') else newest


def load_checkpoint(path, map_location='cpu'):
    """The checkpoint dict of a run folder (or a ckpt.pt file). A sharded checkpoint (ckpt_dcp/,
    written by fsdp=True) is read back whole in this one process, without torch.distributed: its
    metadata plus the full model weights gathered from the shards under 'model', so sample.py,
    eval.py and a later stage's init_from= read it like ckpt.pt; 'sharded_dir' names the folder
    (Trainer resumes the optimizer state from it, resharded to the new number of ranks)."""
    p = checkpoint_path(path)
    if os.path.isdir(p):
        return load_sharded_checkpoint(p)
    if not os.path.isfile(p):
        sys.exit(f"error: no checkpoint at '{p}' (expected an out_dir holding ckpt.pt or {SHARDED_DIR}/)")
    return torch.load(p, map_location=map_location, weights_only=True)


def save_sharded_checkpoint(out_dir, model, optimizer, meta):
    """fsdp=True: every rank writes its shards of the model and optimizer state with
    torch.distributed.checkpoint (DCP) into out_dir/ckpt_dcp.tmp/, rank 0 adds meta.pt (the rest
    of the checkpoint dict: configs, tokenizer, step, RNG, metrics) and renames the folder to
    ckpt_dcp/, so a crash never leaves a half-written checkpoint. A collective: every rank calls
    it. State dicts are keyed by parameter name (get_state_dict), which is what lets DCP load them
    back on any number of ranks, or whole in one process (load_sharded_checkpoint)."""
    import shutil
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final = os.path.join(out_dir, SHARDED_DIR)
    tmp, old = final + '.tmp', final + '.old'
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({'model': model_state, 'optimizer': optimizer_state}, checkpoint_id=tmp)
    if dist.get_rank() == 0:
        torch.save(meta, os.path.join(tmp, 'meta.pt'))
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(os.path.join(out_dir, 'ckpt.pt')):     # one checkpoint per run folder
            os.remove(os.path.join(out_dir, 'ckpt.pt'))
    dist.barrier()                                   # no rank reads it before it is complete
    return final


def load_sharded_checkpoint(folder):
    """A sharded checkpoint read whole in this process (no torch.distributed needed): meta.pt plus
    'model', the full weights. DCP's metadata gives each tensor's global shape and dtype; DCP
    then fills full-size tensors from however many shards were written."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    meta_path = os.path.join(folder, 'meta.pt')
    if not os.path.isfile(meta_path):
        sys.exit(f"error: '{folder}' is not a complete sharded checkpoint (no meta.pt)")
    ckpt = torch.load(meta_path, map_location='cpu', weights_only=True)
    metadata = dcp.FileSystemReader(folder).read_metadata()
    weights = {k[len('model.'):]: torch.empty(m.size, dtype=m.properties.dtype)
               for k, m in metadata.state_dict_metadata.items()
               if k.startswith('model.') and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():              # DCP warns that it loads in a single process
        warnings.simplefilter('ignore', UserWarning)
        dcp.load({'model': weights}, checkpoint_id=folder, no_dist=True)
    return {**ckpt, 'model': weights, 'sharded_dir': folder}


def load_sharded_optimizer(model, optimizer, folder):
    """Resume the optimizer state of a sharded checkpoint into `optimizer` (of `model`: sharded by
    FSDP, wrapped in nothing, or plain on one rank): DCP reshards it to this run's ranks. The
    optimizer's state is first initialised (get_optimizer_state_dict takes one step at lr 0) so
    that DCP knows what to fill. A collective under torch.distributed."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    state = get_optimizer_state_dict(model, optimizer)
    with warnings.catch_warnings():              # a single process: DCP says so
        warnings.simplefilter('ignore', UserWarning)
        dcp.load({'optimizer': state}, checkpoint_id=folder, no_dist=not dist.is_initialized())
    set_optimizer_state_dict(model, optimizer, state)


def load_model(path, device='cpu', ckpt=None, overrides=None, scalar=False):
    """Rebuild (model, tokenizer, ckpt) from any stage's checkpoint; `overrides` replace fields of
    its ModelConfig that do not change the weights (e.g. {'dropout': 0.1}). With scalar=True a
    language model's checkpoint becomes a ScalarModel (its weights plus a new scalar head)."""
    from model import GPT, ModelConfig, ScalarModel
    from tokenizer import tokenizer_from_spec
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    is_scalar = ckpt.get('model_class') == 'scalar'
    cls = ScalarModel if is_scalar or scalar else GPT
    model = cls(ModelConfig(**{**ckpt['model_config'], **(overrides or {})}))
    missing, unexpected = model.load_state_dict(ckpt['model'], strict=False)
    if unexpected or [k for k in missing if not (scalar and not is_scalar and k.startswith('score_head.'))]:
        raise RuntimeError(f'{path}: the checkpoint does not fit its model: missing {missing[:4]}, '
                           f'unexpected {unexpected[:4]}')
    model.to(device)
    return model, tokenizer_from_spec(ckpt['tokenizer']), ckpt


def load_chat_model(path, device='cpu', ckpt=None, overrides=None, scalar=False):
    """(model, tokenizer, ckpt) ready for the chat template: the checkpoint's tokenizer with the
    template's special tokens added if it lacks them, and the model's vocabulary grown (padded to
    a multiple of 64) if those ids do not fit in it."""
    from tokenizer import with_chat_tokens
    model, tok, ckpt = load_model(path, device, ckpt, overrides, scalar)
    if not tok.chat:
        tok = with_chat_tokens(tok)
    if tok.vocab_size > model.config.vocab_size:
        model.resize_vocab(64 * math.ceil(tok.vocab_size / 64))
    return model, tok, ckpt


def chat_batch(rows, pad_id, T=None):
    """(x, y) for a list of (ids, mask) pairs, e.g. from tok.encode_chat: x the tokens, y the next
    token where the mask is on and -1 elsewhere (prompt, padding: no loss). Rows are right-padded
    with pad_id, or cut, to T tokens (default: the longest row minus one)."""
    T = T or max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, (ids, mask) in enumerate(rows):
        n = min(len(ids) - 1, T)
        x[b, :n] = torch.tensor(ids[:n])
        y[b, :n] = torch.tensor([t if m else -1 for t, m in zip(ids[1:n + 1], mask[1:n + 1])])
    return x, y


def encode_chat_examples(tok, rows, block_size):
    """(ids, mask) of each {'prompt', 'response'} record with the chat template (tok.encode_chat),
    cut to block_size + 1 tokens; and how many records were cut."""
    out, cut = [], 0
    for r in rows:
        ids, mask = tok.encode_chat(r['prompt'], r['response'])
        cut += len(ids) > block_size + 1
        out.append((ids[:block_size + 1], mask[:block_size + 1]))
    return out, cut


def pack_chat_examples(examples, pool, batch_size, block_size, generator):
    """batch_size rows of block_size + 1 tokens for chat_batch: each row is random examples
    (ids, mask), drawn from `pool` (indices into `examples`), concatenated until it is full, with
    their masks kept, so a window holds several examples and no padding (sft.py, distill.py)."""
    rows = []
    for _ in range(batch_size):
        ids, mask = [], []
        while len(ids) < block_size + 1:
            e_ids, e_mask = examples[pool[int(torch.randint(len(pool), (1,), generator=generator))]]
            ids, mask = ids + e_ids, mask + e_mask
        rows.append((ids[:block_size + 1], mask[:block_size + 1]))
    return rows


def use_cuda_graph(value, device_type):
    """A script's cuda_graph setting resolved: None means on for CUDA (the captured one-token step
    of model.DecodeGraph gives the answers of eager decoding, several times faster), off elsewhere;
    True / False as given. Anything else is refused by name."""
    if value is None:
        return device_type == 'cuda'
    if isinstance(value, bool):
        return value
    raise ValueError(f'cuda_graph={value!r}; valid: None (on for CUDA), True, False')


@torch.no_grad()
def generate_chat(model, tok, prompts, max_new_tokens=256, temperature=0.0, top_k=None, top_p=None,
                  batch_size=32, autocast=contextlib.nullcontext, generator=None, cuda_graph=False):
    """Responses to `prompts` (strings) with the chat template, in left-padded batches through the
    KV cache. Returns one dict per prompt: 'ids' (the response tokens, without the stop token),
    'text', and 'ended' (True if the model ended its turn with <|end|> or EOT).
    cuda_graph=True: a static cache whose one-token step is captured once per batch and replayed
    (model.DecodeGraph; the same static steps run eagerly on the CPU). Under autocast the float32
    weights are cast once per batch (autocast caches the casts of weights within its context, so
    the captured step reads the cached bf16 copies)."""
    device = next(model.parameters()).device
    stops = tok.stop_ids()
    out = []
    for i in range(0, len(prompts), batch_size):
        from model import pad_prompts
        chunk = [tok.encode_chat(p)[0] for p in prompts[i:i + batch_size]]
        idx, mask = pad_prompts(chunk, pad_id=tok.eot_id, device=device)
        with autocast():
            new = list(model.generate_tokens(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                             top_p=top_p, stop_ids=stops, vocab_limit=tok.vocab_size,
                                             prompt_mask=mask, generator=generator, cuda_graph=cuda_graph))
        new = torch.stack(new, 1).tolist() if new else [[] for _ in chunk]
        for row in new:
            end = next((j for j, t in enumerate(row) if t in stops), None)
            ids = row if end is None else row[:end]
            out.append({'ids': ids, 'text': tok.decode(ids), 'ended': end is not None})
    return out


def evaluate_task(model, tok, prompts, max_new_tokens=256, temperature=0.0, top_k=None,
                  batch_size=64, autocast=contextlib.nullcontext, seed=1337, cuda_graph=False):
    """Answer held-out prompts (dicts with 'prompt', 'words', 'features') and score the answers
    with the task rule: the means of score, words, ended and repetition, the share using all
    required words, one example, and the per-prompt answers and scores."""
    from task import score
    raw = model._orig_mod if hasattr(model, '_orig_mod') else model
    device = next(raw.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    answers = generate_chat(raw, tok, [p['prompt'] for p in prompts], max_new_tokens, temperature,
                            top_k=top_k, batch_size=batch_size, autocast=autocast, generator=g,
                            cuda_graph=cuda_graph)
    scores = [score(a['text'], p['words'], p.get('features'), a['ended']) for a, p in zip(answers, prompts)]
    n = max(len(scores), 1)
    mean = lambda key: sum(float(s[key]) for s in scores) / n      # noqa: E731
    return {'score': mean('score'), 'all_words': mean('all_words'), 'words': mean('words'),
            'ended': sum(a['ended'] for a in answers) / n, 'repetition': mean('repetition'),
            'example': {'prompt': prompts[0]['prompt'], 'answer': answers[0]['text']} if prompts else None,
            'answers': answers, 'scores': scores}


def read_jsonl(path, required=(), hint=''):
    """The records of a JSONL file; exits with a clear message if it is missing, a line is not
    JSON, or a record lacks one of the `required` fields."""
    if not os.path.isfile(path):
        sys.exit(f"error: '{path}' not found" + (f'; {hint}' if hint else ''))
    rows = []
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f'error: {path} line {n} is not JSON ({e.msg})')
            missing = [k for k in required if k not in r]
            if missing:
                sys.exit(f'error: {path} line {n} lacks {missing}')
            rows.append(r)
    return rows


def rank_correlation(a, b):
    """Spearman's rank correlation of two sequences (ties get their average rank)."""
    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind='stable')
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):                          # average the ranks of ties
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float('nan')
    return float(np.corrcoef(ra, rb)[0, 1])


def capture_rng_state():
    """RNG states for an exact resume (dropout, sampling)."""
    state = {'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# -----------------------------------------------------------------------------
# Learning-rate schedules

def lr_at(step, lr, min_lr, warmup_iters, decay_iters, schedule='cosine', decay_frac=0.2):
    """Learning rate at `step` (0-based).
    warmup: linear from lr/(warmup+1) to lr over `warmup_iters` steps, then
    cosine:   min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * t)),  t = progress in [0, 1] to decay_iters
    wsd:      lr (stable) until the last `decay_frac` of decay_iters, then linear down to min_lr
    constant: lr
    After decay_iters the rate stays at min_lr."""
    if step < warmup_iters:
        return lr * (step + 1) / (warmup_iters + 1)
    if schedule == 'constant':
        return lr
    if step >= decay_iters:
        return min_lr
    if schedule == 'cosine':
        t = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == 'wsd':
        decay_start = max(warmup_iters, int(decay_iters * (1 - decay_frac)))
        if step < decay_start:
            return lr
        t = (step - decay_start) / max(1, decay_iters - decay_start)
        return lr + (min_lr - lr) * t
    raise ValueError(f"lr_schedule='{schedule}'; valid: cosine, wsd, constant")


# -----------------------------------------------------------------------------
# Token data: data/<name>/{train,val}.bin (uint16 or uint32) + meta.json

def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


class TokenData:
    """Random contiguous windows from memory-mapped token files, as nanoGPT does.
    Batches are a pure function of the generator, so a run that seeds the generator from its
    step number reads the same batches after a resume."""

    def __init__(self, data_dir):
        meta_path = os.path.join(data_dir, 'meta.json')
        if not os.path.isfile(meta_path):
            sys.exit(f"error: no dataset at '{data_dir}' (missing meta.json); "
                     f"run a prepare/ script first, e.g. python prepare/tinystories.py")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.data_dir = data_dir
        self.dtype = np.dtype(self.meta['dtype'])
        self.lengths = {}
        for split in ('train', 'val'):
            p = os.path.join(data_dir, f'{split}.bin')
            if not os.path.isfile(p):
                sys.exit(f"error: '{p}' is missing; re-run the prepare script for this dataset")
            self.lengths[split] = os.path.getsize(p) // self.dtype.itemsize

    def tokens(self, split):
        # a fresh memmap per call: numpy's memmap keeps pages alive otherwise (nanoGPT's note)
        return np.memmap(os.path.join(self.data_dir, f'{split}.bin'), dtype=self.dtype, mode='r')

    def bytes_per_token(self, split):
        """UTF-8 bytes of text per token, for bits per byte = loss / ln 2 / bytes_per_token."""
        return self.meta[f'{split}_bytes'] / self.meta[f'{split}_tokens']

    def batch(self, split, batch_size, block_size, generator, device='cpu'):
        """x, y of shape (batch_size, block_size); y is x shifted left by one token."""
        n = self.lengths[split]
        if n <= block_size + 1:
            sys.exit(f"error: the {split} split has {n} tokens, fewer than block_size+1 = "
                     f"{block_size + 1}; lower block_size or prepare more data")
        data = self.tokens(split)
        ix = torch.randint(n - block_size - 1, (batch_size,), generator=generator).tolist()
        buf = np.stack([data[i:i + block_size + 1] for i in ix]).astype(np.int64)
        xy = torch.from_numpy(buf)
        if str(device).startswith('cuda'):
            xy = xy.pin_memory().to(device, non_blocking=True)
        else:
            xy = xy.to(device)
        return xy[:, :-1], xy[:, 1:]


def read_documents(path, fields=('text', 'story')):
    """Documents from a local file or folder, as a dict {split: [str, ...]}.

    Formats: .txt (documents separated by lines that are exactly <|endoftext|>, as in the official
    TinyStories files; a file without such lines is one document), .jsonl / .json (objects with
    a 'text' or 'story' field) and .parquet (a 'text' column). In a folder, a file whose name
    contains 'val' or 'valid' goes to 'val', one containing 'train' to 'train'; a single file
    (or files with neither word) all go to 'all'."""
    if not os.path.exists(path):
        sys.exit(f"error: source '{path}' does not exist")
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith(('.txt', '.jsonl', '.json', '.parquet')))
        if not files:
            sys.exit(f"error: source folder '{path}' has no .txt, .jsonl, .json or .parquet files")
    else:
        files = [path]
    splits = {}
    for f in files:
        name = os.path.basename(f).lower()
        split = 'val' if 'val' in name else 'train' if 'train' in name else 'all'
        splits.setdefault(split, []).extend(_read_file(f, fields))
    for split, docs in splits.items():
        if not docs:
            sys.exit(f"error: source '{path}' has no documents for the {split} split")
    return splits


def _read_file(path, fields):
    def field_of(obj, where):
        for k in fields:
            if isinstance(obj, dict) and isinstance(obj.get(k), str):
                return obj[k]
        sys.exit(f"error: {where} has no string field {' or '.join(map(repr, fields))}")

    if path.endswith('.txt'):
        with open(path, encoding='utf-8') as f:
            text = f.read()
        import re
        docs = re.split(r'^\s*<\|endoftext\|>\s*$', text, flags=re.MULTILINE)
    elif path.endswith('.jsonl'):
        docs = []
        with open(path, encoding='utf-8') as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        sys.exit(f'error: {path} line {n} is not JSON ({e.msg})')
                    docs.append(field_of(obj, f'{path} line {n}'))
    elif path.endswith('.json'):
        with open(path, encoding='utf-8') as f:
            try:
                objs = json.load(f)
            except json.JSONDecodeError as e:
                sys.exit(f'error: {path} is not JSON ({e.msg})')
        if not isinstance(objs, list):
            sys.exit(f'error: {path} must hold a JSON list of objects')
        docs = [field_of(o, f'{path} item {i}') for i, o in enumerate(objs)]
    elif path.endswith('.parquet'):
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        col = next((k for k in fields if k in table.column_names), None)
        if col is None:
            sys.exit(f"error: {path} has no column {' or '.join(map(repr, fields))}")
        docs = table.column(col).to_pylist()
    else:
        sys.exit(f"error: '{path}' is not .txt, .jsonl, .json or .parquet")
    return [d.strip() for d in docs if d and d.strip()]


def split_off_val(docs, val_fraction, seed=0):
    """(train, val): a seeded random val_fraction of the documents (at least one) held out."""
    if len(docs) < 2:
        sys.exit(f'error: {len(docs)} document(s) cannot be split into train and val')
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    val_ix = set(order[:n_val].tolist())
    return ([d for i, d in enumerate(docs) if i not in val_ix],
            [d for i, d in enumerate(docs) if i in val_ix])


_worker_tokenizer = None


def _init_worker(spec):
    global _worker_tokenizer
    from tokenizer import tokenizer_from_spec
    _worker_tokenizer = tokenizer_from_spec(spec)


def _encode_docs(docs):
    """Token ids of a chunk of documents, each followed by EOT, as one flat array. Documents that
    are already token ids (e.g. a teacher's samples) are kept as they are; their bytes are those of
    their decoded text."""
    tok = _worker_tokenizer
    if docs and not isinstance(docs[0], str):
        encoded = [list(d) for d in docs]
        n_bytes = sum(len(tok.decode(d).encode('utf-8')) for d in encoded)
    else:
        encoded = tok.encode_batch(docs)
        n_bytes = sum(len(d.encode('utf-8')) for d in docs)
    ids = [t for doc in encoded for t in (*doc, tok.eot_id)]
    return np.asarray(ids, dtype=np.int64), n_bytes, len(docs)


def write_token_dataset(out_dir, splits, tokenizer, source, num_proc=None, extra_meta=None,
                        chunk_docs=1024):
    """Tokenize documents in parallel and write out_dir/{split}.bin plus meta.json.

    splits: {'train': iterable of str, 'val': ...}; every document is followed by the EOT token.
    A split may hold token-id lists instead of strings: they are written unchanged (distill.py).
    Each file is written under a temporary name and renamed when complete, so a crash never
    leaves a .bin that a later run would read. meta.json (written last) records the tokenizer
    spec (large parts such as BPE ranks go to a side file), vocab size, dtype, token and byte
    counts and the source."""
    from tqdm import tqdm
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, 'meta.json')
    if os.path.exists(meta_path):
        os.remove(meta_path)        # the folder is invalid until the new meta.json lands
    dtype = token_dtype(tokenizer.vocab_size)
    spec = tokenizer.spec()
    meta = {'tokenizer': save_tokenizer_spec(spec, out_dir), 'vocab_size': tokenizer.vocab_size,
            'eot_id': tokenizer.eot_id, 'dtype': np.dtype(dtype).name, 'source': source}
    num_proc = num_proc or os.cpu_count() or 1
    for split, docs in splits.items():
        docs = list(docs)
        chunks = [docs[i:i + chunk_docs] for i in range(0, len(docs), chunk_docs)]
        path = os.path.join(out_dir, f'{split}.bin')
        tmp = path + '.tmp'
        n_tokens = n_bytes = n_docs = 0
        pool = None
        if num_proc > 1 and len(chunks) > 1:
            import multiprocessing as mp
            ctx = mp.get_context('spawn' if sys.platform == 'darwin' else 'fork')
            pool = ctx.Pool(min(num_proc, len(chunks)), initializer=_init_worker, initargs=(spec,))
            results = pool.imap(_encode_docs, chunks)
        else:
            _init_worker(spec)
            results = map(_encode_docs, chunks)
        try:
            with open(tmp, 'wb') as f, tqdm(total=len(docs), desc=f'tokenizing {split}',
                                             unit='doc', disable=None) as bar:
                for flat, nb, nd in results:
                    flat.astype(dtype).tofile(f)
                    n_tokens += len(flat)
                    n_bytes += nb
                    n_docs += nd
                    bar.update(nd)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        finally:
            if pool is not None:
                pool.close()
                pool.join()
        os.replace(tmp, path)
        meta[f'{split}_tokens'] = n_tokens
        meta[f'{split}_bytes'] = n_bytes
        meta[f'{split}_docs'] = n_docs
        print(f'{split}: {n_docs:,} documents, {n_tokens:,} tokens, {n_bytes:,} bytes -> {path}')
    meta.update(extra_meta or {})
    with open(meta_path + '.tmp', 'w') as f:
        json.dump(meta, f, indent=2)
    os.replace(meta_path + '.tmp', meta_path)
    return meta


def save_tokenizer_spec(spec, out_dir):
    """A spec for meta.json: large binary fields (BPE ranks) go to a file beside it."""
    spec = dict(spec)
    if isinstance(spec.get('ranks'), bytes):
        name = f"{spec['kind']}.tiktoken"
        with open(os.path.join(out_dir, name + '.tmp'), 'wb') as f:
            f.write(spec.pop('ranks'))
        os.replace(os.path.join(out_dir, name + '.tmp'), os.path.join(out_dir, name))
        spec['ranks_file'] = name
    return spec


def load_tokenizer_spec(meta_spec, data_dir):
    """Inverse of save_tokenizer_spec: read side files back into the spec."""
    spec = dict(meta_spec)
    if 'ranks_file' in spec:
        with open(os.path.join(data_dir, spec.pop('ranks_file')), 'rb') as f:
            spec['ranks'] = f.read()
    return spec


# -----------------------------------------------------------------------------
# Logging: log.jsonl, a loss-curve PNG, optional TensorBoard / wandb

class RunLog:
    def __init__(self, out_dir, enabled=True, tensorboard=False, wandb_project='', run_name='',
                 config=None, resume=False):
        self.out_dir, self.enabled = out_dir, enabled
        self.path = os.path.join(out_dir, 'log.jsonl')
        self.tb = self.wandb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if not resume and os.path.exists(self.path):
            os.remove(self.path)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional: pip install tensorboard
            self.tb = SummaryWriter(os.path.join(out_dir, 'tb'))
        if wandb_project:
            import wandb  # optional: pip install wandb
            self.wandb = wandb.init(project=wandb_project, name=run_name or None, config=config)

    def log(self, step, **metrics):
        if not self.enabled:
            return
        row = {'step': step, 'time': round(time.time(), 3), **metrics}
        with open(self.path, 'a') as f:
            f.write(json.dumps(row) + '\n')
        for k, v in metrics.items():
            if self.tb is not None and isinstance(v, (int, float)):  # lists go to log.jsonl only
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def rows(self):
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def plot(self, keys=('train/loss', 'val/loss'), name='loss.png', title='', ylabel='loss (nats/token)'):
        """A PNG of the given metrics against step; skipped quietly without matplotlib."""
        if not self.enabled:
            return None
        try:
            import matplotlib
            matplotlib.use('Agg')
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        rows = self.rows()
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for k in keys:
            pts = [(r['step'], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=k, marker='o' if len(pts) < 30 else None, markersize=3)
        ax.set_xlabel('step')
        ax.set_ylabel(ylabel)
        ax.set_title(title or os.path.basename(os.path.normpath(self.out_dir)))
        ax.grid(alpha=0.3)
        if ax.lines:                   # none before the first logged value of these keys
            ax.legend()
        path = os.path.join(self.out_dir, name)
        fig.tight_layout()
        fig.savefig(path + '.tmp.png', dpi=110)
        plt.close(fig)
        os.replace(path + '.tmp.png', path)
        return path

    def heatmap(self, matrix, name, title='', xlabel='expert', ylabel='MoE layer'):
        """A PNG of a (rows, cols) matrix, e.g. the share of tokens each expert received per
        layer (an even load is a flat colour at 1/E); skipped quietly without matplotlib."""
        if not self.enabled:
            return None
        try:
            import matplotlib
            matplotlib.use('Agg')
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        m = matrix.float().cpu().numpy()
        fig, ax = plt.subplots(figsize=(min(14, 3 + 0.12 * m.shape[1]), 1.5 + 0.35 * m.shape[0]))
        im = ax.imshow(m, aspect='auto', cmap='viridis', interpolation='nearest')
        fig.colorbar(im, ax=ax, label=f'share (even = 1/{m.shape[1]} = {1 / m.shape[1]:.3f})')
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_yticks(range(m.shape[0]))
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=9)
        path = os.path.join(self.out_dir, name)
        fig.tight_layout()
        fig.savefig(path + '.tmp.png', dpi=110)
        plt.close(fig)
        os.replace(path + '.tmp.png', path)
        return path

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# -----------------------------------------------------------------------------
# Speed: the MFU denominator

_PEAK_CACHE = {}


def measure_peak_flops(device_type, dtype='bfloat16'):
    """Achievable dense matmul FLOP/s on this device, measured with a large square matmul
    (bf16 on GPUs, the run's dtype elsewhere). MFU = model FLOPs per second / this number."""
    key = (device_type, dtype)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    dt = getattr(torch, dtype) if device_type == 'cuda' else torch.float32
    n = 8192 if device_type == 'cuda' else 1024
    a = torch.randn(n, n, device=device_type, dtype=dt)
    b = torch.randn(n, n, device=device_type, dtype=dt)
    best = float('inf')
    for i in range(6):
        synchronize(device_type)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        synchronize(device_type)
        if i > 0:                                       # the first round is warm-up
            best = min(best, (time.perf_counter() - t0) / 4)
    _PEAK_CACHE[key] = 2 * n ** 3 / best
    return _PEAK_CACHE[key]


# kernel kinds by name, for the profile summaries (a heuristic: the names are the libraries' own)
# (first match wins: Triton kernels fused around attention carry 'attention' in their names too)
KERNEL_KINDS = (('fused (Triton)', ('triton_',)),
                ('GEMM', ('gemm', 'nvjet', 'cutlass', 'xmma', 'cublas')),
                ('attention', ('sdpa', 'flash', 'fmha', 'attention')),
                ('optimizer', ('multi_tensor', 'adam')))


def kernel_stats(prof):
    """{kernel name: (microseconds, launches)} over the device kernels of a torch.profiler run.
    Ranges that annotate the device timeline (e.g. 'Optimizer.step#AdamW.step' spans the
    optimizer's kernels) are left out: counting them would count those kernels twice."""
    kernels = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, 'is_user_annotation', False):
            t, n = kernels.get(e.name, (0.0, 0))
            kernels[e.name] = (t + e.time_range.elapsed_us(), n + 1)
    return kernels


def kernel_table(prof, rows=60):
    """The device kernels of a torch.profiler run, aggregated by name: one line per kind with its
    total time, share and count (the `rows` longest), then the time per KERNEL_KINDS class."""
    kernels = kernel_stats(prof)
    total = sum(t for t, _ in kernels.values()) or 1.0
    lines = [f'device kernels: {len(kernels)} kinds, {sum(n for _, n in kernels.values())} launches, '
             f'{total / 1000:.2f} ms']
    for name, (t, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f'{t / 1000:9.3f} ms {100 * t / total:5.1f}% {n:6d}x  {name[:110]}')
    classes = {}
    for name, (t, n) in kernels.items():
        kind = next((k for k, keys in KERNEL_KINDS if any(x in name.lower() for x in keys)), 'other')
        classes[kind] = classes.get(kind, 0.0) + t
    lines.append('by class: ' + ', '.join(f'{k} {v / 1000:.2f} ms ({100 * v / total:.0f}%)'
                                         for k, v in sorted(classes.items(), key=lambda kv: -kv[1])))
    return '\n'.join(lines) + '\n'


def write_profile(prof, path, title, device_type):
    """Append a torch.profiler run's tables to `path`: its operations by time and, on CUDA, its
    kernels by kind (kernel_table) and where the device waited (idle_table)."""
    cuda = device_type == 'cuda'
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'a') as f:
        f.write(f'\n=== {title} ===\n')
        f.write(prof.key_averages().table(sort_by='cuda_time_total' if cuda else 'cpu_time_total', row_limit=40))
        if cuda:
            f.write('\n' + kernel_table(prof) + idle_table(prof))


def idle_table(prof, rows=15, min_gap_us=5.0):
    """Where the device waits: the span from the first kernel's start to the last one's end, the
    part of it no kernel runs (idle = span - union of kernel intervals), and the `rows` longest
    idle gaps, each with the kernels on either side and the host ops running when the kernel
    after it started (the host was late there: those ops are what to make cheaper)."""
    evs = [e for e in prof.events() if not getattr(e, 'is_user_annotation', False)]
    kern = sorted(((e.time_range.start, e.time_range.end, e.name) for e in evs
                   if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda k: k[0])
    if not kern:
        return 'idle: no device kernels\n'
    host = [e for e in evs if e.device_type == torch.autograd.DeviceType.CPU]
    gaps, busy_end, prev = [], kern[0][1], kern[0][2]
    for start, end, name in kern[1:]:
        if start - busy_end > min_gap_us:
            gaps.append((start - busy_end, prev, name, start))
        if end > busy_end:
            busy_end, prev = end, name
    span = busy_end - kern[0][0]
    idle = sum(g[0] for g in gaps)
    lines = [f'device span {span / 1000:.2f} ms, idle {idle / 1000:.2f} ms ({100 * idle / max(span, 1e-9):.0f}%) '
             f'in {len(gaps)} gaps over {min_gap_us:g} us; the longest:']
    for gap, before, after, t in sorted(gaps, key=lambda g: -g[0])[:rows]:
        running = sorted((e for e in host if e.time_range.start <= t <= e.time_range.end),
                         key=lambda e: e.time_range.start)
        ops = ' > '.join(e.name[:40] for e in running[:4]) or '-'
        lines.append(f'{gap:9.1f} us  after {before[:45]}  before {after[:45]}  host: {ops}')
    return '\n'.join(lines) + '\n'


COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')


def compile_mode_arg(mode):
    """torch.compile's mode= for a config's compile_mode, refused early with the valid names."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode='{mode}'; valid: {', '.join(COMPILE_MODES)}")
    return None if mode == 'default' else mode


# -----------------------------------------------------------------------------
# The training loop every stage shares

def training_defaults():
    """The config keys of every training stage (train, sft, reward, dpo, ppo, grpo, distill), with
    their defaults; a stage script sets its own value for any of them at module level first."""
    # I/O
    out_dir = 'out/run'
    init_from = 'scratch'        # 'scratch' | 'resume' (continue out_dir) | 'out/RUN' (its weights)
    eval_interval = 250          # evaluate (and checkpoint) every N steps, and at the end
    eval_iters = 50              # batches per evaluation
    log_interval = 10            # log and refresh the progress bar every N steps
    always_save_checkpoint = True  # save at every evaluation, not only when val loss improves
    save_checkpoints = True      # False: write no checkpoint at all (sweeps, benchmarks)
    eval_only = False            # evaluate once and exit
    # batches
    batch_size = 32              # sequences per micro-batch (per GPU)
    gradient_accumulation_steps = 1
    # optimizer
    optimizer = 'adamw'          # 'adamw' | 'muon' | 'muonclip' (Muon + QK-Clip)
    learning_rate = 6e-4         # Muon's update is scaled to AdamW's RMS, so one rate serves both
    min_lr = 6e-5
    weight_decay = 0.1
    beta1 = 0.9
    beta2 = 0.95
    grad_clip = 1.0              # clip the global gradient norm; 0 disables
    muon_momentum = 0.95
    qk_clip_tau = 100.0          # muonclip: heads whose max logit exceeds this are scaled back to it
    log_max_logit = False        # record and log the max attention logit per layer (on with muonclip)
    # schedule
    lr_schedule = 'cosine'       # 'cosine' | 'wsd' | 'constant'
    warmup_iters = 100
    max_iters = 5000
    lr_decay_iters = 0           # 0: max_iters
    decay_frac = 0.2             # wsd: the share of lr_decay_iters spent decaying
    # system
    device = 'auto'              # 'auto' | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
    dtype = 'auto'               # 'auto' (bf16 on capable GPUs, else fp32) | 'float32' | 'bfloat16' | 'float16'
    compile = None               # torch.compile the model; None: on for CUDA
    compile_mode = 'default'     # torch.compile's mode: 'default' | 'reduce-overhead' (CUDA graphs) |
                                 # 'max-autotune' | 'max-autotune-no-cudagraphs' (GEMM autotuning)
    cuda_graph_train = False     # CUDA: capture the whole training step (forward, backward, clipping,
                                 # AdamW, router-bias update) once as a CUDA graph and replay it at
                                 # every step: no Python between kernels (one GPU, AdamW; train.py)
    profile = ''                 # append torch.profiler tables of 2 steps (the 11th and 12th of the
                                 # run: past compilation and the graph's capture) to this file: the
                                 # kernels by time and the device's idle gaps (as bench.py --profile)
    cuda_sync_check = False      # CUDA: warn at every host-device sync between two log lines (from
                                 # the 5th step on), with a stack (torch.cuda.set_sync_debug_mode):
                                 # each one stalls the GPU while the host prepares the next step
    fsdp = False                 # under torchrun: shard parameters, gradients and optimizer state
                                 # across the ranks (FSDP2, per transformer block) instead of DDP
    seed = 1337
    peak_flops = 0.0             # MFU denominator in FLOP/s; 0: measure with a large matmul
    # logging
    tensorboard = False
    wandb_project = ''           # non-empty: log to this wandb project
    run_name = ''
    return dict(locals())


def batch_generator(seed, step, micro_step, rank, stream=0):
    """A torch.Generator that is a function of (seed, step, micro-step, rank, stream) alone, so a
    resumed run draws exactly the batches the uninterrupted run would have drawn. Training stages
    call Trainer.batch_generator, which passes the micro-batch's global index as micro_step."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + micro_step * 31 + rank
                                         + stream * 7_777_777)


def shard_model(model, rt):
    """FSDP2 (torch.distributed.fsdp.fully_shard) for fsdp=True: every transformer block (those of
    the MTP modules too) becomes one unit whose parameters (and so gradients and optimizer state)
    are split by rows across the ranks; a unit's full parameters are all-gathered just before its
    forward (and again for its backward) and freed after, and its gradients are reduce-scattered
    after its backward. The root unit holds the rest (embeddings, final norm, head, the MTP
    modules' projections and norms: GPT.forward uses an MTP module's norm outside its forward, so
    a unit of its own would have been freed by then). Blocks first, then the root.
    On CUDA in bf16 the gathered parameters are bf16 and gradients are reduced in fp32
    (MixedPrecisionPolicy); the sharded master weights and the optimizer stay fp32. On the CPU
    (gloo) everything stays fp32. cast_forward_inputs=False keeps the residual stream between
    blocks in fp32, as it is without FSDP (autocast still runs the matmuls in bf16)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from model import Block
    mesh = init_device_mesh(rt.device_type, (rt.world_size,))
    if rt.device_type == 'cuda' and rt.dtype == 'bfloat16':
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    else:
        mp = MixedPrecisionPolicy(cast_forward_inputs=False)
    for m in model.modules():
        if isinstance(m, Block):
            fully_shard(m, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


class Trainer:
    """The optimisation loop shared by every training stage.

    The stage builds the model (and anything else it needs) and supplies two functions:
        loss_fn(model, step, micro_step) -> the mean loss of that micro-batch (a tensor), or
            (loss, {name: tensor}) whose metrics are logged as train/<name>; a 'tokens' entry
            (an int: the tokens the micro-batch really held) replaces tokens_per_step /
            gradient_accumulation_steps in tokens/s and MFU, for batches padded to their length;
            it draws its batch from trainer.batch_generator(step, micro_step);
            or, with run(..., batch_fn=...) (train.py), loss_fn(model, *batch_fn(step, micro_step))
        evaluate(model) -> {metric: float}; 'val/loss' (lower is better) decides the best model
    run() then does, per step: the learning-rate schedule, gradient accumulation, gradient
    clipping, the optimizer step (AdamW / Muon / MuonClip with QK-Clip after it), the MoE
    router-bias update, NaN/inf detection (one host sync per log_interval), logging (loss, parts,
    tokens/s, MFU, load imbalance, max logits) to log.jsonl, a progress bar, evaluation + plots +
    atomic checkpoints every eval_interval, and an exact resume (optimizer, RNG, step) with
    init_from='resume'.

    Under torchrun every rank runs this loop on its own micro-batches, and the result is the run
    of one process with world_size times the accumulation (tests/test_distributed.py):
      - DDP (default): gradients are averaged across ranks by an all-reduce on the last
        micro-step only (no_sync before it);
      - fsdp=True: FSDP2 (shard_model), gradients reduce-scattered on the last micro-step only;
        the checkpoint is sharded (save_sharded_checkpoint) and loads on any number of ranks.
    Micro-batches are functions of their global index (batch_generator); the MoE expert loads are
    summed and the max attention logits maxed across ranks before the router-bias update and
    QK-Clip, so every replica stays identical. Rank 0 logs (means over ranks: one all-reduce per
    log_interval), evaluates (the others wait) and writes the checkpoint."""

    def __init__(self, config, rt, model, stage, tokenizer_spec, tokens_per_step, flops_per_token,
                 resume=None, checkpoint_extra=None, trainable=None, unused_parameters=False):
        """unused_parameters: the stage's loss leaves some parameters without a gradient (e.g. a
        forward without targets skips the MTP modules, a reward model its LM head), so DDP must
        look for them after every forward (find_unused_parameters)."""
        c = self.c = config
        self.rt, self.raw, self.stage, self.tok_spec = rt, model, stage, tokenizer_spec
        self.extra = checkpoint_extra or {}
        self.lr_decay_iters = c['lr_decay_iters'] or c['max_iters']
        self.fsdp = c['fsdp']
        if self.fsdp and not rt.ddp:
            sys.exit('error: fsdp=True shards the model across processes started by torchrun, e.g. '
                     'torchrun --standalone --nproc_per_node=2 train.py CONFIG --fsdp=True')
        if self.fsdp and rt.dtype == 'float16':
            sys.exit("error: fsdp=True trains in bfloat16 or float32 (float16 loss scaling is not "
                     "supported with it); set dtype='bfloat16'")
        self.track_logits = c['optimizer'] == 'muonclip' or c['log_max_logit']
        model.track_max_logits(self.track_logits)        # before torch.compile reads the flag
        self.model_class = type(model)                   # before FSDP makes it a subclass of its own
        full_optimizer_state = None
        if self.fsdp and resume is not None and 'optimizer' in resume:
            full_optimizer_state = self.optimizer_state_by_name(trainable or model, resume['optimizer'])
        if self.fsdp:
            shard_model(model, rt)
        self.optimizer = self.build_optimizer(trainable or model)
        self.step, self.best_val_loss = 0, float('inf')
        rng_restored = False
        if resume is not None:
            base_lrs = [g['base_lr'] for g in self.optimizer.param_groups]
            if 'sharded_dir' in resume:                  # written under FSDP, on any number of ranks
                load_sharded_optimizer(trainable or model, self.optimizer, resume['sharded_dir'])
            elif full_optimizer_state is not None:       # a single-file checkpoint, now sharded
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
                set_optimizer_state_dict(trainable or model, self.optimizer, full_optimizer_state,
                                         options=StateDictOptions(full_state_dict=True))
            else:
                self.optimizer.load_state_dict(resume['optimizer'])
            for g, base_lr in zip(self.optimizer.param_groups, base_lrs):
                g['base_lr'] = base_lr                   # the config's rate wins over the saved one
            self.step = resume['step']
            self.best_val_loss = resume.get('best_val_loss', float('inf'))
            per_rank = resume.get('rng_per_rank') or []
            if len(per_rank) == rt.world_size:           # as many ranks as the run that saved it
                restore_rng_state(per_rank[rt.rank])
                rng_restored = True
            elif rt.rank == 0:
                restore_rng_state(resume['rng'])
                rng_restored = True
            if rt.master:
                print(f"resuming {c['out_dir']} at step {self.step}")
        if rt.rank > 0 and not rng_restored:             # own dropout masks; rank 0 keeps the
            torch.manual_seed(c['seed'] + rt.rank)       # stream a single process would have
        if c['cuda_sync_check'] and rt.device_type != 'cuda':
            sys.exit(f"error: cuda_sync_check=True needs a CUDA GPU (device is '{rt.device}'); "
                     f"it reports where the host waits for one")
        self.graph_step = None                           # the CUDAGraphStep, made at the first step
        if c['cuda_graph_train']:
            why = ('needs a CUDA GPU' if rt.device_type != 'cuda' else
                   'runs in one process, not under torchrun' if rt.ddp else
                   "needs optimizer='adamw'" if c['optimizer'] != 'adamw' else
                   "needs dtype 'bfloat16' or 'float32' (float16's loss scaling reads the scale on the host)"
                   if rt.dtype == 'float16' else
                   'records no max attention logits: set log_max_logit=False' if self.track_logits else '')
            if why:
                sys.exit(f'error: cuda_graph_train=True {why}')
            for g in self.optimizer.param_groups:       # (again after a resume loaded saved groups)
                g['capturable'] = True                   # step counts stay on the device
                g['lr'] = torch.tensor(float(g['lr']), device=rt.device)   # set_lr fills it in place
        self.scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == 'float16')
        compile_ = c['compile'] if c['compile'] is not None else rt.device_type == 'cuda'
        # Under FSDP this compiles the sharded model as a whole: dynamo leaves FSDP's hooks at the
        # block boundaries to run eagerly (torch._dynamo.config.skip_fsdp_hooks) and compiles
        # what lies between them.
        try:
            mode = compile_mode_arg(c['compile_mode'])
        except ValueError as e:
            sys.exit(f'error: {e}')
        self.compiled = torch.compile(model, mode=mode) if compile_ else model
        self.model = self.compiled
        if rt.ddp and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            # broadcast_buffers=False: each rank's max-logit and expert-load buffers must keep its
            # own counts until they are reduced (DDP would copy rank 0's over them every forward);
            # the router biases stay equal because every rank applies the same reduced update.
            self.model = DDP(self.compiled, device_ids=[rt.local_rank] if rt.device_type == 'cuda' else None,
                             broadcast_buffers=False, find_unused_parameters=unused_parameters)
        self.eval_copy = None                            # FSDP: rank 0's full copy for evaluate()
        self.log = RunLog(c['out_dir'], enabled=rt.master, tensorboard=c['tensorboard'],
                          wandb_project=c['wandb_project'], run_name=c['run_name'], config=c,
                          resume=c['init_from'] == 'resume')
        self.peak = None
        if rt.master and not c['eval_only']:
            self.peak = c['peak_flops'] or measure_peak_flops(rt.device_type, rt.dtype)
            print(f"MFU is relative to {self.peak / 1e12:.2f} TFLOP/s per device "
                  f"({'given' if c['peak_flops'] else 'measured with a large matmul'})")
        self.flops_per_token = flops_per_token
        self.tokens_per_step = tokens_per_step / rt.world_size    # per rank, per step
        self.first_bad_step = torch.tensor(-1, device=rt.device)

    def build_optimizer(self, module):
        from optim import build_optimizer
        c = self.c
        try:
            return build_optimizer(module, c['optimizer'], c['learning_rate'], c['weight_decay'],
                                   (c['beta1'], c['beta2']), device_type=self.rt.device_type,
                                   momentum=c['muon_momentum'])
        except ValueError as e:
            sys.exit(f'error: {e}')

    def optimizer_state_by_name(self, module, optimizer_state):
        """A single-file checkpoint's optimizer state (torch's format, by parameter index), keyed
        by parameter name so that FSDP can shard it: loaded into a throwaway optimizer of the
        still unsharded model (FSDP replaces the parameters when it shards them)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        optimizer = self.build_optimizer(module)
        optimizer.load_state_dict(optimizer_state)
        return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True))

    def batch_generator(self, step, micro_step, stream=0):
        """The generator of this rank's micro-batch `micro_step` of `step`: a function of the
        micro-batch's GLOBAL index, rank * gradient_accumulation_steps + micro_step, so N ranks
        with accumulation k draw exactly the batches of one process with accumulation N k (and a
        single process draws what it always drew: the index is micro_step)."""
        index = self.rt.rank * self.c['gradient_accumulation_steps'] + micro_step
        return batch_generator(self.c['seed'], step, index, 0, stream)

    def gradient_sync(self, micro, n_micro):
        """The context of micro-step `micro`'s forward and backward: gradients are reduced across
        ranks after the last micro-step only; before it they accumulate locally (DDP's no_sync;
        FSDP's set_requires_gradient_sync), saving n_micro - 1 reductions per step."""
        last = micro == n_micro - 1
        if self.fsdp:
            self.raw.set_requires_gradient_sync(last)
        elif self.rt.ddp and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def mean_over_ranks(self, numbers):
        """{name: number or 0-d tensor} -> {name: float}, averaged over the ranks by one
        all-reduce; in a single process the values themselves."""
        if not self.rt.ddp:
            return {k: float(v) for k, v in numbers.items()}
        t = torch.stack([torch.as_tensor(v, device=self.rt.device).to(torch.float64).reshape(())
                         for v in numbers.values()])
        torch.distributed.all_reduce(t)
        return dict(zip(numbers, (t / self.rt.world_size).tolist()))

    def from_rank0(self, x):
        """The float x as rank 0 has it, on every rank (a broadcast); x in a single process."""
        if not self.rt.ddp:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.rt.device)
        torch.distributed.broadcast(t, 0)
        return t.item()

    def evaluation_model(self):
        """What evaluate() is given on rank 0 (None on the others, which wait): the model itself
        (not its DDP wrapper), or under FSDP a full copy gathered from the shards (every rank
        takes part in the gather). evaluate runs on rank 0 alone and may sample text, a number of
        forward passes no other rank could match, while FSDP's forward needs every rank."""
        if not self.fsdp:
            return self.compiled if self.rt.master else None
        import copy
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        weights = get_model_state_dict(self.raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.rt.master:
            return None
        if self.eval_copy is None:
            with torch.random.fork_rng(devices=[]):     # must not move rank 0's RNG stream
                self.eval_copy = self.model_class(copy.deepcopy(self.raw.config)).to(self.rt.device)
        self.eval_copy.load_state_dict(weights)
        return self.eval_copy.eval()

    def replica_fingerprints(self):
        """Every rank's fingerprint of the state it should share with the others: (float64 sum,
        sum of squares) of each state-dict tensor held whole on every rank (under DDP all of them,
        under FSDP the buffers, e.g. the router biases; the shards differ by design). Rank 0
        warns if a rank's differs from its own: the replicas have drifted apart. A collective."""
        from optim import is_sharded
        names, values = [], []
        for name, t in self.raw.state_dict().items():
            if not is_sharded(t):
                t = t.detach().double()
                names.append(name)
                values += [t.sum(), t.square().sum()]
        mine = torch.stack(values) if values else torch.zeros(0, dtype=torch.float64, device=self.rt.device)
        every = [torch.empty_like(mine) for _ in range(self.rt.world_size)]
        torch.distributed.all_gather(every, mine)
        every = [f.cpu() for f in every]
        bad = [(r, names[int((f != every[0]).nonzero()[0]) // 2]) for r, f in enumerate(every)
               if not torch.equal(f, every[0])]
        if bad and self.rt.master:
            print(f'warning: at step {self.step} the replicas differ: ' +
                  ', '.join(f'rank {r} in {name}' for r, name in bad), file=sys.stderr)
        return every

    def checkpoint(self, metrics):
        """The checkpoint dict (every rank calls it: each rank's RNG state is gathered, so that a
        resume on as many ranks continues every rank's stream). Under FSDP without the weights
        and optimizer state, which go to the shards."""
        from model import ScalarModel
        rng = capture_rng_state()
        meta = {'tokenizer': self.tok_spec, 'stage': self.stage, 'step': self.step, 'config': self.c,
                'metrics': metrics, 'best_val_loss': self.best_val_loss, 'rng': rng, **self.extra}
        if self.rt.ddp:
            per_rank = [None] * self.rt.world_size
            torch.distributed.all_gather_object(per_rank, rng)
            meta['rng_per_rank'] = per_rank
            meta['replica_fingerprints'] = self.replica_fingerprints()
        if self.fsdp:
            weights = {'model_config': self.raw.config.to_dict()}
        elif hasattr(self.raw, 'checkpoint_state'):      # e.g. PPO's policy + value model
            weights = self.raw.checkpoint_state()
        else:
            weights = {'model': self.raw.state_dict(), 'model_config': self.raw.config.to_dict()}
        if issubclass(self.model_class, ScalarModel):
            weights['model_class'] = 'scalar'
        if not self.fsdp:
            opt = self.optimizer.state_dict()            # learning rates as numbers (cuda_graph_train
            opt['param_groups'] = [{**g, 'lr': float(g['lr'])} for g in opt['param_groups']]  # has tensors)
            weights['optimizer'] = opt
        return {**weights, **meta}

    def save(self, metrics):
        """Every rank calls it. Rank 0 writes out_dir/ckpt.pt and the others wait until it is
        complete; under FSDP every rank writes its shards to out_dir/ckpt_dcp/."""
        import shutil
        ckpt = self.checkpoint(metrics)
        out_dir = self.c['out_dir']
        if self.fsdp:
            save_sharded_checkpoint(out_dir, self.raw, self.optimizer, ckpt)
            return
        if self.rt.master:
            save_checkpoint(out_dir, ckpt)
            shutil.rmtree(os.path.join(out_dir, SHARDED_DIR), ignore_errors=True)   # one per folder
        if self.rt.ddp:
            torch.distributed.barrier()

    def nonfinite_step(self):
        """The first step whose loss was NaN/inf (-1 if none), agreed by every rank. Syncs the host."""
        bad = self.first_bad_step.clone()
        if self.rt.ddp:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return int(bad)

    def run(self, loss_fn, evaluate, plot_keys=('train/loss', 'val/loss'), extra_plots=(), batch_fn=None):
        """extra_plots: (keys, file name, y label) of further curves drawn at every evaluation.
        batch_fn(step, micro_step) -> tuple of tensors on the device: the stage draws its batches
        apart from the loss, which is then loss_fn(model, *batch) (needed by cuda_graph_train,
        whose captured step reads each new batch from the tensors it was captured with)."""
        from tqdm import tqdm
        from optim import clip_grad_norm_, max_logits, qk_clip, set_lr
        c, rt, raw, log = self.c, self.rt, self.raw, self.log
        dist = torch.distributed if rt.ddp else None
        reduce_sum = dist.all_reduce if dist else None
        reduce_max = (lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX)) if dist else None
        bar = tqdm(total=c['max_iters'], initial=self.step, disable=not rt.master, dynamic_ncols=True,
                   mininterval=1 if sys.stderr.isatty() else 30, desc=self.stage)
        t_last, steps_since, tokens_since = time.perf_counter(), 0, 0
        expert_load = expert_share = logit_max = None     # MoE loads and max logits since the last log
        clipped = torch.zeros((), device=rt.device, dtype=torch.long)
        last_heatmap_step = self.step
        step_metrics = {}                                 # the stage's own metrics, last micro-batch
        n_micro = c['gradient_accumulation_steps']
        start_step = self.step
        prof = None                                       # torch.profiler over 2 steps (c['profile'])

        def one_step(step_or_batches):
            """Forward and backward over the micro-batches, clipping, the optimizer step and the
            router-bias update; returns the tensors the loop logs (with cuda_graph_train the body
            of the CUDA graph: it then reads and returns the same tensors at every replay)."""
            out = {'loss_sum': torch.zeros((), device=rt.device), 'tokens': 0.0}
            for micro in range(n_micro):
                with self.gradient_sync(micro, n_micro):
                    with rt.autocast():
                        if batch_fn is not None:
                            loss = loss_fn(self.model, *step_or_batches[micro])
                        else:
                            loss = loss_fn(self.model, step_or_batches, micro)
                    if isinstance(loss, tuple):
                        loss, out['metrics'] = loss
                        out['tokens'] += out['metrics'].pop('tokens', self.tokens_per_step / n_micro)
                    else:
                        out['tokens'] += self.tokens_per_step / n_micro
                    loss = loss / n_micro
                    self.scaler.scale(loss).backward()
                out['loss_sum'] += loss.detach()
            out['parts'] = dict(raw.last_losses)          # the last micro-batch's loss parts
            if c['grad_clip'] > 0:
                self.scaler.unscale_(self.optimizer)
                out['grad_norm'] = clip_grad_norm_(self.optimizer, raw.parameters(), c['grad_clip'],
                                                   defer_to_optimizer=not (self.scaler.is_enabled() or self.fsdp))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            # MoE: move the router biases toward equal load (aux-loss-free), keep loads for logging
            out['loads'] = raw.update_router_bias(reduce=reduce_sum)
            return out

        if c['cuda_graph_train']:
            if batch_fn is None:
                sys.exit(f'error: cuda_graph_train=True needs a stage that hands its batches to the '
                         f'trainer (train.py does; {self.stage} does not)')
            self.graph_step = CUDAGraphStep(one_step)   # its 'tokens': tokens_per_step, as every step's
        while True:
            step = self.step
            lr = lr_at(step, c['learning_rate'], c['min_lr'], c['warmup_iters'], self.lr_decay_iters,
                       c['lr_schedule'], c['decay_frac'])
            set_lr(self.optimizer, lr / c['learning_rate'])

            at_eval = step % c['eval_interval'] == 0 or step == c['max_iters']
            if at_eval and self.nonfinite_step() >= 0:
                break                                    # never evaluate or save a diverged model
            if at_eval or c['eval_only']:
                eval_model = self.evaluation_model()     # None on ranks > 0, which wait below
                metrics = {}
                if rt.master:
                    raw.eval()
                    metrics = evaluate(eval_model)
                    raw.train()
                    log.log(step, **metrics)
                    bar.write(f'step {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in metrics.items()
                                                            if isinstance(v, float)))
                    log.plot(keys=plot_keys)
                    for keys, name, ylabel in extra_plots:
                        log.plot(keys=keys, name=name, ylabel=ylabel)
                    if self.track_logits:
                        log.plot(keys=('attn/max_logit_all',), name='max_logit.png', ylabel='max attention logit')
                    if expert_share is not None:
                        log.heatmap(expert_share / expert_share.sum(1, keepdim=True), 'expert_load.png',
                                    title=f'share of routed tokens per expert, steps {last_heatmap_step}-{step}')
                        expert_share, last_heatmap_step = None, step
                val = self.from_rank0(metrics.get('val/loss', float('inf')))
                if val < self.best_val_loss or c['always_save_checkpoint']:
                    self.best_val_loss = min(self.best_val_loss, val)
                    if step > 0 and not c['eval_only'] and c['save_checkpoints']:
                        self.save(metrics)
            if c['eval_only'] or step == c['max_iters']:
                break

            # forward / backward over the micro-batches, then one optimizer step
            if c['profile'] and step == start_step + 10:
                from torch.profiler import ProfilerActivity, profile
                prof = profile(activities=[ProfilerActivity.CPU] +
                               ([ProfilerActivity.CUDA] if rt.device_type == 'cuda' else []))
                prof.__enter__()
            sync_check = c['cuda_sync_check'] and rt.device_type == 'cuda' and step >= start_step + 4
            if sync_check:
                torch.cuda.set_sync_debug_mode('warn')
            if batch_fn is not None:
                batches = [batch_fn(step, micro) for micro in range(n_micro)]
                # with cuda_graph_train: copied into the graph's inputs, then replayed
                out = (self.graph_step or one_step)(batches)
            else:
                out = one_step(step)
            out = dict(out)                              # (the graph's own dict stays whole)
            tokens_since += out.pop('tokens', 0.0)
            step_metrics = out.pop('metrics', step_metrics)
            loss_sum, grad_norm, parts = out['loss_sum'], out.get('grad_norm'), out['parts']
            if out.get('loads') is not None:             # MoE expert loads, for logging
                expert_load = out['loads'].clone() if expert_load is None else expert_load + out['loads']
            # QK-Clip: heads whose largest logit passed qk_clip_tau get their q/k weights scaled back
            if self.track_logits:
                if c['optimizer'] == 'muonclip':
                    now, n_clipped = qk_clip(raw, c['qk_clip_tau'], reduce=reduce_max)
                    clipped += n_clipped
                else:
                    now = max_logits(raw, reduce=reduce_max)
                logit_max = now if logit_max is None else torch.maximum(logit_max, now)
            # the first non-finite step, kept on the device (a filled scalar: torch.tensor(step,
            # device=...) would be a copy from the host that waits for the GPU to finish the step)
            self.first_bad_step.masked_fill_((self.first_bad_step < 0) & ~torch.isfinite(loss_sum), step)
            if sync_check:
                torch.cuda.set_sync_debug_mode('default')
            self.step = step = step + 1
            steps_since += 1
            bar.update(1)
            if prof is not None and step == start_step + 12:
                synchronize(rt.device_type)
                prof.__exit__(None, None, None)
                if rt.master:
                    write_profile(prof, c['profile'], f'{self.stage}: steps {step - 2} and {step - 1}', rt.device_type)
                prof = None

            if step % c['log_interval'] == 0:
                if self.nonfinite_step() >= 0:
                    break
                # the loss and the stage's metrics as means over ranks, the tokens summed over
                # them: one all-reduce per log_interval steps, and one host sync
                numbers = {'train/loss': loss_sum, 'tokens': tokens_since}
                numbers.update({f'train/{part}_loss': v for part, v in parts.items()})
                numbers.update({f'train/{name}': v for name, v in step_metrics.items()})
                if c['grad_clip'] > 0:                   # the same on every rank; FSDP: a DTensor
                    numbers['grad_norm'] = grad_norm.full_tensor() if hasattr(grad_norm, 'full_tensor') else grad_norm
                numbers = self.mean_over_ranks(numbers)
                synchronize(rt.device_type)
                elapsed = time.perf_counter() - t_last
                dt = elapsed / steps_since
                tok_s = numbers.pop('tokens') * rt.world_size / elapsed      # every rank's tokens
                t_last, steps_since, tokens_since = time.perf_counter(), 0, 0
                if rt.master:
                    row = {'train/loss': numbers.pop('train/loss'), 'lr': lr, 'tokens_per_sec': tok_s,
                           'mfu': self.flops_per_token * tok_s / (self.peak * rt.world_size),
                           'step_time_ms': 1000 * dt}
                    if 'grad_norm' in numbers:
                        row['grad_norm'] = numbers.pop('grad_norm')
                    row.update(numbers)
                    if expert_load is not None:
                        # load imbalance per MoE layer: the busiest expert's tokens over the mean (1 = even)
                        imbalance = (expert_load.max(1).values / expert_load.mean(1).clamp(min=1e-9)).tolist()
                        row['moe/max_imbalance'] = max(imbalance)
                        row['moe/imbalance'] = [round(v, 3) for v in imbalance]
                        share = (expert_load / expert_load.sum(1, keepdim=True).clamp(min=1)).cpu()
                        expert_share = share if expert_share is None else expert_share + share
                    if logit_max is not None:
                        per_layer = logit_max.max(1).values.tolist()      # the largest head of each layer
                        row['attn/max_logit'] = [round(v, 2) for v in per_layer]
                        row['attn/max_logit_all'] = max(per_layer)
                        row['qk_clip/clipped_heads'] = int(clipped)
                    log.log(step, **row)
                    bar.set_postfix(loss=f"{row['train/loss']:.4f}", tok_s=f"{row['tokens_per_sec']:,.0f}",
                                    mfu=f"{100 * row['mfu']:.1f}%", refresh=False)
                expert_load = logit_max = None
                clipped.zero_()
        bar.close()
        if prof is not None:                              # the run ended inside the profiled steps
            prof.__exit__(None, None, None)
            prof = None
        bad = self.nonfinite_step()
        if bad >= 0:
            last = checkpoint_path(c['out_dir'])
            sys.exit(f'error: the training loss became NaN/inf at step {bad}; stopped. '
                     f'The last good checkpoint is {last}' + ('' if os.path.exists(last) else ' (none yet)')
                     if rt.master else 1)
        if rt.master and not c['eval_only']:
            path = log.plot(keys=plot_keys)
            saved = f"; checkpoint in {checkpoint_path(c['out_dir'])}" if c['save_checkpoints'] else ''
            print(f"done: {self.step} steps" + saved + (f', loss curve {path}' if path else ''))
        log.close()
