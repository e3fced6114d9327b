# C4 English (allenai/c4, config en): Common Crawl of April 2019, filtered by the C4 rules. 1024 gzipped
# JSON-lines shards of ~356k documents {text, timestamp, url}, ~305 MB each; ~156B tokens in all, so ~150M a
# shard. ODC-BY.
# Usable alone as a data config: `python data.py configs/sources/c4_en.py` reads its first shard.
FILES = [f'hf:allenai/c4:en/c4-train.{i:05d}-of-01024.json.gz' for i in range(1024)]
TOKENS_PER_FILE = 150_000_000
sources = [(FILES[0], 1.0)]
data_dir = 'data/c4_en'
