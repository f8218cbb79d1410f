"""bench.py and its profile summaries, on the CPU with a tiny MoE config."""

import json
import os
from types import SimpleNamespace

import torch

from runtime import idle_table, kernel_table
from conftest import REPO, run_script, run_script_many

TINY_MOE = ['--device=cpu', '--n_layer=2', '--n_head=2', '--n_embd=32', '--attention=mla', '--pos_emb=rope',
            '--q_lora_rank=16', '--kv_lora_rank=16', '--qk_nope_head_dim=8', '--qk_rope_head_dim=8',
            '--v_head_dim=8', '--n_routed_experts=8', '--num_experts_per_tok=2', '--moe_intermediate_size=16',
            '--n_shared_experts=1', '--first_k_dense_replace=1', '--intermediate_size=64', '--vocab_size=96',
            '--batch_size=2', '--block_size=32', '--prompt_len=4', '--decode_tokens=4', '--decode_batches=(1, 3)',
            '--steps=2', '--warmup=1']


def test_bench_times_every_mode(tmp_path):
    out = tmp_path / 'bench.json'
    proc = run_script('bench.py', *TINY_MOE, '--modes=train,prefill,decode,optimizer', '--optimizer=muon',
                      f'--out_file={out}', cwd=tmp_path)
    r = json.loads(out.read_text())
    assert r['train']['tokens_per_sec'] > 0 and 0 < r['train']['mfu']
    assert r['optimizer']['step_ms'] > 0 and r['prefill']['tokens_per_sec'] > 0
    assert r['decode_b1']['tokens_per_sec'] > 0 and r['decode_b3']['tokens_per_sec'] > 0
    assert '| train tokens/s' in proc.stdout and '| decode tokens/s, batch 3' in proc.stdout


def test_bench_times_transformers_in_alternating_rounds(tmp_path):
    """--compare_hf: the training step of ours and of transformers' DeepseekV3 timed in turns, each
    side's median round reported with the ratio."""
    out = tmp_path / 'bench.json'
    proc = run_script('bench.py', *TINY_MOE, '--modes=train', '--compare_hf=True', '--hf_rounds=3',
                      '--scoring_func=sigmoid', '--norm=rmsnorm', '--mlp=swiglu', '--bias=False',
                      '--tie_word_embeddings=False', f'--out_file={out}', cwd=tmp_path)
    r = json.loads(out.read_text())
    rounds = r['train_rounds']
    assert len(rounds['ours']) == 3 and len(rounds['transformers']) == 3
    assert r['train']['tokens_per_sec'] == sorted(rounds['ours'])[1]
    assert r['train_hf']['tokens_per_sec'] == sorted(rounds['transformers'])[1]
    assert 'ours / transformers (eager) = ' in proc.stdout and 'medians of 3 alternating rounds' in proc.stdout


def test_bench_compares_transformers_on_quantized_weights_without_training(tmp_path):
    """--compare_hf with --quantize and no training round: transformers' model is made from the
    full-precision weights (the export met the quantized model and failed)."""
    proc = run_script('bench.py', *TINY_MOE, '--modes=prefill,decode', '--compare_hf=True', '--quantize=int8',
                      '--scoring_func=sigmoid', '--norm=rmsnorm', '--mlp=swiglu', '--bias=False',
                      '--tie_word_embeddings=False', '--decode_batches=(1,)', '--decode_tokens=3', cwd=tmp_path)
    assert 'transformers (eager generate)' in proc.stdout and '| prefill tokens/s' in proc.stdout


def test_bench_rejects_an_unknown_mode(tmp_path):
    mode, compile_mode, graph = run_script_many('bench.py', [
        [*TINY_MOE, '--modes=train,fly'], [*TINY_MOE, '--modes=train', '--compile_mode=fast'],
        [*TINY_MOE, '--modes=train', '--cuda_graph_train=True']], cwd=tmp_path)
    assert mode.returncode != 0 and "modes=['fly']" in mode.stderr
    assert compile_mode.returncode != 0 and "compile_mode='fast'; valid: default, reduce-overhead" in compile_mode.stderr
    assert graph.returncode != 0 and 'cuda_graph_train=True needs a CUDA GPU' in graph.stderr


def test_kernel_table_sums_kernels_by_name_and_class():
    cuda = torch.autograd.DeviceType.CUDA

    def event(name, us, device=cuda, annotation=False):
        return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation,
                               time_range=SimpleNamespace(elapsed_us=lambda: us))
    events = [event('nvjet_sm90_tst_64x8', 30.0), event('nvjet_sm90_tst_64x8', 20.0),
              event('triton_poi_fused__scaled_dot_product_cudnn_attention_3', 30.0),
              event('cudnn_sdpa_flash_fprop', 20.0),
              event('aten::mm', 500.0, torch.autograd.DeviceType.CPU),        # a host op: not a kernel
              event('Optimizer.step#AdamW.step', 70.0, annotation=True)]     # a range over kernels: not one
    table = kernel_table(SimpleNamespace(events=lambda: events))
    lines = table.splitlines()
    assert lines[0] == 'device kernels: 3 kinds, 4 launches, 0.10 ms'
    assert lines[1].split() == ['0.050', 'ms', '50.0%', '2x', 'nvjet_sm90_tst_64x8']
    assert 'GEMM 0.05 ms (50%)' in lines[-1] and 'fused (Triton) 0.03 ms (30%)' in lines[-1]
    assert 'attention 0.02 ms (20%)' in lines[-1]


def test_idle_table_finds_the_gaps_between_kernels_and_the_host_ops_behind_them():
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name, start, end, device=cuda):
        return SimpleNamespace(name=name, device_type=device, is_user_annotation=False,
                               time_range=SimpleNamespace(start=start, end=end))
    events = [event('gemm_a', 0.0, 100.0), event('triton_b', 50.0, 120.0),   # overlapping: busy to 120
              event('triton_c', 150.0, 160.0),                                # a 30 us gap before it
              event('adam_d', 260.0, 300.0),                                  # a 100 us gap before it
              event('Optimizer.step', 200.0, 300.0, cpu), event('aten::_foreach_add', 255.0, 262.0, cpu),
              event('aten::mm', 0.0, 10.0, cpu)]
    lines = idle_table(SimpleNamespace(events=lambda: events)).splitlines()
    assert lines[0].startswith('device span 0.30 ms, idle 0.13 ms (43%) in 2 gaps')
    assert lines[1].split()[:6] == ['100.0', 'us', 'after', 'triton_c', 'before', 'adam_d']
    assert lines[1].endswith('host: Optimizer.step > aten::_foreach_add')
    assert lines[2].split()[:6] == ['30.0', 'us', 'after', 'triton_b', 'before', 'triton_c']


def test_bench_inductor_settings_are_checked_against_torch(tmp_path):
    """--inductor={...} sets torch._inductor.config values for the run (dotted keys reach its
    sub-configs); a name this torch lacks is refused before anything runs."""
    knob, number = run_script_many('bench.py', [[*TINY_MOE, '--modes=train', "--inductor={'triton.no_such_knob': 1}"],
                                                [*TINY_MOE, '--modes=train', '--inductor=3']], cwd=tmp_path)
    assert knob.returncode != 0 and 'has no torch._inductor.config.triton.no_such_knob' in knob.stderr
    assert number.returncode != 0 and "'inductor' takes dict" in number.stderr
    out = tmp_path / 'bench.json'
    run_script('bench.py', *TINY_MOE, '--modes=train', "--inductor={'triton.mix_order_reduction': False}",
               f'--out_file={out}', cwd=tmp_path)
    assert json.loads(out.read_text())['train']['tokens_per_sec'] > 0


def test_bench_gives_the_model_the_vocabulary_of_the_configs_dataset(tmp_path):
    """A train.py config names its dataset; the model bench.py times has that dataset's vocabulary
    (padded), as the one train.py trains, not GPT-2's 50,304 (a 7x larger model for a 4,096-token BPE)."""
    (tmp_path / 'data' / 'bpe4k').mkdir(parents=True)
    (tmp_path / 'data' / 'bpe4k' / 'meta.json').write_text(json.dumps({'vocab_size': 4000}))
    (tmp_path / 'cfg.py').write_text("dataset = 'bpe4k'\nprepare = 'tinystories.py'\n")   # (prepare: train.py's)
    args = [a for a in TINY_MOE if not a.startswith('--vocab_size')]
    out = tmp_path / 'b.json'
    run_script('bench.py', 'cfg.py', *args, '--modes=optimizer', f'--out_file={out}', cwd=tmp_path)
    assert json.loads(out.read_text())['config']['vocab_size'] == 4032              # 4,000 padded to 64s


def test_ab_refuses_a_malformed_variant_before_touching_model_py(tmp_path):
    """experiments/ab.py swaps model.py for each variant's: a variant it cannot run is refused by
    name before any swap (and before any GPU is needed)."""
    model_py = os.path.join(REPO, 'model.py')
    before = open(model_py, 'rb').read()
    name, item = run_script_many('experiments/ab.py', [['base=no_such_model.py'], ['x=model.py;PDL']], cwd=tmp_path)
    assert name.returncode != 0 and "variant 'base=no_such_model.py': give NAME=MODEL_FILE" in name.stderr
    assert item.returncode != 0 and "variant 'x': items ['PDL'] are neither VAR=VALUE nor --key=value" in item.stderr
    assert open(model_py, 'rb').read() == before


SERVE_MOE = [a for a in TINY_MOE if a.split('=')[0] not in ('--prompt_len', '--decode_tokens', '--decode_batches',
                                                            '--steps', '--warmup', '--batch_size')]


def test_bench_serve_continuous_and_static_batching_make_the_same_tokens(tmp_path):
    """Every request's output is its own length in both methods (no early stop), at each
    concurrency level; the table has a row per method and level; bad settings are refused."""
    out = tmp_path / 'serve.json'
    proc = run_script('bench_serve.py', *SERVE_MOE, '--block_size=64', '--streams=1,3', '--n_requests=5',
                      '--min_prompt=2', '--max_prompt=9', '--min_output=1', '--max_output=12', f'--out_file={out}',
                      '--methods=engine,engine_sync,static', f'--profile={tmp_path / "profile.txt"}', cwd=tmp_path)
    rows = json.loads(out.read_text())['results']
    # profile=: each method's timed run at each level profiled (on the CPU: its operations' table)
    profile = (tmp_path / 'profile.txt').read_text()
    titles = [line for line in profile.splitlines() if line.startswith('=== ')]
    assert titles == [f'=== {m} at {C} streams, 5 requests ===' for C in (1, 3) for m in ('engine', 'engine_sync', 'static')]
    assert 'aten::' in profile
    assert [(r['method'], r['streams']) for r in rows] == [(m, C) for C in (1, 3) for m in ('engine', 'engine_sync', 'static')]
    assert len({r['tokens'] for r in rows}) == 1 and rows[0]['tokens'] >= 5
    # one stream: one step a token for every method; three: static batching runs each group to its longest
    assert all(r['steps'] == r['tokens'] for r in rows[:3]) and rows[5]['steps'] >= rows[4]['steps']
    assert all(r['tokens_per_s'] > 0 and r['ttft_p50'] <= r['ttft_p99'] for r in rows)
    assert '| 3 | engine |' in proc.stdout and 'bytes per token' in proc.stdout
    assert 'engine steps: eager;' in proc.stdout          # cuda_graph None: off on the CPU
    assert all(r['graphs'] == 0 and r['capture_s'] >= 0 for r in rows if r['method'].startswith('engine'))
    # the engine's own counts: its steps, the prompt tokens it read (eager passes on the CPU)
    assert all(r['engine_stats']['steps'] == r['steps'] and r['engine_stats']['requests'] == 5
               and r['engine_stats']['eager_steps'] >= r['steps'] for r in rows if r['method'].startswith('engine'))
    assert 'graphs captured' not in proc.stdout           # (printed where the engine captured some)
    vllm, bad, tail, steps, long_tail, compiled, rows = run_script_many('bench_serve.py', [[*SERVE_MOE, '--methods=engine,vllm'],
                                                                [*SERVE_MOE, '--block_size=64', '--max_prompt=60'],
                                                                [*SERVE_MOE, '--output_lengths=exponential',
                                                                 '--mean_output=8', '--min_output=16'],
                                                                [*SERVE_MOE, '--steps_only=True', '--streams=1,4',
                                                                 '--n_requests=8', '--min_output=1', '--max_output=9'],
                                                                [*SERVE_MOE, '--steps_only=True', '--streams=4',
                                                                 '--n_requests=8', '--output_lengths=exponential',
                                                                 '--min_output=1', '--mean_output=5', '--max_output=9'],
                                                                [*SERVE_MOE, '--compile_step=True'],   # no graphs on the CPU
                                                                [*SERVE_MOE, '--prompt_rows=True']],
                                             cwd=tmp_path)
    # a perfect continuous batcher at one stream runs the static steps; at 4, fewer
    one, four = [line.split('|')[3:6] for line in steps.stdout.splitlines() if line.startswith(('| 1 |', '| 4 |'))]
    assert one[0] == one[1] and one[2].strip() == '1.00' and int(four[0]) > int(four[1])
    # exponential output lengths: other requests (their own draws), and static batching still waits longest
    row = next(line.split('|')[3:5] for line in long_tail.stdout.splitlines() if line.startswith('| 4 |'))
    assert int(row[0]) >= int(row[1]) and row != four[:2]
    assert vllm.returncode != 0 and "['vllm']" in vllm.stdout + vllm.stderr
    assert bad.returncode != 0 and 'exceeds the block_size 64' in bad.stdout + bad.stderr
    assert tail.returncode != 0 and 'mean_output=8 outside min_output..max_output' in tail.stdout + tail.stderr
    assert compiled.returncode != 0 and 'compile_step=True fuses the CUDA-graph steps' in compiled.stdout + compiled.stderr
    assert rows.returncode != 0 and 'prompt_rows=True puts prompt tokens in the fixed-shape steps' in rows.stderr
