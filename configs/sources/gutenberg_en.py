# Project Gutenberg, English books (manu/project_gutenberg, split en): ~38k public-domain books in 52 parquet
# files with columns id, text; the #gutenberg adapter reads `text` and strips each book's license header and
# footer. ~100M tokens a file.
# Public domain (the Project Gutenberg trademark terms apply to the license text, stripped).
FILES = [f'hf:manu/project_gutenberg:data/en-{i:05d}-of-00052.parquet#gutenberg' for i in range(52)]
TOKENS_PER_FILE = 100_000_000
sources = [(FILES[0], 1.0)]
data_dir = 'data/gutenberg_en'
