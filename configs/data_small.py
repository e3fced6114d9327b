# The data of the small budget: ~2B tokens, mostly FineWeb-Edu
# and C4, with Wikipedia, OpenWebText and books (estimates per file in configs/sources/):
#   python data.py configs/data_small.py           # then:
#   python train.py configs/small.py --data_dir=data/web_small
# ~8 GB of text; with more machines, split it: `--num_shards=N --shard_index=I` (see data.py's docstring).
from corpus import sources as _s

sources = (_s.source_set('fineweb_edu', 1)      # ~700M tokens
           + _s.source_set('c4_en', 5)          # ~750M
           + _s.source_set('wikipedia_en', 2)   # ~220M
           + _s.source_set('openwebtext', 2)    # ~220M
           + _s.source_set('gutenberg_en', 1))  # ~100M
data_dir = 'data/web_small'
vocab_size = 32768
val_fraction = 0.002  # ~4M tokens of val
