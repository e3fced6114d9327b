# FineWeb-Edu, the 10B-token sample (HuggingFaceFW/fineweb-edu, sample/10BT): web pages scored educational by
# a classifier. 14 parquet files with a `text` column (and id, url, score, ...), ~2 GB each, ~0.7B tokens
# each. ODC-BY.
FILES = [f'hf:HuggingFaceFW/fineweb-edu:sample/10BT/{i:03d}_00000.parquet' for i in range(14)]
TOKENS_PER_FILE = 700_000_000
sources = [(FILES[0], 1.0)]
data_dir = 'data/fineweb_edu'
