"""
Where Lumi runs: the device and dtype rules for CUDA (with and without bf16 units), Apple GPUs (MPS) and the
CPU, decided in lumi.py and tested here with availability patched (this machine has neither a GPU nor a Mac);
the Triton kernels taken only on the GPUs they support; what a Windows user runs (lumi.py's dispatch, text
files in UTF-8); requirements.txt's environment markers and the wheels behind them (slow: it asks PyPI); and
no Lumi name shadowing an installed distribution (transformers 5.25 imports one called `kernels`).
"""
import ast
import glob
import importlib.metadata
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist

import lumi
import model
import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine(monkeypatch, cuda=False, bf16_units=False, mps=False, macos=15):
    """Patch what torch says of this machine: a CUDA GPU (with or without bf16 units), an Apple GPU on a
    given macOS."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: cuda)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: int(cuda))
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported',
                        lambda including_emulation=True: cuda and (bf16_units or including_emulation))
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: mps)
    monkeypatch.setattr(torch.backends.mps, 'is_macos_or_newer', lambda major, minor=0: macos >= major)
    monkeypatch.setattr(lumi, 'native_bf16', lambda: False)  # an AVX2 CPU, as this one


# -----------------------------------------------------------------------------
# device and dtype

@pytest.mark.parametrize('cuda, mps, device', [(True, True, 'cuda'), (False, True, 'mps'),
                                               (False, False, 'cpu')])
def test_device_auto_is_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, device):
    machine(monkeypatch, cuda=cuda, mps=mps)
    assert lumi.pick_device('auto') == device
    assert lumi.pick_device('cpu') == 'cpu'


@pytest.mark.parametrize('name, message', [
    ('mps', '--device=mps: no Apple GPU here'),
    ('cuda', '--device=cuda: no such CUDA GPU here'),
    ('cuda:1', '--device=cuda:1: no such CUDA GPU here'),
    ('tpu', '--device=tpu: not a device; use auto, cpu, cuda, cuda:N or mps'),
])
def test_a_device_that_is_not_here_is_refused_in_one_line(monkeypatch, name, message):
    machine(monkeypatch)
    with pytest.raises(lumi.LumiError, match=message.replace('(', r'\(')) as e:
        lumi.pick_device(name)
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('place, auto', [
    (dict(cuda=True, bf16_units=True), 'bfloat16'),   # compute capability 8.0+: A100, H100, RTX 30/40
    (dict(cuda=True, bf16_units=False), 'float16'),   # T4, V100, RTX 20: fp16 with loss scaling
    (dict(mps=True), 'float32'),                      # neither autocast nor GradScaler documented for MPS
    (dict(), 'float32'),                              # a CPU without AVX512-BF16 or AMX
])
def test_dtype_auto_per_device(monkeypatch, place, auto):
    machine(monkeypatch, **place)
    device = lumi.pick_device('auto')
    assert lumi.resolve_dtype('auto', device) == auto
    assert lumi.resolve_dtype('float32', device) == 'float32'
    assert lumi.resolve_dtype('float16', device) == 'float16'  # runs everywhere (trains on cuda and cpu)
    scaler = lumi.loss_scaler(device, auto)
    assert scaler.is_enabled() == (auto == 'float16')


def test_dtype_auto_on_a_cpu_with_bf16_units(monkeypatch):
    machine(monkeypatch)
    monkeypatch.setattr(lumi, 'native_bf16', lambda: True)
    assert lumi.resolve_dtype('auto', 'cpu') == 'bfloat16'
    assert lumi.resolve_dtype('auto', 'mps') == 'float32'  # the CPU's units say nothing of the GPU's


@pytest.mark.parametrize('place, device, dtype, message', [
    (dict(mps=True, macos=13), 'mps', 'bfloat16', 'Apple GPUs compute bf16 from macOS 14 on'),
    (dict(cuda=True), 'cuda', 'float8', 'not a dtype; use auto, bfloat16, float16 or float32'),
])
def test_a_dtype_the_device_cannot_compute_is_refused_in_one_line(monkeypatch, place, device, dtype, message):
    machine(monkeypatch, **place)
    with pytest.raises(lumi.LumiError, match=message):
        lumi.resolve_dtype(dtype, device)


def test_bf16_on_mps_from_macos_14_and_on_a_gpu_that_emulates_it(monkeypatch):
    machine(monkeypatch, mps=True, macos=14)
    assert lumi.resolve_dtype('bfloat16', 'mps') == 'bfloat16'
    machine(monkeypatch, cuda=True, bf16_units=False)  # torch emulates it: slow, but the user asked
    assert lumi.resolve_dtype('bfloat16', 'cuda') == 'bfloat16'


def test_float16_training_where_torch_has_no_loss_scaling_is_one_line_exit_1(monkeypatch, capsys, tmp_path,
                                                                            tiny_config):
    machine(monkeypatch, mps=True)
    cfg = lumi.load_config(lumi.declared_keys('training.py'),
                           ['--device=mps', '--dtype=float16', f'--out_dir={tmp_path}'])
    with pytest.raises(SystemExit) as e:  # the training loop refuses before it touches the device
        lumi.guard(lambda argv: training.Trainer(cfg, model.GPT(tiny_config), None, None), [])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1
    assert err[0].startswith('error: --dtype=float16 cannot train on mps')


def test_the_other_rules_per_device(monkeypatch):
    machine(monkeypatch)
    assert all(lumi.fused_adamw(d) for d in ('cuda:0', 'cpu', 'mps'))
    monkeypatch.setattr(lumi.importlib.util, 'find_spec', lambda name: object() if name == 'triton' else None)
    assert lumi.resolve_compile('auto', 'cuda:0') and not lumi.resolve_compile('auto', 'mps')
    monkeypatch.setattr(lumi.importlib.util, 'find_spec', lambda name: None)  # Windows: no triton wheels
    assert not lumi.resolve_compile('auto', 'cuda:0') and lumi.resolve_compile(True, 'mps')


def test_distributed_backend_per_device(monkeypatch):
    machine(monkeypatch, cuda=True, mps=True)
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(lumi.LumiError, match='torch.distributed has no backend for Apple GPUs'):
        lumi.setup_distributed('mps')
    chosen = []
    monkeypatch.setattr(dist, 'is_initialized', lambda: False)
    monkeypatch.setattr(dist, 'init_process_group', lambda backend: chosen.append(backend))
    monkeypatch.setattr(torch.cuda, 'set_device', lambda device: None)
    for nccl in (True, False):  # Windows' torch has no NCCL
        monkeypatch.setattr(dist, 'is_nccl_available', lambda: nccl)
        assert lumi.setup_distributed('cuda')[0] == 'cuda:0'
    lumi.setup_distributed('cpu')
    assert chosen == ['nccl', 'gloo', 'gloo']


# -----------------------------------------------------------------------------
# the kernels' dispatch

@pytest.mark.parametrize('capability, hip, taken', [((9, 0), None, True), ((8, 0), None, True),
                                                    ((7, 5), None, False), ((9, 4), '6.2', False)])
def test_kernels_only_on_the_gpus_triton_supports(monkeypatch, capability, hip, taken):
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    monkeypatch.setattr(torch.version, 'hip', hip)
    gpu_tensor = types.SimpleNamespace(is_cuda=True, device='cuda:0')
    assert model.kernels_fit(gpu_tensor) is taken
    assert not model.kernels_fit(torch.zeros(1))  # a CPU tensor
    monkeypatch.setattr(model, 'USE_KERNELS', False)
    assert not model.kernels_fit(gpu_tensor)


# -----------------------------------------------------------------------------
# Windows: lumi.py's dispatch, UTF-8 text files

def test_lumi_py_waits_for_the_stage_on_windows(monkeypatch):
    calls = []
    monkeypatch.setattr(lumi.subprocess, 'call', lambda argv: calls.append(argv) or 3)
    monkeypatch.setattr(lumi.os, 'execv', lambda *a: pytest.fail('exec on Windows loses the exit status'))
    monkeypatch.setattr(lumi.os, 'name', 'nt')
    with pytest.raises(SystemExit) as e:
        lumi.main(['info', 'x.pt'])
    monkeypatch.undo()
    assert e.value.code == 3 and calls == [[sys.executable, os.path.join(ROOT, 'checkpoint.py'), 'x.pt']]


def text_opens_without_encoding(path):
    """(line, call) for each open() in text mode that names no encoding: Python 3.11 on Windows would use the
    locale's code page (cp1252), which cannot hold most of what a corpus or a reply may say."""
    found = []
    for n in ast.walk(ast.parse(open(path, encoding='utf-8').read(), path)):
        if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == 'open'):
            continue
        mode = n.args[1] if len(n.args) > 1 else next((k.value for k in n.keywords if k.arg == 'mode'), None)
        modes = [c.value for c in ast.walk(mode) if isinstance(c, ast.Constant)] if mode else []
        binary = modes and all(isinstance(m, str) and 'b' in m for m in modes)
        if not binary and not any(k.arg == 'encoding' for k in n.keywords):
            found.append((n.lineno, ast.unparse(n)))
    return found


def test_every_text_file_lumi_opens_is_utf8(tmp_path):
    files = glob.glob(os.path.join(ROOT, '*.py')) + glob.glob(os.path.join(ROOT, 'corpus', '*.py'))
    wrong = {os.path.relpath(p, ROOT): found for p in files if (found := text_opens_without_encoding(p))}
    assert not wrong, wrong
    (tmp_path / 'a.py').write_text("open(p)\nopen(p, 'rb')\nopen(p, 'w', encoding='utf-8')\n"
                                   "open(p, 'ab' if x else 'wb')\nopen(p, mode)\n")
    assert [line for line, _ in text_opens_without_encoding(str(tmp_path / 'a.py'))] == [1, 5]


# -----------------------------------------------------------------------------
# no Lumi name shadows an installed distribution

def test_no_lumi_module_shadows_an_installed_distribution():
    importable = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, '*.py'))}
    importable |= {os.path.basename(os.path.dirname(p))
                   for p in glob.glob(os.path.join(ROOT, '*', '__init__.py'))}
    assert not os.path.exists(os.path.join(ROOT, 'kernels', '__init__.py'))  # model.kernel_module says why
    taken = importlib.metadata.packages_distributions()
    shadowed = {name: taken[name] for name in importable if name in taken}
    assert not shadowed, shadowed


def test_from_the_repository_root_kernels_is_the_distribution_when_installed():
    code = ("import sys, importlib.util, model, training, export\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(spec.origin if spec else 'none')\n")
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-2000:]
    origin = proc.stdout.strip()
    try:
        importlib.metadata.distribution('kernels')
        # the distribution's package (CI's venv is inside the repository, so ask for Lumi's folder by name)
        assert (origin.endswith(os.path.join('kernels', '__init__.py'))
                and not origin.startswith(os.path.join(ROOT, 'kernels') + os.sep))
    except importlib.metadata.PackageNotFoundError:  # only Lumi's folder, as a namespace with no code in it
        assert origin in ('none', 'None')


# -----------------------------------------------------------------------------
# requirements.txt: triton only where it has wheels, and a wheel for every requirement everywhere

PLATFORMS = {  # pip's --platform tag: the environment markers of a Python there
    'macosx_14_0_arm64': dict(sys_platform='darwin', platform_system='Darwin', platform_machine='arm64'),
    'win_amd64': dict(sys_platform='win32', platform_system='Windows', platform_machine='AMD64'),
    'manylinux_2_28_x86_64': dict(sys_platform='linux', platform_system='Linux', platform_machine='x86_64'),
    'manylinux_2_28_aarch64': dict(sys_platform='linux', platform_system='Linux', platform_machine='aarch64'),
}


def requirements_on(tag):
    """requirements.txt's requirements whose markers hold on the platform of pip's tag, as pip strings."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    env = dict(default_environment(), **PLATFORMS[tag], os_name='nt' if tag.startswith('win') else 'posix')
    with open(os.path.join(ROOT, 'requirements.txt'), encoding='utf-8') as f:
        reqs = [Requirement(ln) for ln in (line.split('#')[0].strip() for line in f) if ln]
    return [f"{r.name}{r.specifier}" for r in reqs if r.marker is None or r.marker.evaluate(env)]


def test_triton_is_required_only_where_it_has_wheels():
    names = {tag: {r.split('=')[0] for r in requirements_on(tag)} for tag in PLATFORMS}
    for tag, found in names.items():
        assert {'torch', 'numpy', 'sentencepiece', 'tqdm', 'pytest'} <= found, tag
        assert ('triton' in found) == tag.startswith('manylinux'), tag


@pytest.mark.slow
@pytest.mark.parametrize('tag', sorted(PLATFORMS))
def test_every_requirement_has_a_wheel_there(tag, tmp_path):
    """pip download --only-binary of the requirements that apply on the platform, as a user there would
    install them: one pip run per platform (it fetches that platform's torch wheel, 100-250 MB)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    reqs = requirements_on(tag)
    proc = subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:',
                           '--platform', tag, '--python-version', version, '-d', str(tmp_path), *reqs],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{tag}: no wheel for one of {reqs}: {proc.stderr[-1000:]}"
    wheels = {n.split('-')[0].lower() for n in os.listdir(tmp_path) if n.endswith('.whl')}
    assert wheels == {r.split('=')[0].lower() for r in reqs}, wheels
