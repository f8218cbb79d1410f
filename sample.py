"""
Generate text from any stage's checkpoint, printing tokens as they come.

$ python sample.py --out_dir=out/shakespeare_char
$ python sample.py --out_dir=out/tinystories_moe --start="Once upon a time" --num_samples=5
$ python sample.py --out_dir=out/run --start=FILE:prompt.txt --temperature=0   # greedy
$ python sample.py --out_dir=out/sft --start="Write a story that uses the words: dog, ball, happy."
$ python sample.py --out_dir=out/run --temperature=0 --speculative=True     # a model trained with mtp_depth >= 1

With a checkpoint whose tokenizer has the chat template (sft.py and later stages), --start is the
user's turn and the answer ends at <|end|> (--chat=False continues raw text instead).
"""

import sys

import torch

from checkpoint import load_model, newest_run
from config import configure, last_given
from runtime import init_runtime
from generate import generate_speculative, generate_tokens, sampling_problems

# -----------------------------------------------------------------------------
out_dir = ''                 # a folder holding ckpt.pt (from any stage); '': the newest under out/
start = ''                   # the prompt; 'FILE:path' reads it from a file; '' starts a fresh document
num_samples = 3
max_new_tokens = 256
temperature = 0.8            # 0: greedy
top_k = 200                  # keep the k most likely tokens (0: off)
top_p = 1.0                  # nucleus sampling: the smallest set with this much probability (1.0: off)
frequency_penalty = 0.0      # OpenAI's: each use of a token lowers its logit by this much (against loops)
presence_penalty = 0.0       # OpenAI's: a token used at all has its logit lowered by this much
seed = 1337
stop_at_eot = True           # end a sample at the end-of-text token (or end of turn)
chat = None                  # prompt with the chat template; None: if the checkpoint has one
cuda_graph = True            # on CUDA: replay each one-token step as a CUDA graph (generate.DecodeGraph)
compile_decode = False       # with cuda_graph: fuse that step with torch.compile first (tens of seconds
                             # of compilation; then about 2x faster again, see docs/performance.md)
speculative = False          # greedy decoding that drafts tokens with the checkpoint's MTP modules and
                             # checks them in one forward pass (generate.generate_speculative): the same
                             # tokens as --temperature=0, in fewer forward passes
quantize = ''                # 'int8' | 'int4': weights quantized at load (quant.py); '': as saved
device = 'auto'
dtype = 'auto'
# -----------------------------------------------------------------------------
configure(globals(), verbose=False)
problems = sampling_problems(temperature, top_k, top_p) + [msg for bad, msg in [
    (num_samples < 1, f'num_samples={num_samples} must be at least 1'),
    (max_new_tokens < 1, f'max_new_tokens={max_new_tokens} must be at least 1'),
    (speculative and temperature > 0, f'speculative=True is greedy decoding: set --temperature=0 (not {temperature})'),
    (speculative and bool(frequency_penalty or presence_penalty), 'speculative=True checks plain greedy tokens: '
                                                                   'no frequency_penalty / presence_penalty'),
    (speculative and num_samples > 1 and 'num_samples' in last_given,
     f'speculative=True writes the one greedy answer (not num_samples={num_samples})'),
    (compile_decode and not cuda_graph, 'compile_decode=True compiles the captured step: it needs cuda_graph=True'),
] if bad]
if problems:
    sys.exit('error: ' + '; '.join(problems))
if start.startswith('FILE:'):
    try:
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    except OSError as e:
        sys.exit(f"error: cannot read the prompt file '{start[5:]}': {e.strerror}")
    except UnicodeDecodeError:
        sys.exit(f"error: the prompt file '{start[5:]}' is not UTF-8 text")

out_dir = out_dir or newest_run('sampling from')
rt = init_runtime(device, dtype, seed)
model, tok, ckpt = load_model(out_dir, rt.device, quantize=quantize)
model.eval()
if rt.dtype != 'float32':    # generation only: weights in the compute dtype, no casts per step
    model.to(getattr(torch, rt.dtype))
print(f"{out_dir}: {ckpt.get('stage', '?')} checkpoint at step {ckpt.get('step', '?')}, "
      f"{model.num_params() / 1e6:.1f}M parameters, {tok.kind} tokenizer", file=sys.stderr)
chat = bool(tok.chat) if chat is None else chat
if chat and not tok.chat:
    sys.exit(f'error: chat=True but {out_dir} has no chat template (fine-tune it with sft.py first)')
try:
    if chat:
        prompt = tok.encode_chat(start)[0]       # EOT <|user|> start <|end|> <|assistant|>
    else:
        prompt = [tok.eot_id] + tok.encode(start)    # documents follow EOT in the training data
except ValueError as e:
    sys.exit(f'error: the prompt cannot be encoded: {e}')
stops = (tok.stop_ids() if chat else [tok.eot_id]) if stop_at_eot else None
if speculative:
    if not model.config.mtp_depth:
        sys.exit(f'error: speculative=True drafts with MTP modules and {out_dir} has none (train with --mtp_depth=1)')
    room = model.config.block_size - len(prompt)       # speculative decoding keeps the whole answer in view
    if room < 1:
        sys.exit(f'error: the prompt ({len(prompt)} tokens) fills block_size {model.config.block_size}: '
                 f'speculative decoding needs room for the answer in the context; shorten the prompt')
    if max_new_tokens > room:
        print(f'speculative: at most {room} new tokens (the prompt has {len(prompt)} of block_size '
              f'{model.config.block_size}; speculative decoding keeps the whole answer in view)', file=sys.stderr)
        max_new_tokens = room
    with rt.autocast():
        try:
            new, stats = generate_speculative(model, prompt, max_new_tokens, stop_ids=stops or (),
                                              vocab_limit=tok.vocab_size)
        except ValueError as e:
            sys.exit(f'error: {e}')
    new = new[:-1] if stops and new and new[-1] in stops else new
    print((f'[user] {start}\n[assistant] ' if chat else start) + tok.decode(new))
    print(f"speculative: {stats['accepted']} of {stats['drafted']} drafted tokens accepted "
          f"({stats['accepted'] / max(stats['drafted'], 1):.0%}), {len(new)} tokens in {stats['forward_passes']} "
          f"forward passes of the main model", file=sys.stderr)
    sys.exit(0)
idx = torch.tensor([prompt], dtype=torch.long, device=rt.device)
gen = torch.Generator(device=rt.device).manual_seed(seed)

for k in range(num_samples):
    print(f'[user] {start}\n[assistant] ' if chat else start, end='', flush=True)
    new, shown = [], ''
    with rt.autocast():
        for t in generate_tokens(model, idx, max_new_tokens, temperature=temperature, top_k=top_k or None,
                                       top_p=top_p, stop_ids=stops, vocab_limit=tok.vocab_size,
                                       generator=gen, cuda_graph=cuda_graph and rt.device_type == 'cuda',
                                       compile_step=compile_decode, frequency_penalty=frequency_penalty,
                                       presence_penalty=presence_penalty):
            if stops and int(t[0]) in stops:
                break
            new.append(int(t[0]))
            text = tok.decode(new)
            if text.endswith('\ufffd'):            # wait for the rest of a multi-byte character
                continue
            print(text[len(shown):], end='', flush=True)
            shown = text
    print(tok.decode(new)[len(shown):])
    print('-' * 40)
