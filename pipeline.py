"""
The whole lab in one command: data -> pretrain -> eval -> SFT -> eval -> DPO -> eval -> a sample.
Each stage runs as the subprocess a user would type, so an interrupted run resumes through the stage's
own --resume=auto. A stamp (<stage dir>/.lumi_stage.json) records the hash of what the stage read: its
resolved config, the data's meta.json and its parent checkpoint. Done with the same inputs: skipped.
Started with the same inputs but never finished: run again, which resumes. Other inputs: started afresh.

`python lumi.py run [CONFIG] [--key=value ...]` is the command; this file is what it runs. It imports no other
stage: it reads each stage file's keys from its source (lumi.declared_keys) and runs it as a process.

Deliberately left out: running stages in parallel, and retrying a failed stage (run the command again).
"""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import lumi
from checkpoint import SAMPLE_ARGS, checkpoint_info, checkpoint_of, newest_checkpoint
from corpus import bins
from lumi import (ROOT, LumiError, atomic_write, declared_keys, load_config, log, read_json, read_jsonl,
                  sha256_bytes, sha256_file, split_args, write_json)
from training import unigram_entropy

# -----------------------------------------------------------------------------
# keys: set in the lab's config file (configs/pipeline_cpu.py) or as --key=value; any other key goes to the
# stages that know it
run_dir = ''                # '' -> runs/<config name>; one folder per stage inside
train_config = ''           # what data.py and train.py read; '' -> the config file given to `run`
sft_config = 'configs/sft_tiny.py'  # skipped when it does not exist (sft.py's defaults then)
dpo_config = 'configs/dpo_tiny.py'  # skipped when it does not exist (dpo.py's defaults then)
data_dir = ''               # '' -> the train config's data_dir
pretrain_minutes = 0.0      # [0, inf) > 0: train.py --max_minutes (the LR schedule is fitted to it)
sft_minutes = 0.0           # [0, inf) > 0: sft.py --max_minutes
dpo_minutes = 0.0           # [0, inf) > 0: dpo.py --max_minutes
data_args = []              # --key=value for data.py
pretrain_args = []          # --key=value for train.py
sft_args = []               # --key=value for sft.py
dpo_args = []               # --key=value for dpo.py
eval_args = []              # --key=value for each eval.py
sample_args = []            # --key=value for sample.py
eval_tasks = 'ppl,boolq,piqa,siqa,openbookqa,commonsenseqa'  # after pretraining
tuned_eval_tasks = 'ppl,boolq'  # after SFT and after DPO: did tuning keep what pretraining learned
eval_limit = 0              # [0, inf) > 0: examples per choice task (and ppl windows) in these evals
sample_prompt = 'What should I read to learn about the sea?'  # the last stage's one greedy reply
sample_tokens = 64          # [1, inf) new tokens of that reply
stages = 'data,pretrain,eval_pretrain,sft,eval_sft,dpo,eval_dpo,sample'  # the stages to run, in this order
KEYS = lumi.declared_keys(__file__)

PIPELINE_STAGES = ('data', 'pretrain', 'eval_pretrain', 'sft', 'eval_sft', 'dpo', 'eval_dpo', 'sample')
STAGE_SCRIPT = {'data': 'data', 'pretrain': 'train', 'eval_pretrain': 'eval', 'sft': 'sft',
                'eval_sft': 'eval', 'dpo': 'dpo', 'eval_dpo': 'eval', 'sample': 'sample'}
STAMP = '.lumi_stage.json'


class PipelineError(LumiError, RuntimeError):
    pass


# a config file given to `run` may be a training config (configs/tiny.py) as well as the pipeline's own, so
# the pipeline's keys share a file with every stage's
SHARES_WITH = tuple(f'{s}.py' for s in dict.fromkeys(STAGE_SCRIPT.values())) + ('pipeline.py',)


def stage_keys(script):
    """The keys a stage script resolves its config against, read from its source (lumi.declared_keys)."""
    path = os.path.join(ROOT, f'{script}.py')
    if not os.path.isfile(path):
        raise PipelineError(f"stage {script}.py is missing from {ROOT}: the pipeline needs every stage")
    return declared_keys(path)


def inputs_digest(obj):
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def file_fingerprint(path, known=None):
    """path's sha256, reusing a known fingerprint when size and mtime are unchanged (a rerun stays fast)."""
    st = os.stat(path)
    if (known and known.get('path') == path and known.get('size') == st.st_size
            and known.get('mtime_ns') == st.st_mtime_ns):
        return known
    return dict(path=path, sha256=sha256_file(path), size=st.st_size, mtime_ns=st.st_mtime_ns)


def _flag_key(arg):
    return arg[2:].partition('=')[0].replace('-', '_')


class Pipeline:
    """The stages of one `lumi.py run`, their inputs and products, and the stamps that make reruns cheap."""

    def __init__(self, argv):
        # every script's defaults are read now, so that a missing stage fails before hours of pretraining, and
        # so that every key's type is known: `--key value` takes the next word unless the key is a bool flag
        self.keys = {s: stage_keys(s) for s in dict.fromkeys(STAGE_SCRIPT.values())}
        files, flags = split_args(argv, {**{k: v for d in self.keys.values() for k, v in d.items()}, **KEYS})
        own = [a for a in flags if _flag_key(a) in KEYS]
        self.cfg = cfg = load_config(KEYS, files + own, shares_with=SHARES_WITH)
        self.config_file = files[0] if files else ''
        name = os.path.splitext(os.path.basename(self.config_file))[0] or 'default'
        self.run_dir = cfg.run_dir or os.path.join('runs', name)
        self.stages = [s.strip() for s in cfg.stages.split(',') if s.strip()]
        bad = [s for s in self.stages if s not in PIPELINE_STAGES]
        if bad:
            raise PipelineError(f"unknown stage(s) {bad} in --stages; the stages are "
                                f"{', '.join(PIPELINE_STAGES)}")
        self.routed = {s: [] for s in self.keys}
        for arg in flags:  # an override the pipeline does not know goes to each stage that does
            if arg in own:
                continue
            targets = [s for s in self.keys if _flag_key(arg) in self.keys[s]]
            if not targets:
                raise PipelineError(f"unknown key '{_flag_key(arg)}': neither a pipeline key "
                                    f"({', '.join(sorted(KEYS))}) nor a key of any stage")
            for s in targets:
                self.routed[s].append(arg)
        self.train_config = cfg.train_config or self.config_file
        self.sft_config = self._optional_config(cfg.sft_config, 'sft_config')
        self.dpo_config = self._optional_config(cfg.dpo_config, 'dpo_config')
        base = self._config('train', [self.train_config] if self.train_config else [])
        self.data_dir = cfg.data_dir or base.data_dir
        self.report = {}

    def _optional_config(self, path, key):
        if path and not os.path.isfile(path):
            if path == KEYS[key].default:
                return ''  # the default file is optional: the stage's own defaults then
            raise PipelineError(f"--{key}: config file not found: {path}")
        return path

    def dir(self, stage):
        return os.path.join(self.run_dir, stage)

    def stamp(self, stage):
        path = os.path.join(self.dir(stage), STAMP)
        return read_json(path) if os.path.isfile(path) else None

    def product(self, stage):
        """The fingerprint of a finished stage's output, for the stages after it."""
        stamp = self.stamp(stage)
        if not stamp or not stamp.get('done') or not os.path.exists(stamp['product']['path']):
            raise PipelineError(f"stage {stage} has not finished in {self.run_dir}: include it in --stages")
        return file_fingerprint(stamp['product']['path'], stamp['product'])

    # --- what each stage reads, and the command line that runs it

    def _config(self, script, args):
        # the stage itself refuses a key that no stage knows; here a file's keys for other stages are ignored
        return load_config(self.keys[script], args, shares_with=SHARES_WITH)

    def _resolved(self, script, args):
        cfg = self._config(script, args)  # where a run is watched (log) changes nothing it makes
        return {k: v for k, v in cfg.items() if k not in ('config_file', 'resume', 'log')}

    def _trainer_args(self, stage, config, minutes, extra, forced):
        script = STAGE_SCRIPT[stage]
        args = ([config] if config else []) + ([f'--max_minutes={minutes}'] if minutes > 0 else [])
        return args + list(extra) + self.routed[script] + forced + ['--resume=auto']

    def command(self, stage):
        """(script, argv, inputs): the stage's command line and everything its result depends on."""
        c, D = self.cfg, self.data_dir
        if stage == 'data':
            argv = ([self.train_config] if self.train_config else []) + list(c.data_args) + \
                self.routed['data'] + [f'--data_dir={D}']
            return 'data', argv, {'config': self._resolved('data', argv)}
        data = self.product('data')['sha256']
        if stage == 'pretrain':
            argv = self._trainer_args(stage, self.train_config, c.pretrain_minutes, c.pretrain_args,
                                      [f'--data_dir={D}', f'--out_dir={self.dir(stage)}'])
            return 'train', argv, {'config': self._resolved('train', argv), 'data': data}
        if stage in ('sft', 'dpo'):
            parent = self.product('pretrain' if stage == 'sft' else 'sft')
            config, minutes, extra = ((self.sft_config, c.sft_minutes, c.sft_args) if stage == 'sft'
                                      else (self.dpo_config, c.dpo_minutes, c.dpo_args))
            forced = [f'--init_from={parent["path"]}', f'--out_dir={self.dir(stage)}']
            argv = self._trainer_args(stage, config, minutes, extra, forced)
            return stage, argv, {'config': self._resolved(stage, argv), 'parent': parent['sha256']}
        if stage.startswith('eval_'):
            parent = self.product(stage[len('eval_'):])
            tasks = c.eval_tasks if stage == 'eval_pretrain' else c.tuned_eval_tasks
            argv = [parent['path'], f'--tasks={tasks}', f'--data_dir={D}'] + \
                ([f'--limit={c.eval_limit}'] if c.eval_limit > 0 else []) + list(c.eval_args) + \
                self.routed['eval'] + [f"--out={os.path.join(self.dir(stage), 'report.json')}"]
            return 'eval', argv, {'argv': argv, 'parent': parent['sha256'], 'data': data}
        if stage == 'sample':
            parent = self.product(self.last_model_stage())
            argv = [f'--ckpt={parent["path"]}', f'--prompt={c.sample_prompt}',
                    f'--max_new_tokens={c.sample_tokens}',
                    '--temperature=0'] + list(c.sample_args) + self.routed['sample']
            return 'sample', argv, {'argv': argv, 'parent': parent['sha256']}
        raise PipelineError(f"unknown stage {stage}")

    def last_model_stage(self):
        done = [s for s in ('dpo', 'sft', 'pretrain') if (self.stamp(s) or {}).get('done')]
        if not done:
            raise PipelineError("no model stage has finished: nothing to sample from")
        return done[0]

    def find_product(self, stage):
        d = self.dir(stage)
        if stage == 'data':
            return os.path.join(self.data_dir, 'meta.json') if bins.data_ready(self.data_dir) else None
        if stage in ('pretrain', 'sft', 'dpo'):  # the one rule: merged.pt, else the newest step checkpoint
            try:
                return checkpoint_of(d)
            except FileNotFoundError:
                return None
        name = 'reply.txt' if stage == 'sample' else 'report.json'
        return os.path.join(d, name) if os.path.isfile(os.path.join(d, name)) else None

    # --- running

    def run_stage(self, stage):
        """Skip, resume or (re)start one stage; returns what happened: skipped, ran, resumed or restarted."""
        script, argv, inputs = self.command(stage)
        key = inputs_digest(inputs)
        d, stamp = self.dir(stage), self.stamp(stage)
        product = self.find_product(stage)
        if stamp and stamp['inputs'] == key and stamp.get('done') and product:
            log(f"[{stage}] up to date: skipped ({product})")
            return 'skipped'
        if stamp and stamp['inputs'] == key and not stamp.get('done'):
            status = 'resumed'
            log(f"[{stage}] was interrupted: running it again, it resumes from its newest checkpoint")
        elif stamp:
            status = 'restarted'
            why = ('its output is gone' if stamp['inputs'] == key
                   else 'its inputs changed (config, data or parent)')
            log(f"[{stage}] {why}: starting it afresh")
            if stage != 'data':  # a stage folder holds only what the pipeline made there
                shutil.rmtree(d)
        else:
            status = 'ran'
            if stage != 'data' and os.path.isdir(d) and os.listdir(d):
                raise PipelineError(f"{d} exists but was not made by `lumi.py run`; "
                                    f"move it or pick another --run_dir")
        os.makedirs(d, exist_ok=True)
        write_json(os.path.join(d, STAMP), dict(stage=stage, inputs=key, done=False, argv=argv,
                                                started=time.time()))
        cmd = [sys.executable, os.path.join(ROOT, f'{script}.py')] + argv
        log(f"[{stage}] $ python {script}.py " + ' '.join(_quote(a) for a in argv))
        t0 = time.time()
        if stage == 'sample':  # its stdout is the reply, kept for the summary
            # UTF-8 both ways: a pipe's default on Windows is the code page, which cannot hold most replies
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, encoding='utf-8',
                                  env=dict(os.environ, PYTHONIOENCODING='utf-8'))
            print(proc.stdout, end='', flush=True)
            if proc.returncode == 0:
                atomic_write(os.path.join(d, 'reply.txt'), lambda f: f.write(proc.stdout), mode='w')
        else:
            proc = subprocess.run(cmd)
        if proc.returncode != 0:
            raise PipelineError(f"stage {stage} failed (python {script}.py exited with {proc.returncode}); "
                                f"fix the cause and run the same command again: finished stages are skipped")
        product = self.find_product(stage)
        if not product:
            raise PipelineError(f"stage {stage} exited 0 but left no output in {d}")
        write_json(os.path.join(d, STAMP), dict(stage=stage, inputs=key, done=True, argv=argv,
                                                finished=time.time(), seconds=round(time.time() - t0, 1),
                                                product=file_fingerprint(product)))
        return status

    def run(self):

        def terminated(*_):  # a kill stops the running stage too (subprocess.run kills it on any exception)
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, terminated)
        t0 = time.time()
        log(f"lumi run: {', '.join(self.stages)} -> {self.run_dir} (data {self.data_dir})")
        # the chat settings this run's models want, beside them: `python sample.py` applies them
        write_json(os.path.join(self.run_dir, SAMPLE_ARGS), dict(sample_args=list(self.cfg.sample_args)))
        for stage in self.stages:
            self.report[stage] = self.run_stage(stage)
        summary = self.summary(time.time() - t0)
        print(summary, flush=True)
        atomic_write(os.path.join(self.run_dir, 'summary.md'), lambda f: f.write(summary), mode='w')
        return summary

    # --- the summary table

    def _done(self, stage):
        return bool((self.stamp(stage) or {}).get('done'))

    def _report(self, stage):
        path = os.path.join(self.dir(stage), 'report.json')
        return read_json(path) if self._done(stage) and os.path.isfile(path) else None

    def _metrics(self, stage):
        path = os.path.join(self.dir(stage), 'metrics.jsonl')
        return read_jsonl(path) if self._done(stage) and os.path.isfile(path) else []

    def summary(self, seconds):
        lines = [f"# Lumi run: {self.run_dir}", "",
                 f"config {self.config_file or '(defaults)'}, data {self.data_dir}, "
                 f"{seconds:.1f}s this time", "",
                 "| stage | this run | took |", "|---|---|---|"]
        for s in PIPELINE_STAGES:
            st = self.stamp(s)
            took = f"{st['seconds']:.0f}s" if st and st.get('seconds') is not None else '-'
            lines.append(f"| {s} | {self.report.get(s, 'not selected')} | {took} |")
        lines.append("")
        pre = (self.stamp('pretrain') or {}).get('product')
        if pre and os.path.isfile(pre['path']):
            info = checkpoint_info(pre['path'])
            lines += [f"- parameters: {info['params']:,} "
                      f"({info['params_no_embeddings']:,} without embeddings)",
                      f"- tokens seen in pretraining: {info.get('tokens_seen', 0):,} "
                      f"in {info.get('step', 0):,} steps"]
        warnings = []  # every stage that ended worse than its baseline, said plainly at the end
        evals = [(s, self._report(s)) for s in ('eval_pretrain', 'eval_sft', 'eval_dpo')]
        evals = [(s[len('eval_'):], r) for s, r in evals if r]
        if evals:
            limit = self.cfg.eval_limit
            lines += ["", "Evaluation" + (f" (at most {limit} examples per set here; "
                                           f"`python eval.py` runs whole sets)"
                                           if limit else " (whole sets)") + ":", "",
                      "| task | metric | " + " | ".join(name for name, _ in evals) + " | baseline |",
                      "|---|---|" + "---|" * len(evals) + "---|"]
            order = (self.cfg.eval_tasks + ',' + self.cfg.tuned_eval_tasks).split(',')
            tasks = sorted({t for _, r in evals for t in r if t != 'meta' and isinstance(r[t], dict)},
                           key=lambda t: (order.index(t) if t in order else len(order), t))
            for t in tasks:
                if t == 'ppl':
                    source = next(r[t].get('source', '') for _, r in evals if t in r)
                    entropy, base = None, ''
                    # the loss of a context-blind model
                    if source.endswith('.bin') and os.path.isfile(source):
                        entropy = unigram_entropy(source, 1 << 16)
                        base = f"{entropy:.4f} (unigram entropy of val.bin)"
                    for k, name, b in (('loss', 'val loss', base), ('bpb', 'bits per byte', '')):
                        vals = []
                        for stage, r in evals:
                            v = r.get(t, {}).get(k)
                            bad = k == 'loss' and v is not None and entropy is not None and v >= entropy
                            if bad:
                                warnings.append(f"after {stage} the val loss {v:.4f} is at or above the "
                                                f"unigram entropy {entropy:.4f}: the model predicts no "
                                                f"better than word frequencies")
                            vals.append('-' if v is None
                                        else f"{v:.4f}" + (' ⚠ worse than unigram' if bad else ''))
                        lines.append(f"| ppl | {name} | " + " | ".join(vals) + f" | {b} |")
                elif any('accuracy' in r.get(t, {}) for _, r in evals):
                    first = next(r[t] for _, r in evals if t in r)
                    rand = first.get('random_baseline', float('nan'))
                    vals = []
                    for stage, r in evals:
                        if t not in r:
                            vals.append('-')
                            continue
                        acc = r[t]['accuracy']
                        bad = acc <= rand
                        if bad:
                            warnings.append(f"after {stage} {t} accuracy {acc:.3f} is at or below random "
                                            f"({rand:.3f})")
                        vals.append(f"{acc:.3f} ± {r[t].get('stderr', 0):.3f}"
                                    + (' ⚠ at or below random' if bad else ''))
                    base = f"{first.get('baseline', float('nan')):.3f} majority, {rand:.3f} random"
                    lines.append(f"| {t} (n={first.get('n', '?')}) | accuracy | " + " | ".join(vals)
                                 + f" | {base} |")
        def trained(records):
            last = next((r for r in reversed(records) if 'loss' in r), None)
            return f" ({last['step']:,} steps, {last.get('tokens', 0):,} tokens)" if last else ''
        sft = self._metrics('sft')
        held = [r for r in sft if 'val_loss' in r]
        if held:
            lines.append(f"\n- SFT held-out assistant loss: {held[0]['val_loss']:.4f} at step "
                         f"{held[0]['step']} -> {held[-1]['val_loss']:.4f} at step {held[-1]['step']}"
                         + trained(sft))
            if len(held) > 1 and held[-1]['val_loss'] >= held[0]['val_loss']:
                warnings.append("SFT did not lower the held-out assistant loss")
        fmt = next((r for r in reversed(sft) if 'format_end_rate' in r), None)
        if fmt:
            lines.append(f"- SFT replies to held-out prompts ending with <|end|>: "
                         f"{fmt['format_end_rate']:.1%} of {fmt['format_prompts']} sampled"
                         + (f"; greedy replies: distinct-bigram ratio {fmt['greedy_distinct2']:.3f}, "
                            f"{fmt['greedy_loops']} of {fmt['greedy_prompts']} one token repeated"
                            if 'greedy_distinct2' in fmt else ''))
        dpo = self._metrics('dpo')
        held = [r for r in dpo if 'val_reward_accuracy' in r]
        if held:
            first, last = held[0], held[-1]
            lines.append(f"- DPO held-out preference accuracy: {first['val_reward_accuracy']:.3f} at step "
                         f"{first['step']} -> {last['val_reward_accuracy']:.3f} at step {last['step']}, "
                         f"reward margin {last.get('val_reward_margin', float('nan')):.3f}" + trained(dpo))
            if last['val_reward_accuracy'] <= 0.5:
                warnings.append(f"DPO held-out preference accuracy {last['val_reward_accuracy']:.3f} "
                                f"is at or below chance (0.5)")
        reply_path = os.path.join(self.dir('sample'), 'reply.txt')
        if os.path.isfile(reply_path):
            with open(reply_path, encoding='utf-8') as f:
                reply = f.read().strip()
            lines += ["", f"Sample ({self.cfg.sample_prompt!r}, greedy):", "",
                      "> " + reply.replace('\n', '\n> ')]
            if not looks_like_words(reply):
                warnings.append("the greedy sample is not words (mostly punctuation, or one token repeated)")
        if warnings:
            lines += ["", "Worse than its baseline (read before trusting the numbers above):", ""]
            lines += [f"- ⚠ {w}" for w in warnings]
        try:
            final = self.product(self.last_model_stage())['path']
            # the reply's settings
            chat = ' '.join([f'--ckpt={final}'] + [_quote(a) for a in self.cfg.sample_args])
            lines += ["", "Chat with the result:", "", f"    python sample.py {chat}"]
            roots = [self.keys['sample'][k].default for k in ('out_root', 'runs_root')]
            if os.path.abspath(newest_checkpoint(*roots)) == os.path.abspath(final):
                lines += ["", f"or, while it is the newest model under {' and '.join(r + '/' for r in roots)}"
                              f", with the settings in {os.path.join(self.run_dir, SAMPLE_ARGS)}:", "",
                          "    python sample.py"]
        except (PipelineError, FileNotFoundError):
            pass
        return '\n'.join(lines) + '\n'


def looks_like_words(text):
    """Is a reply words? At least half of its characters are letters or spaces, it has three words of two or
    more letters, and no single word makes up more than half of them (a loop of one token)."""
    words = [w for w in ''.join(c if c.isalpha() else ' ' for c in text.lower()).split() if len(w) > 1]
    letters = sum(c.isalpha() or c.isspace() for c in text)
    if len(words) < 3 or letters < 0.5 * len(text):
        return False
    return max(words.count(w) for w in set(words)) <= len(words) / 2


def _quote(arg):
    return shlex.quote(arg)


def run_pipeline(argv):
    """`lumi.py run [CONFIG] [--key=value ...]`: every stage in order; returns the summary text."""
    return Pipeline(argv).run()


USAGE = 'usage: python lumi.py run [CONFIG] [--key=value ...]   (python pipeline.py ... is the same)'

if __name__ == '__main__':
    lumi.cli(run_pipeline, KEYS, USAGE, interrupted="interrupted: run the same command again to resume")
