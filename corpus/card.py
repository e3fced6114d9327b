"""
DATA_CARD.md: what went into a data_dir and what came out, and why, from corpus/manifest.json, the tokenizer
card and meta.json: counts per source and reason (every line, record, file and archive member dropped), the
processing settings, the tokenizer's held-out quality, the bins' split and shares, and a sample of each
source.

Left out: computing any of it (data.py writes the inputs).
"""
import os

import lumi
from corpus.bins import load_meta
from corpus.parts import iter_corpus

# what the table shows in columns of their own; every other count of a source goes under "other"
COLUMNS = ('spec', 'files', 'bytes', 'docs', 'kept_docs', 'kept_chars')


def write_data_card(data_dir):
    """DATA_CARD.md: what went in, what came out and why, from the manifest, tokenizer card and meta."""
    man = lumi.read_json(os.path.join(data_dir, 'corpus', 'manifest.json'))
    card_path = os.path.join(data_dir, 'tokenizer', 'tokenizer.json')
    tok = lumi.read_json(card_path) if os.path.exists(card_path) else None
    meta = load_meta(data_dir) if os.path.exists(os.path.join(data_dir, 'meta.json')) else None
    reasons = ['too_short', 'low_alpha', 'repetitive', 'exact_duplicate', 'near_duplicate']
    lines = [f"# Data card: {data_dir}", "",
             f"Corpus built {man['created']} by data.py in {man['seconds']:.0f}s "
             f"(dedupe {man['dedupe_seconds']:.1f}s). {man['kept_docs']:,} documents, "
             f"{man['kept_chars'] / 1e6:.2f}M characters kept from {man['bytes_in'] / 1e6:.2f} MB of files.",
             "", "## Sources", "",
             "| source | files | MB in | docs in | kept | " + " | ".join(reasons) + " | other |",
             "|---" * (6 + len(reasons)) + "|"]
    for s in man['sources']:
        # every other count, so that whatever a loader drops shows (LOADER_COUNTS, and any it adds later)
        other = {k: v for k, v in s.items() if k not in COLUMNS and not k.startswith('rejected_') and v}
        lines.append(f"| `{s['spec']}` | {s.get('files', 0)} | {s.get('bytes', 0) / 1e6:.2f} | "
                     f"{s.get('docs', 0):,} | {s.get('kept_docs', 0):,} | "
                     + " | ".join(f"{s.get('rejected_' + r, 0):,}" for r in reasons)
                     + f" | {', '.join(f'{k} {v}' for k, v in other.items()) or '-'} |")
    st = man['settings']
    lines += ["", "## Processing", "",
              f"- Documents: adapter output split at paragraph boundaries into at most {st['max_doc_chars']} "
              "characters.",
              f"- Cleaning: Unicode NFC, control characters removed, "
              f"URLs {'scrubbed' if st['scrub_urls'] else 'kept'}, "
              f"e-mails {'scrubbed' if st['scrub_emails'] else 'kept'}, "
              "trailing and repeated spaces collapsed.",
              f"- Filters: under {st['min_doc_chars']} characters; "
              f"letters under {st['min_alpha_ratio']:.0%} of non-space characters; "
              f"over {st['max_dup_line_frac']:.0%} of line characters in repeated lines.",
              f"- Dedupe: exact (case and whitespace ignored), then MinHash ({st['num_perm']} permutations, "
              f"{st['shingle_words']}-word shingles) + LSH, estimated Jaccard >= {st['near_dup_threshold']}; "
              "the first document of a cluster (in source order) is kept."]
    if tok:
        q = tok['held_out']
        lines += ["", "## Tokenizer", "",
                  f"SentencePiece {tok['model_type']}, vocab {tok['vocab_size']}, SHA256 `{tok['sha256']}`. "
                  f"On {q['docs']} held-out (val) documents: {q['chars_per_token']:.2f} characters "
                  f"per token, unknown rate {q['unk_rate']:.2e}, "
                  f"byte fallback rate {q['byte_fallback_rate']:.2e}, "
                  f"exact round trips {q['roundtrip_exact']:.1%}."]
    if meta:
        lines += ["", "## Bins", "",
                  f"train.bin {meta['train_tokens']:,} tokens, val.bin {meta['val_tokens']:,} tokens "
                  f"(uint16, each document BOS text EOS, val = {meta['val_fraction']:.1%} of documents "
                  "by hash).", "",
                  "| source | weight | train docs | train tokens | share | val docs | val tokens |",
                  "|---" * 7 + "|"]
        for s in meta['sources']:
            lines.append(f"| `{s['spec']}` | {s['weight']} | {s.get('train_docs', 0):,} | "
                         f"{s.get('train_tokens', 0):,} | "
                         f"{s['train_share']:.1%} | {s.get('val_docs', 0):,} | {s.get('val_tokens', 0):,} |")
    lines += ["", "## Samples", ""]
    shown = set()
    for rec in iter_corpus(data_dir):
        if rec['source'] not in shown:
            shown.add(rec['source'])
            lines += [f"`{rec['source']}`:", "", "```", rec['text'][:400].replace('```', "'''"), "```", ""]
    text = '\n'.join(lines) + '\n'
    lumi.atomic_write(os.path.join(data_dir, 'corpus', 'DATA_CARD.md'), lambda f: f.write(text), mode='w')
