# base: 24 layers x 768, 232,821,504 parameters (207,655,680 without the tied 32768 x 768 embedding).
# 20 tokens per parameter is 4.7B tokens: a multi-GPU run on bins far larger than the starter corpus.
#   torchrun --nproc_per_node=8 train.py configs/base.py --data_dir=data/web

data_dir = 'data/starter'
vocab_size = 32768
out_dir = 'out/base'

n_layer = 24
n_head = 12                 # head_dim 64
n_kv_head = 4               # grouped-query attention: a 3x smaller KV cache when sampling
n_embd = 768
ffn_hidden = 3072
block_size = 1024
dropout = 0.0
tie_embeddings = True

# 16 x 1024 x 32 = 524,288 tokens a step (GPT-3's batch for this size); on 8 GPUs use accumulation 4
batch_size = 16
gradient_accumulation_steps = 32
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 500
lr_schedule = 'wsd'         # warmup-stable-decay: a long run can be extended from a stable-phase checkpoint
decay_frac = 0.2
weight_decay = 0.1
grad_clip = 1.0
compile = 'auto'            # torch.compile on CUDA; on a CPU where it pays (lumi.resolve_compile)
dtype = 'auto'
eval_interval = 500
eval_iters = 100
ckpt_interval = 1000
