"""
Peak memory of distill.py's KL term, forward and backward, whole (distillation_kl on the teacher's
full log-probabilities) against chunked (chunked_distillation_kl), each in a fresh process.
On a CUDA device the peak is torch.cuda.max_memory_allocated above what the logits hold; on the
CPU the process's peak resident memory (ru_maxrss) above that before the loss.

$ python experiments/kd_memory.py                                   # B 8, T 512, GPT-2's vocabulary, CPU
$ python experiments/kd_memory.py --batch=64 --device=cuda          # the gpu profile's distill batch
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))


def one(method, B, T, V, device, chunk):
    import torch
    from model import chunked_distillation_kl, distillation_kl, teacher_log_probs
    g = torch.Generator(device=device).manual_seed(0)
    # bf16 logits, as the models return them under autocast (padded vocabulary: 50,304 for 50,257)
    student = torch.randn(B, T, V + 47, device=device, generator=g, dtype=torch.bfloat16).requires_grad_()
    teacher = torch.randn(B, T, V + 47, device=device, generator=g, dtype=torch.bfloat16)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    if device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if method == 'whole':
        loss = distillation_kl(student, teacher_log_probs(teacher, 1.0, 0, V), 1.0, 'forward', mask, V)
    else:
        loss = chunked_distillation_kl(student, teacher, 1.0, 'forward', mask, V, chunk=chunk)
    loss.backward()
    if device == 'cuda':
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {'method': method, 'peak_gb': peak / 1e9, 'seconds': time.perf_counter() - t0, 'loss': loss.item()}


if __name__ == '__main__':
    p = argparse.ArgumentParser()
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--block', type=int, default=512)
    p.add_argument('--vocab', type=int, default=50257)
    p.add_argument('--device', default='cpu')
    p.add_argument('--chunk', type=int, default=4096)
    p.add_argument('--one', default='')
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.batch, a.block, a.vocab, a.device, a.chunk)))
        sys.exit(0)
    rows = []
    for method in ('whole', 'chunked'):
        out = subprocess.run([sys.executable, __file__, f'--one={method}', f'--batch={a.batch}', f'--block={a.block}',
                              f'--vocab={a.vocab}', f'--device={a.device}', f'--chunk={a.chunk}'],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    logits_gb = a.batch * a.block * (a.vocab + 47) * 2 / 1e9
    print(f'B {a.batch} x T {a.block} x V {a.vocab}, {a.device}; each bf16 logits tensor {logits_gb:.2f} GB')
    print('| KL term | peak memory above the logits | time (forward + backward) | loss |')
    print('| --- | --- | --- | --- |')
    for r in rows:
        print(f"| {r['method']} | {r['peak_gb']:.2f} GB | {r['seconds']:.2f} s | {r['loss']:.6f} |")
