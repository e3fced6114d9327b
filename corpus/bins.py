"""
The token bins every training stage reads: train.bin / val.bin (uint16, each document BOS text EOS) with
meta.json beside them, written last as the "finished" marker; load_meta, data_ready and BinLoader.

Left out: building the bins (data.py).
"""
import os

import numpy as np

import lumi
from tokenizer import same_tokenizer


def load_meta(data_dir):
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f"{data_dir} has no finished bins (no meta.json): "
                                f"run `python data.py --data_dir={data_dir}`")
    return lumi.read_json(path)


def data_ready(data_dir):
    """Whether data_dir holds finished bins: meta.json and both .bin files of the sizes it records."""
    try:
        meta = load_meta(data_dir)
        return all(os.path.getsize(os.path.join(data_dir, f'{s}.bin')) == 2 * meta[f'{s}_tokens']
                   for s in ('train', 'val'))
    except (OSError, KeyError, ValueError):
        return False


class BinLoader:
    """Random windows from one or several uint16 bin sets, nanoGPT style, resumable bit for bit.

    weights (one per data_dir) set how often each set is drawn; None draws in proportion to size. Each rank
    has its own stream, seeded by (seed, rank).
    """

    def __init__(self, data_dirs, split='train', block_size=1024, batch_size=8, seed=1337,
                 weights=None, tokenizer_sha256=None, rank=0, world_size=1):
        self.dirs = [data_dirs] if isinstance(data_dirs, (str, os.PathLike)) else list(data_dirs)
        if not self.dirs:
            raise ValueError("BinLoader needs at least one data_dir")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        metas = [load_meta(d) for d in self.dirs]
        want = tokenizer_sha256 or metas[0]['tokenizer_sha256']
        for d, m in zip(self.dirs, metas):
            if not same_tokenizer(m['tokenizer_sha256'], want):  # bins of older Lumis store the file hash
                raise ValueError(f"{d}: bins were built with tokenizer {m['tokenizer_sha256']}, "
                                 f"expected {want}")
        self.paths = [os.path.join(d, f'{split}.bin') for d in self.dirs]
        self.sizes = np.array([m[f'{split}_tokens'] for m in metas], dtype=np.int64)
        for p, n in zip(self.paths, self.sizes):
            if n < block_size + 1:
                raise ValueError(f"{p} holds {n} tokens, fewer than block_size + 1 = {block_size + 1}")
        w = np.asarray(weights if weights is not None else self.sizes, dtype=np.float64)
        if len(w) != len(self.dirs) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights {weights} must be one non-negative number per data_dir "
                             f"({len(self.dirs)})")
        self.p = w / w.sum()
        self.split, self.block_size, self.batch_size = split, block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.rng = np.random.Generator(np.random.PCG64([seed, rank]))
        self.batches = 0

    def next_batch(self):
        import torch
        T, B = self.block_size, self.batch_size
        which = (self.rng.choice(len(self.paths), size=B, p=self.p) if len(self.paths) > 1
                 else np.zeros(B, int))
        starts = self.rng.integers(0, self.sizes[which] - T)
        x = np.empty((B, T + 1), dtype=np.int64)
        for k in np.unique(which):  # a fresh memmap per call: nanoGPT's guard against memory growth
            mm = np.memmap(self.paths[k], dtype=np.uint16, mode='r')
            for row in np.flatnonzero(which == k):
                x[row] = mm[starts[row]:starts[row] + T + 1]
        self.batches += 1
        return torch.from_numpy(x[:, :-1].copy()), torch.from_numpy(x[:, 1:].copy())

    def state_dict(self):
        s = self.rng.bit_generator.state
        return {'rng': {'bit_generator': s['bit_generator'], 'state': int(s['state']['state']),
                        'inc': int(s['state']['inc']), 'has_uint32': int(s['has_uint32']),
                        'uinteger': int(s['uinteger'])},
                'batches': self.batches, 'split': self.split, 'seed': self.seed, 'rank': self.rank,
                'dirs': [str(d) for d in self.dirs]}

    def load_state_dict(self, state):
        r = state['rng']
        self.rng.bit_generator.state = {'bit_generator': r['bit_generator'],
                                        'state': {'state': r['state'], 'inc': r['inc']},
                                        'has_uint32': r['has_uint32'], 'uinteger': r['uinteger']}
        self.batches = state['batches']
