# small: 12 layers x 512, 67,121,664 parameters (50,344,448 without the tied 32768 x 512 embedding).
# A one-GPU model: 20 tokens per parameter is 1.34B tokens, about 20 passes over the starter corpus, so point
# data_dir at larger bins (data.py --sources=...) for a compute-optimal run.
#   python train.py configs/small.py
#   torchrun --nproc_per_node=8 train.py configs/small.py --gradient_accumulation_steps=1

data_dir = 'data/starter'
vocab_size = 32768
out_dir = 'out/small'

n_layer = 12
n_head = 8                  # head_dim 64
n_kv_head = 8
n_embd = 512
ffn_hidden = 2048
block_size = 1024
dropout = 0.0
tie_embeddings = True

# 16 x 1024 x 4 = 65,536 tokens a step on one GPU (the global batch; divide accumulation by the GPU count)
batch_size = 16
gradient_accumulation_steps = 4
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 200
lr_schedule = 'cosine'
weight_decay = 0.1
grad_clip = 1.0
compile = 'auto'            # torch.compile on CUDA; on a CPU where it pays (lumi.resolve_compile)
dtype = 'auto'
eval_interval = 250
eval_iters = 50
ckpt_interval = 500
