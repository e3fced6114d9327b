# The data of the tiny budget: ~500M tokens of web, encyclopedia and book text,
# from the sets in configs/sources/ (each file's token count there is an estimate:
# meta.json's train_tokens says what a build gave):
#   python data.py configs/data_tiny.py            # then:
#   python train.py configs/tiny.py --data_dir=data/web_tiny
# ~2 GB of text to fetch; the corpus step cleaned ~5 MB of text a second per core in
# benchmarks/bench_data_scale.py (docs/BENCHMARKS.md, "Data at scale"), so ~3 minutes on 2 cores once
# downloaded; packing ~1M tokens a second per core.
from corpus import sources as _s

sources = (_s.source_set('c4_en', 2)           # ~300M tokens
           + _s.source_set('wikipedia_en', 1)  # ~110M
           + _s.source_set('gutenberg_en', 1))  # ~100M
data_dir = 'data/web_tiny'
vocab_size = 32768
val_fraction = 0.005  # ~2.5M tokens of val: plenty for a loss estimate
