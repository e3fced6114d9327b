# The CPU profile's corpus and model: what `lumi.py run configs/pipeline_cpu.py` prepares and pretrains, sized
# for 2 CPU cores by the sweep in benchmarks/bench_recipe.py (docs/BENCHMARKS.md, "Recipe"):
#   python data.py configs/cpu.py          # the starter corpus with a 4096-piece tokenizer, ~20 s
#   python train.py configs/cpu.py --max_minutes=9
# On a CPU what is learned per second decides everything: the seed design's tiny model (configs/tiny.py: 32k
# vocabulary, 1024 context, 14.7M parameters) makes ~35 steps in 7 minutes on an AVX2 core pair and stays a
# unigram model. Here a 4k vocabulary (its embedding costs 8x less than 32k, and every piece is seen often
# enough to learn), a 256-token context and a small model make hundreds of steps in the same minutes.

# data: the built-in starter corpus (data.py's default sources), in its own data_dir: its tokenizer differs
data_dir = 'data/starter_4k'
vocab_size = 4096

# model
n_layer = 4
n_head = 4                  # head_dim 64
n_kv_head = 4
n_embd = 256
ffn_hidden = 1024
block_size = 256            # chats and verses are short; attention over 1024 would cost steps, not loss
dropout = 0.0
tie_embeddings = True

# training: 16 x 256 tokens a step, bf16 autocast where the CPU has it (dtype auto), no compile (auto: it
# costs 1-3 minutes of the budget on a CPU and gave no faster steps)
batch_size = 16
learning_rate = 2e-3
min_lr = 1e-4
warmup_iters = 20
lr_schedule = 'cosine'
weight_decay = 0.1
grad_clip = 1.0
compile = 'auto'
dtype = 'auto'
eval_interval = 100
eval_iters = 10             # 10 x 16 x 256 = 41k val tokens an eval
ckpt_interval = 100
out_dir = 'out/cpu'
