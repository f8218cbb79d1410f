"""
Checkpoints: one dict per run folder, out_dir/ckpt.pt, loadable with torch.load(weights_only=True)
and written atomically (a temporary file, then a rename), or under FSDP the sharded
out_dir/ckpt_dcp/ that every loader reads too. load_model rebuilds (model, tokenizer, ckpt) from
any stage's folder; the RNG states make a resume continue exactly.
"""

import os
import pickle
import re
import shutil
import sys
import warnings

import torch
import torch.distributed as dist

from model import GPT, ModelConfig, ScalarModel, padded_vocab_size
from quant import BITS, quantize_model
from tokenizer import tokenizer_from_spec, with_chat_tokens


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


def run_folders(root='out'):
    """The folders under root that hold a checkpoint, or one level further down where a folder holds
    none itself (speedrun.sh's out/speedrun_cpu/sft), the most recently written first."""
    def subfolders(d):
        return [e if d == '.' else os.path.join(d, e) for e in os.listdir(d)
                if os.path.isdir(os.path.join(d, e)) and not e.startswith('.')]
    if not os.path.isdir(root):
        return []
    found = []
    for d in subfolders(root):
        found += [d] if os.path.exists(checkpoint_path(d)) else \
                 [e for e in subfolders(d) if os.path.exists(checkpoint_path(e))]
    return sorted(found, key=lambda d: -os.path.getmtime(checkpoint_path(d)))


CHAT_STAGES = ('sft', 'dpo', 'ppo', 'grpo')      # the stages whose models answer in the chat template


def listed(folders, at_most):
    """'a, b, c and 4 more': a list said in one line, its length never hidden."""
    more = f' and {len(folders) - at_most} more' if len(folders) > at_most else ''
    return ', '.join(folders[:at_most]) + more


def newest_run(purpose, root='out'):
    """The run folder under root written last, for a script given no out_dir (sample.py, serve.py,
    eval.py), said on stderr with the others (reward models left out: they hold no language
    model), and with the newest chat model where the newest is not one (a speedrun's last run is
    its distilled student, which continues text); no such folder exits saying how to make or name
    one."""
    stage = {d: saved_meta(d, 'stage') for d in run_folders(root)}          # newest first
    found = [d for d, s in stage.items() if s != 'reward']
    if not found:
        sys.exit(f'error: {purpose}: no checkpoint under {root}/; train one first '
                 f'(python train.py config/...), or name one with --out_dir=FOLDER')
    chat = '' if stage[found[0]] in CHAT_STAGES else next(
        (f'; the newest chat model (SFT or after): {d}' for d in found if stage[d] in CHAT_STAGES), '')
    print(f"{purpose}: {found[0]}, the newest checkpoint under {root}/ (others: {listed(found[1:], 5) or 'none'}"
          f"{chat}; --out_dir=FOLDER picks one)", file=sys.stderr)
    return found[0]


def load_checkpoint(path, map_location='cpu'):
    """The checkpoint dict of a run folder (or a ckpt.pt file). A sharded checkpoint (ckpt_dcp/,
    written by fsdp=True) is read back whole in this one process, without torch.distributed: its
    metadata plus the full model weights gathered from the shards under 'model', so sample.py,
    eval.py and a later stage's init_from= read it like ckpt.pt; 'sharded_dir' names the folder
    (training.Run resumes the optimizer state from it, resharded to the new number of ranks).
    A missing checkpoint exits naming the run folders that do hold one; a damaged one (empty,
    cut short) exits naming the file."""
    p = checkpoint_path(path)
    if os.path.isdir(p):
        return load_sharded_checkpoint(p)
    if not os.path.isfile(p):
        others = run_folders(os.path.dirname(os.path.normpath(path)) or '.') or run_folders()
        sys.exit(f"error: no checkpoint at '{p}' (expected an out_dir holding ckpt.pt or {SHARDED_DIR}/); "
                 + (f"checkpoints found: {listed(others, 8)}" if others else 'no checkpoint found under out/'))
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # whole, but holding objects other than tensors and plain values (a global torch names), or
        # no pickle at all (a text file: its first byte an unknown opcode)
        found = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))   # the type torch names
        if not found:
            damaged(p, e)
        sys.exit(f"error: '{p}' holds objects that torch.load(weights_only=True) refuses to unpickle "
                 f"({found.group(1)}); our stages save only tensors and plain "
                 f"Python values, so it was written by other code: load it yourself with weights_only=False "
                 f"only if you trust it")
    except Exception as e:               # (a cut-short zip, an empty file: whatever torch.load raises)
        damaged(p, e)


def damaged(p, e):
    detail = ' '.join(re.sub(r'\x1b\[[0-9;]*m', '', str(e)).split())[:120]     # one line, no terminal colours
    sys.exit(f"error: the checkpoint '{p}' is damaged or incomplete ({os.path.getsize(p):,} bytes; "
             f"{type(e).__name__}: {detail}); delete it, then train again or resume from an earlier copy")


def saved_meta(path, key):
    """One entry of a run folder's checkpoint ('config': the settings it was trained with; 'stage':
    the script that wrote it), read without loading its tensors (ckpt.pt memory-mapped; a sharded
    checkpoint's meta.pt); None where there is no checkpoint or no such entry."""
    p = checkpoint_path(path)
    p = os.path.join(p, 'meta.pt') if os.path.isdir(p) else p
    if not os.path.isfile(p):
        return None
    try:
        ckpt = torch.load(p, map_location='cpu', weights_only=True, mmap=True)
    except Exception:                    # damaged: load_checkpoint says so when the script reads it
        return None
    return (ckpt.get(key) or None) if isinstance(ckpt, dict) else None


def save_sharded_checkpoint(out_dir, model, optimizer, meta):
    """fsdp=True: every rank writes its shards of the model and optimizer state with
    torch.distributed.checkpoint (DCP) into out_dir/ckpt_dcp.tmp/, rank 0 adds meta.pt (the rest
    of the checkpoint dict: configs, tokenizer, step, RNG, metrics) and renames the folder to
    ckpt_dcp/, so a crash never leaves a half-written checkpoint. A collective: every rank calls
    it. State dicts are keyed by parameter name (get_state_dict), which is what lets DCP load them
    back on any number of ranks, or whole in one process (load_sharded_checkpoint)."""
    import torch.distributed.checkpoint as dcp        # here, not at the top: it takes about a second to import
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
    import torch.distributed.checkpoint as dcp        # here, not at the top: it takes about a second to import
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
        try:
            dcp.load({'model': weights}, checkpoint_id=folder, no_dist=True)
        except Exception as e:                   # a shard missing or cut short
            sys.exit(f"error: the sharded checkpoint '{folder}' is damaged or incomplete ({type(e).__name__}: "
                     f"{str(e)[:200]}); delete it, then train again or resume from an earlier copy")
    return {**ckpt, 'model': weights, 'sharded_dir': folder}


def load_sharded_optimizer(model, optimizer, folder):
    """Resume the optimizer state of a sharded checkpoint into `optimizer` (of `model`: sharded by
    FSDP, wrapped in nothing, or plain on one rank): DCP reshards it to this run's ranks. The
    optimizer's state is first initialised (get_optimizer_state_dict takes one step at lr 0) so
    that DCP knows what to fill. A collective under torch.distributed."""
    import torch.distributed.checkpoint as dcp        # here, not at the top: it takes about a second to import
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    state = get_optimizer_state_dict(model, optimizer)
    with warnings.catch_warnings():              # a single process: DCP says so
        warnings.simplefilter('ignore', UserWarning)
        dcp.load({'optimizer': state}, checkpoint_id=folder, no_dist=not dist.is_initialized())
    set_optimizer_state_dict(model, optimizer, state)


def load_model(path, device='cpu', ckpt=None, overrides=None, scalar=False, quantize=''):
    """Rebuild (model, tokenizer, ckpt) from any stage's checkpoint; `overrides` replace fields of
    its ModelConfig that do not change the weights (e.g. {'dropout': 0.1}). scalar=False: a
    language model (a reward model's checkpoint is refused by name: it has no use as one);
    scalar=True: a ScalarModel (a language model's checkpoint gets a new scalar head); None: as
    the checkpoint was saved.
    quantize='int8' | 'int4': its weights quantized for inference (quant.py); a checkpoint saved
    quantized (quantize.py) loads quantized whatever this says."""
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    is_scalar = ckpt.get('model_class') == 'scalar'
    if is_scalar and scalar is False:
        sys.exit(f"error: {path} holds a {ckpt.get('stage', 'reward')} model (a scalar score, no language model "
                 f"head): sample, evaluate, serve or fine-tune the language model it was trained from "
                 f"({ckpt.get('parent') or 'its init_from'}); reward models are read by ppo.py / grpo.py "
                 f"(--reward_model=)")
    if ckpt.get('tokenizer') is None:    # (an import from Hugging Face without tokenizer_from=)
        sys.exit(f"error: {path} holds no tokenizer; import it again with convert_hf.py --direction=import "
                 f"--tokenizer_from=FOLDER (a checkpoint or data folder with the model's tokenizer)")
    cls = ScalarModel if is_scalar or scalar else GPT
    model = cls(ModelConfig(**{**ckpt['model_config'], **(overrides or {})}))
    check_quantize(quantize, ckpt, path)
    if ckpt.get('quantized'):                        # built quantized (empty), then filled
        quantize_model(model, ckpt['quantized']['kind'], ckpt['quantized']['group_size'], weights=False)
    missing, unexpected = model.load_state_dict(ckpt['model'], strict=False)
    if unexpected or [k for k in missing if not (scalar and not is_scalar and k.startswith('score_head.'))]:
        raise RuntimeError(f'{path}: the checkpoint does not fit its model: missing {missing[:4]}, '
                           f'unexpected {unexpected[:4]}')
    if quantize and not ckpt.get('quantized'):
        quantize_model(model, quantize)
    model.to(device)
    return model, tokenizer_from_spec(ckpt['tokenizer']), ckpt


def context_length(block_size, model, path):
    """The context a post-training stage trains or scores in: block_size, or (0) the model's own.
    One longer than the model was trained for is an error that says what to do."""
    block_size = block_size or model.config.block_size
    if block_size > model.config.block_size:
        sys.exit(f'error: block_size={block_size} exceeds the context of {path} ({model.config.block_size} tokens): '
                 f'--block_size={model.config.block_size} (longer examples are cut), or start from a model trained '
                 f'with a longer context (bash speedrun.sh --profile=cpu --dry_run prints CPU-sized commands whose '
                 f'base model has 256)')
    return block_size


def check_quantize(quantize, ckpt, path):
    """Exit if `quantize` (a load-time setting) is no kind, or asks a checkpoint saved quantized for
    another kind (its full-precision weights are gone)."""
    if quantize and quantize not in BITS:
        sys.exit(f"error: quantize='{quantize}'; valid: '' (off), {', '.join(BITS)}")
    saved = (ckpt.get('quantized') or {}).get('kind')
    if quantize and saved and quantize != saved:
        sys.exit(f"error: {path} is saved quantized as {saved}; quantize={quantize} needs the full-precision "
                 f"checkpoint it came from ({ckpt.get('parent')})")


def load_chat_model(path, device='cpu', ckpt=None, overrides=None, scalar=False, quantize=''):
    """(model, tokenizer, ckpt) ready for the chat template: the checkpoint's tokenizer with the
    template's special tokens added if it lacks them, and the model's vocabulary grown (padded to
    a multiple of 64) if those ids do not fit in it."""
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    check_quantize(quantize, ckpt, path)
    model, tok, ckpt = load_model(path, device, ckpt, overrides, scalar)
    if not tok.chat:
        tok = with_chat_tokens(tok)
    if tok.vocab_size > model.config.vocab_size:
        if ckpt.get('quantized'):
            sys.exit(f"error: {path} was saved quantized without the chat template's tokens; quantize the "
                     f"fine-tuned model (sft.py's checkpoint) instead")
        model.resize_vocab(padded_vocab_size(tok.vocab_size))
    if quantize and not ckpt.get('quantized'):       # after the resize: the head grows in full precision
        quantize_model(model, quantize)
    return model, tok, ckpt


# What the stages that train on padded batches (reward.py, dpo.py, ppo.py, grpo.py) change in the
# model they load: the router biases of auxiliary-loss-free balancing stay as pretraining and SFT
# left them. Their padding tokens (a quarter of a batch, all routed alike) would count as load and
# push real tokens off their experts; DeepSeek-V3 too stops the bias updates (speed 0) for the end
# of pretraining, and the stages after it never need them. Their losses (DPO's, the policy's) come from
# forwards without targets, so no MoE balance loss joins them either: routing stays as SFT left it,
# but for what the losses' gradients move in the router weights. (reward.py's bias_update_speed
# setting is 0 by default for this reason; it counts no padding, and > 0 balances again.)
FROZEN_ROUTING = {'bias_update_speed': 0.0}


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
