# SFT of the tiny pretrained model (configs/tiny.py, out/tiny) on the built-in instruction and chat data,
# sized for about ten minutes on a 2-core CPU:
#   python sft.py configs/sft_tiny.py
#   python sft.py configs/sft_tiny.py --init_from=out/tiny --out_dir=out/sft_tiny --max_iters=300
init_from = 'out/tiny'
out_dir = 'out/sft_tiny'
max_minutes = 10.0          # the schedule is fitted to the steps that fit in ten minutes
batch_size = 8
block_size = 512            # of the model's 1024: cuts 3 % of Alpaca examples
                            # and 41 % of the long chitchat chats
lora_r = 16                 # LoRA on q, k, v, o, gate, up, down; 0 for full fine-tuning
lora_alpha = 32.0
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 20
eval_interval = 50
eval_iters = 8
ckpt_interval = 100
format_samples = 50         # held-out prompts sampled at the end: the share ending with <|end|> is printed
format_max_new_tokens = 384  # Alpaca's replies run long: 29 % of them exceed 256 tokens, 11 % exceed 384
format_temperature = 0.7
