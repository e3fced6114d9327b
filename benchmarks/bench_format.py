"""
SFT's format check with more draws than the stage's closing 50: every held-out prompt that fits, sampled at
several seeds, so a figure near the bar (98 % of replies end with <|end|>) can be told from noise. A run's
check sees 50 replies; at a true 98 %, three or more of them miss 8 % of the time.

    python benchmarks/bench_format.py runs/pipeline_cpu/sft/merged.pt
    python benchmarks/bench_format.py CKPT --config=configs/sft_cpu.py --seeds=6 --repetition_penalty=1.3 \
        --frequency_penalty=0.3

The prompts, the reply budget and the temperature come from the SFT config (its sources, held-out split and
format_* keys); the penalties default to configs/pipeline_cpu.py's sft_args. Prints each seed's rate, per
source, and the pooled rate over all draws.
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import lumi  # noqa: E402
import sft  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('ckpt', help="an SFT model (sft.py's merged.pt)")
    ap.add_argument('--config', default='configs/sft_cpu.py', help='the SFT config it was trained with')
    ap.add_argument('--seeds', type=int, default=6, help='sampling seeds, each over every prompt')
    ap.add_argument('--repetition_penalty', type=float, default=1.3)
    ap.add_argument('--frequency_penalty', type=float, default=0.3)
    args = ap.parse_args()
    ckpt = os.path.abspath(args.ckpt)
    os.chdir(ROOT)  # the config's data and cache paths are relative to the repository
    cfg = lumi.load_config(sft.KEYS, [args.config], shares_with=())
    model, tok, _ = sft.load_model(ckpt, adapters=False, train=False)
    srcs = sft.normalize_sources(cfg.sources)
    prepared = sft.prepare_sft_data(tok, srcs, model.cfg.block_size, cfg.cache_dir, cfg.val_frac,
                                    cfg.data_format, cfg.template_vars)
    held_out = np.flatnonzero(prepared['val'].numpy())
    val_ex = sft.mixed_order(prepared, held_out, [w for _, w in srcs], cfg.seed)
    names = [sft.source_name(s) for s in prepared['sources']]
    penalties = dict(repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty)
    ended = prompts = 0
    for k in range(args.seeds):
        fc = sft.format_check(model, tok, prepared, val_ex, len(val_ex), cfg.format_max_new_tokens,
                              cfg.format_temperature, names, greedy=0, penalties=penalties, seed=1000 * k)
        ended += round(fc['format_end_rate'] * fc['format_prompts'])
        prompts += fc['format_prompts']
        print(f"seed {1000 * k}: {fc['format_end_rate']:.1%} of {fc['format_prompts']} end within "
              f"{cfg.format_max_new_tokens} tokens ({sft.per_source(fc, '.1%')}); "
              f"references {fc['format_reference_end_rate']:.1%}")
    print(f"pooled: {ended} of {prompts} replies end ({ended / max(1, prompts):.1%}), {args.seeds} seeds, "
          f"T={cfg.format_temperature}, {args.ckpt}")


if __name__ == '__main__':
    main()
