"""
The whole lab, timed as a new user meets it: a fresh clone (no data, no download cache, no runs), then
`python lumi.py run CONFIG` twice. The first run does everything, downloads included; the second must skip
every stage. Prints each stage's wall time (from the stamps the pipeline writes), both totals, and the
second run's time as a fraction of the first, and the CPU time the first run's processes used (on a shared
machine, wall time includes waiting for the neighbours).

    python benchmarks/bench_pipeline.py                          # configs/pipeline_cpu.py, ~20 minutes
                                                                   on 2 cores
    python benchmarks/bench_pipeline.py --config=configs/pipeline_cpu.py --keep=/tmp/lumi_clone

The clone is of the committed HEAD, so uncommitted edits are not measured. It reuses this interpreter (the
venv is not rebuilt: installing torch is not part of the pipeline). Run it on an otherwise idle machine.

Deliberately left out: the quality of the result (the summary the run prints has it) and GPU profiles.
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import lumi  # noqa: E402
import pipeline  # noqa: E402


def run_once(clone, config, log_path):
    """Wall seconds and CPU seconds (user + system of every process it started) of one `lumi.py run`."""
    t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, 'w') as log:
        proc = subprocess.run([sys.executable, 'lumi.py', 'run', config], cwd=clone, stdout=log,
                              stderr=subprocess.STDOUT)
    seconds, c1 = time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"lumi.py run failed (exit {proc.returncode}); see {log_path}")
    return seconds, (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)


def main():
    cfg = lumi.load_config({'config': 'configs/pipeline_cpu.py', 'keep': ''}, sys.argv[1:])
    clone = cfg.keep or tempfile.mkdtemp(prefix='lumi_bench_')
    if not os.path.isdir(os.path.join(clone, '.git')):
        subprocess.run(['git', 'clone', '--quiet', ROOT, clone], check=True)
    head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=clone, capture_output=True,
                          text=True).stdout.strip()
    cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo')
                if line.startswith('model name')), '?')
    print(f"fresh clone {clone} at {head}; {os.cpu_count()} cores ({cpu}); "
          f"torch {__import__('torch').__version__}")
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    first, first_cpu = run_once(clone, cfg.config, os.path.join(clone, 'run1.log'))
    second, _ = run_once(clone, cfg.config, os.path.join(clone, 'run2.log'))
    os.chdir(clone)  # the config's paths are relative to the clone
    pipe = pipeline.Pipeline([cfg.config])
    print(f"\n{'stage':<14} {'seconds':>8}")
    for stage in pipeline.PIPELINE_STAGES:
        path = os.path.join(pipe.run_dir, stage, pipeline.STAMP)
        seconds = json.load(open(path)).get('seconds') if os.path.exists(path) else None
        print(f"{stage:<14} {seconds if seconds is not None else '-':>8}")
    print(f"\nfirst run (everything, downloads included): {first:,.1f} s = {first / 60:.1f} min wall, "
          f"{first_cpu / 60:.1f} min of CPU time")
    print(f"second run (every stage skipped):          {second:,.1f} s")
    print(f"second / first: {second / first:.4f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"\nsummary ({os.path.join(clone, pipe.run_dir, 'summary.md')}):\n")
    print(open(os.path.join(pipe.run_dir, 'summary.md')).read())


if __name__ == '__main__':
    main()
