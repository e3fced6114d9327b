# DPO of the tiny SFT model (configs/sft_tiny.py, out/sft_tiny) on the offline preference data: the 300
# llamafactory demo pairs plus ~1,000 pairs built from the Alpaca demo (its own reply chosen, another
# prompt's reply rejected): 4 epochs = 580 steps, 6 minutes on a 2-core CPU for a 3M-parameter SFT model
# (docs/BENCHMARKS.md), cut to fit in 15 minutes for a larger one:
#   python dpo.py configs/dpo_tiny.py
#   python dpo.py configs/dpo_tiny.py --init_from=out/sft_tiny/merged.pt --out_dir=out/dpo_tiny
#       --max_iters=150
init_from = 'out/sft_tiny'  # an SFT out_dir means its merged.pt
out_dir = 'out/dpo_tiny'
data = 'pypi-sdist:llamafactory==0.9.5:data/dpo_en_demo.json'
sft_data = ['pypi-sdist:llamafactory==0.9.5:data/alpaca_en_demo.json']
val_frac = 0.1              # ~30 demo pairs and ~100 Alpaca-built pairs held out
max_length = 128            # replies run to ~350 tokens; a preference shows in a reply's opening, and a
max_prompt_length = 48      # 2-core CPU trains 16 rows of 128 tokens in a few seconds
                            # (the prompt keeps its end)
loss_type = 'sigmoid'
beta = 0.1
lora_r = 16                 # LoRA on q, k, v, o, gate, up, down; the reference is the model with them off
lora_alpha = 32.0
epochs = 4.0                # measured on the small chain: held-out accuracy levels off after ~4 epochs and
                            # the held-out loss rises past ~5 as the margins on training pairs keep growing
max_minutes = 15.0          # a cap: the schedule is fitted to the steps that fit in it, if fewer
batch_size = 8              # pairs: 16 rows a step
learning_rate = 1e-3        # as sft_tiny: the tiny model's adapters move slowly at real-model rates
min_lr = 1e-4
warmup_iters = 10
eval_interval = 40
eval_iters = 0              # every held-out pair (~130), every evaluation
ckpt_interval = 100
