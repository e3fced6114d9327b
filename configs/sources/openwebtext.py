# OpenWebText (Skylion007/openwebtext): 8M pages linked from Reddit, the open copy of GPT-2's WebText, ~9B
# tokens. The hub stores it as nested archives; its parquet conversion (revision refs/convert/parquet, a
# `text` column) is what Lumi reads. The file count below is that conversion's at the time of writing: check
# the repository's refs/convert/parquet tree if a file is missing. ~110M tokens a file.
FILES = [f'hf:Skylion007/openwebtext==refs/convert/parquet:plain_text/train/{i:04d}.parquet'
         for i in range(80)]
TOKENS_PER_FILE = 110_000_000
sources = [(FILES[0], 1.0)]
data_dir = 'data/openwebtext'
