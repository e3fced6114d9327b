# English Wikipedia, dump of 2023-11-01 (wikimedia/wikipedia, 20231101.en): 6.4M articles in 41 parquet files
# with columns id, url, title, text; ~4.5B tokens in all, ~110M a file. CC BY-SA 4.0 and GFDL.
FILES = [f'hf:wikimedia/wikipedia:20231101.en/train-{i:05d}-of-00041.parquet' for i in range(41)]
TOKENS_PER_FILE = 110_000_000
sources = [(FILES[0], 1.0)]
data_dir = 'data/wikipedia_en'
