# The data of the base budget: ~7B tokens, half of it
# FineWeb-Edu (estimates per file in configs/sources/):
#   python data.py configs/data_base.py            # then:
#   python train.py configs/base.py --data_dir=data/web_base
# ~28 GB of text: worth splitting across machines, `--num_shards=N --shard_index=I` (see data.py's docstring).
from corpus import sources as _s

sources = (_s.source_set('fineweb_edu', 5)      # ~3.5B tokens
           + _s.source_set('c4_en', 12)         # ~1.8B
           + _s.source_set('wikipedia_en', 8)   # ~880M
           + _s.source_set('openwebtext', 5)    # ~550M
           + _s.source_set('gutenberg_en', 3))  # ~300M
data_dir = 'data/web_base'
vocab_size = 32768
val_fraction = 0.001  # ~7M tokens of val
