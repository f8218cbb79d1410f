"""
The pieces of a training loop that every stage's loop calls. The loop itself is written out in
each stage (train.py, sft.py, reward.py, dpo.py, distill.py, ppo.py, grpo.py):

    run = Run(config, rt, model, 'sft', tok_spec, flops_per_token, resume=ckpt)
    step = run.step                                # 0, or where a resumed run stopped
    while run.evaluate(step, evaluate):            # every eval_interval steps; False at the end
        lr = run.set_lr(step)                      # warmup, then cosine / wsd / constant
        loss = 0
        for micro in range(gradient_accumulation_steps):
            with run.sync(micro):                  # DDP/FSDP reduce gradients on the last only
                with rt.autocast():
                    micro_loss = ... / gradient_accumulation_steps   # or x run.token_share_weights(..)[micro]
                run.backward(micro_loss)                             # where it is a mean over a varying count
            loss = loss + micro_loss.detach()      # the step's loss, for the log
        out = run.optimizer_step()                 # clip, step, zero grads, router biases, QK-Clip
        step += 1
        if not run.log(step, lr, loss, tokens, out):   # every log_interval steps; False: NaN/inf
            break
    run.finish()

What Run holds: the optimizer (AdamW / Muon / MuonClip) built for the model, FSDP sharding or the
DDP wrapper and torch.compile (run.model is what the loop calls; run.raw the plain module), a
GradScaler for float16, the resumed step, RNG and optimizer state, the log (log.jsonl, plots,
TensorBoard, wandb) and what the log line reports: the last step's loss and its parts, and over
the steps since the line before, tokens/s, MFU, the expert load and the max attention logits
(QK-Clip runs in optimizer_step).

Under torchrun every rank runs the same loop on its own micro-batches, drawn with
run.batch_generator(step, micro) (a function of the micro-batch's global index), so N ranks with
accumulation k are one process with accumulation N k (tests/test_distributed.py). With
expert_parallel=N (train.py, N = the number of ranks) each rank keeps 1/N of every MoE layer's
routed experts (parallel.py): no DDP wrapper; optimizer_step averages the replicated gradients
itself, and checkpoints are gathered into the single-process layout.
"""

import contextlib
import copy
import functools
import inspect
import math
import os
import shutil
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import (SHARDED_DIR, capture_rng_state, checkpoint_path, load_sharded_optimizer,
                        restore_rng_state, save_checkpoint, save_sharded_checkpoint)
from data import batch_generator, epoch_batch
from model import MoE, ScalarModel
from optim import (LR_SCHEDULES, OPTIMIZERS, build_optimizer, clip_grad_norm_, is_sharded, lr_at, max_logits,
                   qk_clip, set_lr)
import parallel
from quant import QuantExperts, QuantLinear
from runlog import PrintsAboveBar, RunLog, progress
from runtime import compile_mode_arg, ctrl_c_in_one_line, measure_peak_flops, shard_model, synchronize

# loss.png and the other curves are redrawn at an evaluation at most this often (a drawing costs
# about a quarter of a second), and when the run ends: at its last step, on Ctrl-C or divergence
# (not when it is killed: then they may be up to this many seconds old)
PLOT_EVERY_S = 30
# a stage's curves unless it names its own: (keys of the log, file, y label), or a list of such triples
LOSS_PLOT = (('train/loss', 'val/loss'), 'loss.png', 'loss (nats/token)')


def check_loop_settings(c):
    """Exit with an error naming the first setting of the training loop that no run can use (a
    count below 1, a rate outside its range, a name not among the valid ones). Every stage calls it
    right after configure(), before any data or model is read; keys a stage lacks are skipped."""
    at_least_1 = ('eval_interval', 'log_interval', 'eval_iters', 'batch_size', 'gradient_accumulation_steps')
    at_least_0 = ('max_iters', 'warmup_iters', 'grad_clip', 'learning_rate', 'min_lr', 'weight_decay')
    for key in at_least_1:
        if key in c and c[key] < 1:
            sys.exit(f'error: {key}={c[key]} must be 1 or more')
    for key in at_least_0:
        if key in c and c[key] < 0:
            sys.exit(f'error: {key}={c[key]} must be 0 or more')
    if 'decay_frac' in c and not 0 <= c['decay_frac'] <= 1:
        sys.exit(f"error: decay_frac={c['decay_frac']} must be between 0 and 1 (the share of the steps "
                 f"spent decaying)")
    if 'lr_schedule' in c and c['lr_schedule'] not in LR_SCHEDULES:
        sys.exit(f"error: lr_schedule={c['lr_schedule']!r}; valid: {', '.join(LR_SCHEDULES)}")
    if 'optimizer' in c and c['optimizer'] not in OPTIMIZERS:
        sys.exit(f"error: optimizer={c['optimizer']!r}; valid: {', '.join(OPTIMIZERS)}")
    if 'compile_mode' in c:
        try:
            compile_mode_arg(c['compile_mode'])
        except ValueError as e:
            sys.exit(f'error: {e}')


def resume_command(argv, world_size=1):
    """The command line that continues a stopped run: its own arguments with --init_from=resume,
    under torchrun with as many processes where it ran under torchrun (one process would draw only
    the first rank's micro-batches)."""
    args, skip = [], False
    for a in argv[1:]:           # both forms: --init_from=X and --init_from X
        if not skip and not a.startswith('--init_from'):
            args.append(a)
        skip = a == '--init_from'
    launcher = f'torchrun --standalone --nproc_per_node={world_size}' if world_size > 1 else 'python'
    return f'{launcher} {" ".join([argv[0], *args])} --init_from=resume'


class EvaluationInterrupted(Exception):
    """Ctrl-C during an evaluation in one process: the evaluation is left out (on a CPU one of a
    large model can take an hour; under torchrun the ranks finish it together instead)."""


# sys.excepthook while a Run is live: a second Ctrl-C (KeyboardInterrupt) ends the program with one line
quiet_second_ctrl_c = functools.partial(ctrl_c_in_one_line, message='stopped at once by a second Ctrl-C: nothing saved')


class Run:

    def __init__(self, config, rt, model, stage, tokenizer_spec, flops_per_token, resume=None,
                 checkpoint_extra=None, also_train=None, also_train_lr=0.0, unused_parameters=False):
        """config: the stage's resolved settings (config.configure). model: the plain module, on
        rt.device. also_train: a second model the same optimizer trains (PPO's value model; it
        is saved beside the model as 'value_model', and run.also is what the loop calls), at the
        peak rate also_train_lr (0: learning_rate), scaled by the same schedule.
        resume: a checkpoint dict to continue (optimizer, step, RNG). checkpoint_extra: more
        entries for the checkpoint (a dict the loop may update). unused_parameters: the stage's
        loss leaves some parameters without a gradient (a forward without targets skips the MTP
        modules, a reward model its LM head), so DDP must look for them."""
        c = self.c = config
        self.rt, self.raw, self.stage, self.tok_spec = rt, model, stage, tokenizer_spec
        self.extra = checkpoint_extra if checkpoint_extra is not None else {}
        self.also_raw, self.also_lr = also_train, also_train_lr
        self.fsdp = c['fsdp']
        check_loop_settings(c)                           # (a stage script that did not call it)
        if also_train is not None and self.fsdp:
            sys.exit(f'error: {self.stage_script()} does not support fsdp=True: use DDP (the default)')
        if self.fsdp and not rt.ddp:
            sys.exit('error: fsdp=True shards the model across processes started by torchrun, e.g. '
                     f'torchrun --standalone --nproc_per_node=2 {self.stage_script()} CONFIG --fsdp=True')
        if self.fsdp and rt.dtype == 'float16':
            sys.exit("error: fsdp=True trains in bfloat16 or float32 (float16 loss scaling is not "
                     "supported with it); set dtype='bfloat16'")
        if any(isinstance(m, (QuantLinear, QuantExperts)) for m in model.modules()):
            sys.exit(f"error: the model {self.stage_script()} was given is quantized (weights stored as int8/int4, "
                     f"frozen): training needs the full-precision checkpoint it was quantized from (the "
                     f"quantized checkpoint's 'parent')")
        if resume is not None and resume.get('stage', stage) != stage:
            sys.exit(f"error: init_from=resume continues a {stage} run, but {c['out_dir']} holds a "
                     f"{resume['stage']} checkpoint: pick another out_dir, or start this stage from that "
                     f"checkpoint with init_from={c['out_dir']}")
        if rt.master and 0 < c['max_iters'] <= c.get('warmup_iters', 0):    # short runs that would quietly do little
            print(f"note: warmup_iters={c['warmup_iters']} >= max_iters={c['max_iters']}: the learning rate stays "
                  f"in its warm-up, below learning_rate={c['learning_rate']} (set --warmup_iters= lower)")
        if rt.master and c['lr_schedule'] != 'constant' and 0 < c['learning_rate'] < c['min_lr']:
            print(f"note: min_lr={c['min_lr']} is above learning_rate={c['learning_rate']}: the rate rises to "
                  f"min_lr after the warm-up instead of decaying (set --min_lr= lower)", file=sys.stderr)
        if rt.master and 0 < c['max_iters'] < c.get('log_interval', 1):
            print(f"note: log_interval={c['log_interval']} > max_iters={c['max_iters']}: no training line will be "
                  f"logged, only the evaluations (set --log_interval= lower)")
        self.ep = c.get('expert_parallel', 0) > 1
        if self.ep:
            self.check_expert_parallel(model, also_train)
        self.track_logits = c['optimizer'] == 'muonclip' or c.get('log_max_logit', False)
        self.models = [model] + ([also_train] if also_train is not None else [])
        for m in self.models:
            m.track_max_logits(self.track_logits)        # before torch.compile reads the flag
        self.model_class = type(model)                   # before FSDP makes it a subclass of its own
        trainable = model if also_train is None else torch.nn.ModuleList(self.models)
        full_optimizer_state = None
        if self.fsdp and resume is not None and 'optimizer' in resume:
            full_optimizer_state = self.optimizer_state_by_name(trainable, resume['optimizer'])
        if self.fsdp:
            shard_model(model, rt)
        if self.ep:
            parallel.shard_experts(model)                # this rank's slice of every expert stack
            if rt.master:
                layers = parallel.expert_parallel_layers(model)
                print(f'expert parallelism: each of {rt.world_size} ranks holds {layers[0].E_local} of the '
                      f'{layers[0].E} routed experts of each of {len(layers)} MoE layers')
        self.optimizer = self.build_optimizer(trainable)
        self.scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == 'float16')
        self.step, self.best_val_loss, self.parts = 0, float('inf'), {}
        if resume is not None:
            self.load_resume_state(resume, trainable, full_optimizer_state)
        elif rt.rank > 0:                                # own dropout masks; rank 0 keeps the
            torch.manual_seed(c['seed'] + rt.rank)       # stream a single process would have
        compile_ = c['compile'] if c['compile'] is not None else rt.device_type == 'cuda'
        mode = compile_mode_arg(c['compile_mode'])     # (valid: check_loop_settings)
        # Under FSDP this compiles the sharded model as a whole: dynamo leaves FSDP's hooks at the
        # block boundaries to run eagerly and compiles what lies between them.
        compiled = [torch.compile(m, mode=mode) if compile_ else m for m in self.models]
        self.compiled = compiled[0]
        if rt.ddp and not self.fsdp and not self.ep:
            # buffers not synced each forward: each rank's max-logit and expert-load buffers must keep
            # its own counts until they are reduced (DDP would copy rank 0's over them every forward);
            # the router biases stay equal because every rank applies the same reduced update. (Newer
            # torch names it forward_sync_buffers, and warns on broadcast_buffers; its sync at the
            # start copies buffers that are equal then anyway.)
            no_sync = ({'forward_sync_buffers': False} if 'forward_sync_buffers' in inspect.signature(DDP).parameters
                       else {'broadcast_buffers': False})
            compiled = [DDP(m, device_ids=[rt.local_rank] if rt.device_type == 'cuda' else None,
                            find_unused_parameters=unused_parameters, **no_sync) for m in compiled]
        self.model = compiled[0]                         # what the loop calls
        self.also = compiled[1] if also_train is not None else None
        self.eval_copy = None                            # FSDP: rank 0's full copy for evaluate()
        self.resumed_at = self.step if resume is not None else None
        # a resumed step is not evaluated again, unless its checkpoint was Ctrl-C's, saved before
        # that step's evaluation
        self.evaluated_at = self.resumed_at if resume is not None and resume.get('evaluated', True) else None
        # (eval_only leaves the folder's log as it is: it prints its numbers and saves nothing)
        self.log_file = RunLog(c['out_dir'], enabled=rt.master and not c['eval_only'], tensorboard=c['tensorboard'],
                               wandb_project=c['wandb_project'], run_name=c['run_name'], config=c,
                               resume_step=self.resumed_at)
        # MFU against a peak that means something: a GPU's measured matmul in the run's dtype, or one given
        self.peak = None
        if rt.master and not c['eval_only'] and (c['peak_flops'] or rt.device_type == 'cuda'):
            self.peak = c['peak_flops'] or measure_peak_flops(rt.device_type, rt.dtype)
            print(f"MFU is relative to {self.peak / 1e12:.2f} TFLOP/s per device "
                  f"({'given' if c['peak_flops'] else 'measured with a large matmul'})")
        # Ctrl-C: finish the step, save a checkpoint, say how to resume (a second Ctrl-C stops at once)
        self.stop_requested = self.evaluating = False
        self.saved_step = None                           # the step of the last checkpoint this run saved
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self.on_interrupt)
            sys.excepthook = quiet_second_ctrl_c
        self.flops_per_token = flops_per_token
        self.first_bad_step = torch.tensor(-1, device=rt.device)   # the first NaN/inf step, on the device
        self.bad_what = 'training loss'                            # (or, found at an evaluation, 'val loss')
        # what the next log line reports: summed over the steps since the last one
        self.t_last, self.steps_since, self.tokens_since = time.perf_counter(), 0, 0.0
        self.tokens_seen = (resume or {}).get('tokens', 0.0)    # trained on, all ranks, since step 0
        self.expert_load = self.expert_share = self.logit_max = None
        self.clipped = torch.zeros((), device=rt.device, dtype=torch.long)
        self.last_heatmap_step = self.step
        self.plotted_at = time.time()        # the loss plots are redrawn at most every PLOT_EVERY_S
        self.bar = progress(total=c['max_iters'], initial=self.step, disable=not rt.master, dynamic_ncols=True,
                            desc=stage)
        # a print() in the loop (a sample answer, a line added to try something) goes above the bar
        self.stdout = PrintsAboveBar(self.bar, sys.stdout) if rt.master else None
        if self.stdout is not None:
            sys.stdout = self.stdout

    # --- set-up ---------------------------------------------------------------------------------
    def on_interrupt(self, signum, frame):
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        if self.evaluating and not self.rt.ddp:
            print('\nCtrl-C: leaving this evaluation out, then saving a checkpoint and stopping', file=sys.stderr,
                  flush=True)
            raise EvaluationInterrupted       # (out of the stage's evaluate(), caught in Run.evaluate)
        print('\nCtrl-C: finishing this step, then saving a checkpoint and stopping '
              '(Ctrl-C again to stop at once, saving nothing)', file=sys.stderr, flush=True)

    def check_expert_parallel(self, model, also_train):
        c, rt, n = self.c, self.rt, self.c['expert_parallel']
        layers = [m for m in model.modules() if type(m) is MoE]
        problems = [msg for bad, msg in [
            (not rt.ddp, f'expert_parallel={n} splits the routed experts across processes started by torchrun, '
                         f'e.g. torchrun --standalone --nproc_per_node={n} {self.stage_script()} CONFIG '
                         f'--expert_parallel={n}'),
            (rt.ddp and n != rt.world_size, f'expert_parallel={n} must equal the number of processes '
                                            f'({rt.world_size}): each rank holds 1/N of the experts'),
            (self.fsdp, 'expert_parallel and fsdp=True do not combine yet; use one of them'),
            (rt.dtype == 'float16', "expert_parallel trains in bfloat16 or float32: with float16's loss "
                                    "scaling an overflow in one rank's experts would skip the step there "
                                    "only; set dtype='bfloat16'"),
            (also_train is not None, f'{self.stage_script()} does not support expert_parallel'),
            (c.get('cuda_graph_train'), 'expert_parallel exchanges a variable number of tokens each step; '
                                        'set cuda_graph_train=False'),
            (not layers, f'expert_parallel={n} needs an MoE model (n_routed_experts > 0)'),
            (any(m.E % n for m in layers), f'expert_parallel={n} needs the routed experts '
                                           f'({layers[0].E if layers else 0}) divisible by {n}'),
        ] if bad]
        if problems:
            sys.exit('error: ' + '; '.join(problems))

    def stage_script(self):
        return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else 'train.py'

    def build_optimizer(self, module):
        c = self.c
        # the second model's own learning rate, as a multiplier of learning_rate that the schedule
        # then scales like every other group's
        lr_scale = None
        if self.also_raw is not None and self.also_lr and c['learning_rate']:
            lr_scale = {id(p): self.also_lr / c['learning_rate'] for p in self.also_raw.parameters()}
        try:
            return build_optimizer(module, c['optimizer'], c['learning_rate'], c['weight_decay'],
                                   (c['beta1'], c['beta2']), device_type=self.rt.device_type,
                                   momentum=c['muon_momentum'], lr_scale=lr_scale)
        except ValueError as e:
            sys.exit(f'error: {e}')

    def optimizer_state_by_name(self, module, optimizer_state):
        """A single-file checkpoint's optimizer state (torch's format, by parameter index), keyed
        by parameter name so that FSDP can shard it: loaded into a throwaway optimizer of the
        still unsharded model (FSDP replaces the parameters when it shards them)."""
        # FSDP's helpers are imported where they are used: importing them takes about a second
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        optimizer = self.build_optimizer(module)
        optimizer.load_state_dict(optimizer_state)
        return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True))

    def load_resume_state(self, resume, trainable, full_optimizer_state):
        """Continue a checkpoint exactly: its optimizer state (resharded to this run's ranks where
        it was sharded, or sharded now), step, best val loss and every rank's RNG stream."""
        rt = self.rt
        base_lrs = [g['base_lr'] for g in self.optimizer.param_groups]
        if 'sharded_dir' in resume and self.ep:
            sys.exit(f"error: {resume['sharded_dir']} was written under fsdp=True; expert_parallel cannot "
                     f"resume its optimizer state yet: resume it once on one process or with DDP (that run "
                     f"saves a ckpt.pt), then with expert_parallel")
        if 'sharded_dir' in resume:                  # written under FSDP, on any number of ranks
            load_sharded_optimizer(trainable, self.optimizer, resume['sharded_dir'])
        elif self.ep:                                # the single-process layout: this rank's experts
            self.optimizer.load_state_dict(parallel.local_optimizer_state(self.raw, self.optimizer,
                                                                           resume['optimizer']))
        elif full_optimizer_state is not None:       # a single-file checkpoint, now sharded
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(trainable, self.optimizer, full_optimizer_state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(resume['optimizer'])
        for g, base_lr in zip(self.optimizer.param_groups, base_lrs):
            g['base_lr'] = base_lr                   # the config's rate wins over the saved one
        if resume.get('scaler') and self.scaler.is_enabled():   # float16's loss scale and its growth count
            self.scaler.load_state_dict(resume['scaler'])
        self.step = resume['step']
        self.best_val_loss = resume.get('best_val_loss', float('inf'))
        per_rank = resume.get('rng_per_rank') or []
        if len(per_rank) == rt.world_size:           # as many ranks as the run that saved it
            restore_rng_state(per_rank[rt.rank])
        elif rt.rank == 0:
            restore_rng_state(resume['rng'])
        else:
            torch.manual_seed(self.c['seed'] + rt.rank)
        if rt.master:
            print(f"resuming {self.c['out_dir']} at step {self.step}")

    def make_optimizer_capturable(self):
        """Make the optimizer's step capturable in a CUDA graph (runtime.CUDAGraphStep): its step
        counts and learning rates stay on the device (set_lr then fills the tensors in place)."""
        for g in self.optimizer.param_groups:
            g['capturable'] = True
            g['lr'] = torch.tensor(float(g['lr']), device=self.rt.device)

    # --- one step -------------------------------------------------------------------------------
    def set_lr(self, step):
        """The learning rate of `step` (optim.lr_at), applied to every param group."""
        c = self.c
        lr = lr_at(step, c['learning_rate'], c['min_lr'], c['warmup_iters'], c['lr_decay_iters'] or c['max_iters'],
                   c['lr_schedule'], c['decay_frac'])
        set_lr(self.optimizer, lr / c['learning_rate'] if c['learning_rate'] else 0.0)   # lr 0: frozen
        return lr

    def batch_generator(self, step, micro_step):
        """The generator of this rank's micro-batch `micro_step` of `step`: a function of the
        micro-batch's GLOBAL index, rank * gradient_accumulation_steps + micro_step, so N ranks
        with accumulation k draw exactly the batches of one process with accumulation N k."""
        index = self.rt.rank * self.c['gradient_accumulation_steps'] + micro_step
        return batch_generator(self.c['seed'], step, index)

    def epoch_batch(self, step, micro_step, n, batch_size):
        """This rank's micro-batch `micro_step` of `step` as batch_size item numbers of n items read
        in epochs (data.epoch_batch), numbered by the micro-batch's global index as above."""
        per_step = self.rt.world_size * self.c['gradient_accumulation_steps']
        number = step * per_step + self.rt.rank * self.c['gradient_accumulation_steps'] + micro_step
        return epoch_batch(n, batch_size, self.c['seed'], number)

    def sync(self, micro):
        """The context of micro-step `micro`'s forward and backward: gradients are reduced across
        ranks after the last micro-step only; before it they accumulate locally (DDP's no_sync,
        FSDP's set_requires_gradient_sync)."""
        last = micro == self.c['gradient_accumulation_steps'] - 1
        if self.ep:
            return contextlib.nullcontext()              # optimizer_step reduces the gradients
        if self.fsdp:
            self.raw.set_requires_gradient_sync(last)
        elif self.rt.ddp and not last:
            stack = contextlib.ExitStack()
            for m in (self.model, self.also):
                if m is not None:
                    stack.enter_context(m.no_sync())
            return stack
        return contextlib.nullcontext()

    def backward(self, loss):
        self.scaler.scale(loss).backward()
        # the loss's parts (model.last_losses: lm, aux, mtp), averaged over the step's micro-batches
        n = self.c['gradient_accumulation_steps']
        for k, v in self.raw.last_losses.items():
            self.parts[k] = self.parts.get(k, 0) + v / n

    def optimizer_step(self):
        """Clip the gradients' global norm to grad_clip (0: off), step the optimizer (through the
        GradScaler in float16), zero the gradients, move the MoE router biases toward equal load
        (auxiliary-loss-free balancing, counts summed over ranks), then QK-Clip (muonclip). Device
        tensors only (no host sync): {'grad_norm', 'loads', 'parts'}, parts the loss's parts
        averaged over the step's micro-batches (backward() adds them up)."""
        out, self.parts = {'parts': self.parts}, {}
        if self.ep:                                    # what DDP would have done in the backward
            parallel.sync_gradients(self.raw)
        if self.c['grad_clip'] > 0:
            self.scaler.unscale_(self.optimizer)
            if self.ep:                                # the norm of the whole model, every rank's experts
                out['grad_norm'] = parallel.clip_grad_norm(self.raw, self.c['grad_clip'])
            else:
                params = [p for m in self.models for p in m.parameters()]
                out['grad_norm'] = clip_grad_norm_(self.optimizer, params, self.c['grad_clip'],
                                                   defer_to_optimizer=not (self.scaler.is_enabled() or self.fsdp))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        reduce_sum = dist.all_reduce if self.rt.ddp else None
        if self.also_raw is not None:
            self.also_raw.update_router_bias(reduce=reduce_sum)
        out['loads'] = self.raw.update_router_bias(reduce=reduce_sum)
        if self.track_logits:                          # (never under cuda_graph_train: refused)
            reduce_max = (lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX)) if self.rt.ddp else None
            for m in self.models:
                # QK-Clip: heads whose largest logit passed qk_clip_tau get their q/k weights scaled back
                if self.c['optimizer'] == 'muonclip':
                    now, n_clipped = qk_clip(m, self.c['qk_clip_tau'], reduce=reduce_max)
                    self.clipped += n_clipped
                else:
                    now = max_logits(m, reduce=reduce_max)
                if m is self.raw:                      # the logged max logits: the model's
                    self.logit_max = now if self.logit_max is None else torch.maximum(self.logit_max, now)
        return out

    # --- logging, evaluation, checkpoints -------------------------------------------------------
    def diverged(self):
        """Whether some step's loss was NaN/inf on any rank (first_bad_step, the first such step
        or -1, reduced over ranks). Syncs the host."""
        bad = self.first_bad_step.clone()
        if self.rt.ddp:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return int(bad) >= 0

    def log(self, step, lr, loss, tokens, out, metrics=None):
        """Count a finished step: step = the steps done, loss its loss (a device tensor), tokens
        this rank's tokens in it, out what optimizer_step returned, metrics the stage's own
        ({name: number or tensor}, logged as train/<name>, the value at this step; under DDP every
        rank passes the same names in the same order: one all-reduce averages them by position).
        The expert loads and the first NaN/inf loss stay on the device; every log_interval steps
        the log line is written: loss, the loss's parts and the metrics as means over ranks,
        tokens/s over all ranks, MFU, grad norm, expert-load imbalance, max attention logits.
        Returns False when the loop should stop: the loss has become NaN/inf, or Ctrl-C (then the
        checkpoint is saved here); finish() says which."""
        c = self.c
        self.step = step
        if out.get('loads') is not None:
            self.expert_load = out['loads'].clone() if self.expert_load is None else self.expert_load + out['loads']
        # a filled scalar, not torch.tensor(step, device=...): that would wait for the GPU
        self.first_bad_step.masked_fill_((self.first_bad_step < 0) & ~torch.isfinite(loss), step - 1)
        self.steps_since += 1
        self.tokens_since += tokens
        self.bar.update(1)
        at_log = step % c['log_interval'] == 0
        if at_log and not self.log_line(step, lr, loss, out, metrics):
            return False
        if self.interrupted(at_log):
            if not self.diverged():
                self.save_at_stop(step)
            return False
        return True

    def log_line(self, step, lr, loss, out, metrics):
        """log()'s line (see there); False, writing nothing, when the loss has become NaN/inf."""
        rt = self.rt
        if self.diverged():
            return False
        numbers = {'train/loss': loss, 'tokens': self.tokens_since}
        numbers.update({f'train/{part}_loss': v for part, v in out['parts'].items()})
        numbers.update({f'train/{name}': v for name, v in (metrics or {}).items()})
        grad_norm = out.get('grad_norm')
        if grad_norm is not None:                        # the same on every rank; FSDP: a DTensor
            numbers['grad_norm'] = grad_norm.full_tensor() if is_sharded(grad_norm) else grad_norm
        numbers = self.mean_over_ranks(numbers)          # one all-reduce, one host sync
        synchronize(rt.device_type)
        elapsed = time.perf_counter() - self.t_last
        self.tokens_seen += numbers['tokens'] * rt.world_size
        tok_s = numbers.pop('tokens') * rt.world_size / elapsed
        dt = elapsed / self.steps_since
        self.t_last, self.steps_since, self.tokens_since = time.perf_counter(), 0, 0.0
        if rt.master:
            row = {'train/loss': numbers.pop('train/loss'), 'lr': lr, 'tokens_per_sec': tok_s, 'step_time_ms': 1000 * dt,
                   'tokens': self.tokens_seen}
            if self.peak:
                row['mfu'] = self.flops_per_token * tok_s / (self.peak * rt.world_size)
            row.update(numbers)
            if rt.device_type == 'cuda':                 # the allocator's high-water mark since the start
                row['peak_mem_gb'] = torch.cuda.max_memory_allocated(rt.device) / 2 ** 30
            if self.expert_load is not None:
                # load imbalance per MoE layer: the busiest expert's tokens over the mean (1 = even)
                # (a layer no token reached since the last line is left out, as null: the MTP module's
                # MoE layer in the stages that do not run it)
                load = self.expert_load
                used = load.sum(1) > 0
                imbalance = (load.max(1).values / load.mean(1).clamp(min=1e-9)).tolist()
                imbalance = [round(v, 3) if u else None for v, u in zip(imbalance, used.tolist())]
                # coefficient of variation of the tokens per expert (std / mean; 0 = even), mean over layers
                cv = load.float().std(1, unbiased=False) / load.float().mean(1).clamp(min=1e-9)
                if used.any():
                    row['moe/max_imbalance'] = max(v for v in imbalance if v is not None)
                    row['moe/load_cv'] = cv[used].mean().item()
                row['moe/imbalance'] = imbalance
                share = (load / load.sum(1, keepdim=True).clamp(min=1)).cpu()
                self.expert_share = share if self.expert_share is None else self.expert_share + share
            if self.logit_max is not None:
                per_layer = self.logit_max.max(1).values.tolist()      # the largest head of each layer
                row['attn/max_logit'] = [round(v, 2) for v in per_layer]
                row['attn/max_logit_all'] = max(per_layer)
                row['qk_clip/clipped_heads'] = int(self.clipped)
            self.log_file.log(step, **row)
            self.bar.set_postfix(loss=f"{row['train/loss']:.4f}", tok_s=f'{tok_s:,.0f}', refresh=False,
                                 **({'mfu': f"{100 * row['mfu']:.1f}%"} if 'mfu' in row else {}))
        self.expert_load = self.logit_max = None
        self.clipped.zero_()
        return True

    def evaluate(self, step, evaluate, plots=LOSS_PLOT):
        """Whether the loop goes on to train step `step`: False at max_iters, with eval_only,
        or when the loss has become NaN/inf (then nothing is evaluated or saved). At step 0,
        every eval_interval steps and at max_iters, first: rank 0 runs evaluate(model) ->
        {metric: float} (the others wait), logs and prints the metrics, draws the plots
        ((keys, file, y label) triples, or one triple; at most every PLOT_EVERY_S, and finish()
        draws the last) and the expert-load heatmap; then the
        checkpoint is saved (every rank takes part) when val/loss improved, or always_save_checkpoint,
        or the stage reports no val/loss, except at step 0."""
        c, rt, log = self.c, self.rt, self.log_file
        self.step = step
        last = step >= c['max_iters'] or c['eval_only']
        if (step % c['eval_interval'] and not last) or (step == self.evaluated_at and not c['eval_only']):
            return not last
        if self.diverged():
            return False                                 # never evaluate or save a diverged model
        synchronize(rt.device_type)                      # the evaluation's and the save's time is not
        t0 = time.perf_counter()                         # training time: the next log line leaves it out
        eval_model = self.evaluation_model()             # None on ranks > 0
        metrics = {}
        if rt.master:
            self.raw.eval()
            self.evaluating = True
            try:
                metrics = evaluate(eval_model)
            except EvaluationInterrupted:             # Ctrl-C (one process): stop without this evaluation
                if step > 0:
                    self.save_at_stop(step)
                return False
            finally:
                self.evaluating = False
                self.raw.train()
            log.log(step, **metrics)
            print(f'step {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in metrics.items()   # (above the bar)
                                               if isinstance(v, float)))
            if not last and time.time() - self.plotted_at >= PLOT_EVERY_S:   # (finish() draws the last)
                self.plot(plots)
            if self.expert_share is not None:
                log.heatmap(self.expert_share / self.expert_share.sum(1, keepdim=True), 'expert_load.png',
                            title=f'share of routed tokens per expert, steps {self.last_heatmap_step}-{step}')
                self.expert_share, self.last_heatmap_step = None, step
        # a stage whose evaluations have no val loss (PPO, GRPO: rewards) saves at every one (-1)
        val = self.from_rank0(metrics.get('val/loss', -1.0))
        if not math.isfinite(val):        # the last step's update broke the model though its loss was
            self.first_bad_step.fill_(max(step - 1, 0))   # finite (at step 0: the model it started from):
            self.bad_what = 'val loss'                    # a diverged model, never saved over the good one
            return False
        if val < 0 or val < self.best_val_loss or c['always_save_checkpoint']:
            self.best_val_loss = min(self.best_val_loss, val) if val >= 0 else self.best_val_loss
            if step > 0 and not c['eval_only'] and c['save_checkpoints']:
                self.save(step, metrics)
        synchronize(rt.device_type)
        self.t_last += time.perf_counter() - t0
        return not last

    def save_at_stop(self, step):
        """Ctrl-C's checkpoint of step `step`, marked not evaluated (a resumed run evaluates that step
        first); none where ckpt.pt keeps the best val loss (always_save_checkpoint=False in a stage
        whose evaluations have one) and holds one of this run's already (a resumed run's included):
        the interrupted state would replace it."""
        c = self.c
        if c['eval_only'] or not c['save_checkpoints'] or self.saved_step == step:
            return
        # (best_val_loss is finite once an evaluation of this run, or of the run it resumes, had a val loss)
        keeps_best = not c['always_save_checkpoint'] and math.isfinite(self.best_val_loss)
        if keeps_best and (self.saved_step is not None or self.resumed_at is not None):
            return
        self.save(step, {}, evaluated=False)

    def plot(self, plots):
        self.plotted_at = time.time()
        plots = [plots] if isinstance(plots[1], str) else plots
        for keys, name, ylabel in plots:
            self.log_file.plot(keys=keys, name=name, ylabel=ylabel)
        if self.track_logits:
            self.log_file.plot(keys=('attn/max_logit_all',), name='max_logit.png', ylabel='max attention logit')

    def interrupted(self, at_log):
        """Whether Ctrl-C asked the run to stop, agreed by every rank (under torchrun asked at
        log steps only: the question is a collective)."""
        if not self.rt.ddp:
            return self.stop_requested
        if not at_log:
            return False
        flag = torch.tensor(float(self.stop_requested), device=self.rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    def finish(self, plots=LOSS_PLOT):
        """After the loop: exit with the step where the loss diverged, or after Ctrl-C with where
        the checkpoint is and the command that resumes it; else print where the checkpoint and
        the loss curve are. Closes the log."""
        c, rt = self.c, self.rt
        self.bar.close()
        if self.stdout is not None:
            self.stdout.close()
        if rt.master and not c['eval_only']:
            self.plot(plots)                  # the curves to the end: finished, Ctrl-C or diverged
        if self.stop_requested and not self.diverged():
            self.log_file.close()
            if rt.master:
                saved = (f'checkpoint of step {self.step} in {checkpoint_path(c["out_dir"])}; continue with\n'
                         f'  {resume_command(sys.argv, rt.world_size if rt.ddp else 1)}'
                         if self.saved_step == self.step else
                         'nothing saved (eval_only)' if c['eval_only'] else
                         'no checkpoint (save_checkpoints=False)' if not c['save_checkpoints'] else
                         'nothing to save (no step trained yet)' if self.step == 0 else
                         f'{checkpoint_path(c["out_dir"])} keeps the best val loss (always_save_checkpoint=False), '
                         f'of step {self.saved_step if self.saved_step is not None else self.resumed_at}; continue '
                         f'from there with\n  {resume_command(sys.argv, rt.world_size if rt.ddp else 1)}')
                print(f'stopped by Ctrl-C after step {self.step}: {saved}', file=sys.stderr)
            sys.exit(130)
        if self.diverged():
            last = checkpoint_path(c['out_dir'])
            bad = int(self.first_bad_step)
            self.log_file.log(bad, diverged_at=bad)        # for a reader of the log (ablate.py: a result)
            self.log_file.close()
            sys.exit(f'error: the {self.bad_what} became NaN/inf at step {int(self.first_bad_step)}; stopped. '
                     f'The last good checkpoint is {last}' + ('' if os.path.exists(last) else ' (none yet)')
                     if rt.master else 1)
        if rt.master and not c['eval_only']:
            path = os.path.join(c['out_dir'], 'loss.png')
            saved = f"; checkpoint in {checkpoint_path(c['out_dir'])}" if c['save_checkpoints'] else ''
            print(f'done: {self.step} steps' + saved + (f', loss curve {path}' if os.path.exists(path) else ''))
        self.log_file.close()

    def token_share_weights(self, counts):
        """The loss weight of each micro-batch of a step whose losses are means over a varying
        number of tokens (SFT's response tokens): counts[m] = n_m, this rank's micro-batch m's tokens,
        N = the sum of n_m over every micro-batch of every rank (one all-reduce, no wait for the host),
            w_m = world_size * n_m / N,
        so sum_m w_m mean_m, averaged over the ranks as DDP / FSDP average their gradients, is the
        mean over all N tokens: what one large batch computes, whatever gradient_accumulation_steps
        and the number of ranks (1 / gradient_accumulation_steps each would weigh a short
        micro-batch's tokens above a long one's). Returns a (len(counts),) float32 tensor."""
        counts = torch.stack([torch.as_tensor(n, device=self.rt.device) for n in counts]).float()  # ints, 0-d tensors
        total = counts.sum()
        if self.rt.ddp:
            dist.all_reduce(total)
        return counts * self.rt.world_size / total.clamp(min=1)

    def mean_over_ranks(self, numbers):
        """{name: number or 0-d tensor} -> {name: float}, averaged over the ranks by one
        all-reduce; in a single process the values themselves."""
        if not self.rt.ddp:
            return {k: float(v) for k, v in numbers.items()}
        t = torch.stack([torch.as_tensor(v, device=self.rt.device).to(torch.float64).reshape(())
                         for v in numbers.values()])
        dist.all_reduce(t)
        return dict(zip(numbers, (t / self.rt.world_size).tolist()))

    def from_rank0(self, x):
        """The float x as rank 0 has it, on every rank (a broadcast); x in a single process."""
        if not self.rt.ddp:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.rt.device)
        dist.broadcast(t, 0)
        return t.item()

    def evaluation_model(self):
        """What evaluate() is given on rank 0 (None on the others, which wait): the model itself
        (not its DDP wrapper), or under FSDP a full copy gathered from the shards (every rank
        takes part in the gather): evaluate runs on rank 0 alone and may sample text, a number of
        forward passes no other rank could match, while FSDP's forward needs every rank (and so does
        an expert-parallel one: its experts are gathered the same way)."""
        if not (self.fsdp or self.ep):
            return self.compiled if self.rt.master else None
        if self.ep:
            weights = parallel.full_state_dict(self.raw)
        else:
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
        under FSDP the buffers, e.g. the router biases; the shards and, under expert parallelism, the
        expert stacks differ by design). Rank 0
        warns if a rank's differs from its own: the replicas have drifted apart. A collective."""
        names, values = [], []
        own = set(parallel.expert_parameter_names(self.raw))      # each rank's own experts
        for name, t in self.raw.state_dict().items():
            if not is_sharded(t) and name not in own:
                t = t.detach().double()
                names.append(name)
                values += [t.sum(), t.square().sum()]
        mine = torch.stack(values) if values else torch.zeros(0, dtype=torch.float64, device=self.rt.device)
        every = [torch.empty_like(mine) for _ in range(self.rt.world_size)]
        dist.all_gather(every, mine)
        every = [f.cpu() for f in every]
        bad = [(r, names[int((f != every[0]).nonzero()[0]) // 2]) for r, f in enumerate(every)
               if not torch.equal(f, every[0])]
        if bad and self.rt.master:
            print(f'warning: at step {self.step} the replicas differ: ' +
                  ', '.join(f'rank {r} in {name}' for r, name in bad), file=sys.stderr)
        return every

    def checkpoint(self, step, metrics, evaluated=True):
        """The checkpoint dict (every rank calls it: each rank's RNG state is gathered, so that a
        resume on as many ranks continues every rank's stream). Under FSDP without the weights
        and optimizer state, which go to the shards. evaluated: whether `step` was evaluated
        before this save (False for Ctrl-C's save: a resumed run evaluates that step first)."""
        rng = capture_rng_state()
        meta = {'tokenizer': self.tok_spec, 'stage': self.stage, 'step': step, 'config': self.c,
                'tokens': self.tokens_seen + self.tokens_since * self.rt.world_size,
                'metrics': metrics, 'best_val_loss': self.best_val_loss, 'rng': rng, 'evaluated': evaluated,
                'scaler': self.scaler.state_dict() if self.scaler.is_enabled() else None, **self.extra}
        if self.rt.ddp:
            per_rank = [None] * self.rt.world_size
            dist.all_gather_object(per_rank, rng)
            meta['rng_per_rank'] = per_rank
            meta['replica_fingerprints'] = self.replica_fingerprints()
        if self.fsdp:
            weights = {'model_config': self.raw.config.to_dict()}
        elif self.ep:                                    # gathered: it loads in one process
            weights = {'model': parallel.full_state_dict(self.raw), 'model_config': self.raw.config.to_dict()}
        else:
            weights = {'model': self.raw.state_dict(), 'model_config': self.raw.config.to_dict()}
        if self.also_raw is not None:                    # PPO's value model, beside the policy
            weights.update(value_model=self.also_raw.state_dict(), value_model_config=self.also_raw.config.to_dict())
        if issubclass(self.model_class, ScalarModel):
            weights['model_class'] = 'scalar'
        if not self.fsdp:
            opt = (parallel.full_optimizer_state(self.raw, self.optimizer) if self.ep
                   else self.optimizer.state_dict())     # learning rates as numbers (cuda_graph_train
            opt['param_groups'] = [{**g, 'lr': float(g['lr'])} for g in opt['param_groups']]  # has tensors)
            weights['optimizer'] = opt
        return {**weights, **meta}

    def save(self, step, metrics, evaluated=True):
        """Every rank calls it. Rank 0 writes out_dir/ckpt.pt and the others wait until it is
        complete; under FSDP every rank writes its shards to out_dir/ckpt_dcp/."""
        ckpt = self.checkpoint(step, metrics, evaluated)
        out_dir, self.saved_step = self.c['out_dir'], step
        if self.fsdp:
            save_sharded_checkpoint(out_dir, self.raw, self.optimizer, ckpt)
            return
        if self.rt.master:
            save_checkpoint(out_dir, ckpt)
            shutil.rmtree(os.path.join(out_dir, SHARDED_DIR), ignore_errors=True)   # one per folder
        if self.rt.ddp:
            dist.barrier()
