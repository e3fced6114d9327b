# tiny: the smallest of tiny, small and base, 14,683,392 parameters (6,294,784 without the tied 32768 x 256
# embedding). Sized for a 2-core CPU, where ten minutes take the val loss far below the unigram entropy:
#   python train.py configs/tiny.py --max_minutes=10
# Without --max_minutes it trains 20 tokens per parameter (294M tokens: minutes on a GPU, days on a CPU).

# data: the built-in starter corpus (data.py's default sources); data.py builds it here on first use
data_dir = 'data/starter'
vocab_size = 32768
out_dir = 'out/tiny'

# model
n_layer = 6
n_head = 4                  # head_dim 64
n_kv_head = 4
n_embd = 256
ffn_hidden = 1024
block_size = 1024
dropout = 0.0
tie_embeddings = True

# training: 4 x 1024 tokens a step. On a CPU a short run is step-bound, so a small batch and a high peak
# learning rate buy more updates; dtype auto is bf16 autocast on a CPU with AVX512-BF16 (1.85x faster there)
# and fp32 elsewhere; compile auto compiles a CPU run only with native bf16 and --max_minutes >= 3 (elsewhere
# it cost minutes and gave no faster steps: docs/BENCHMARKS.md, "Recipe"; lumi.resolve_compile).
batch_size = 4
gradient_accumulation_steps = 1
learning_rate = 2e-3
min_lr = 1e-4
warmup_iters = 20
lr_schedule = 'cosine'
weight_decay = 0.1
grad_clip = 1.0
compile = 'auto'            # torch.compile on CUDA; on a CPU where it pays (lumi.resolve_compile)
dtype = 'auto'
eval_interval = 100
eval_iters = 5              # 5 x 4 x 1024 = 20k val tokens an eval: evals cost a short run little
ckpt_interval = 100
