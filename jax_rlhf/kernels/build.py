"""Compile the bf16 GEMM FFI handler on first use, into a cache keyed by its source and the jaxlib version.

As torch's `cpp_extension`: `load()` hashes `bf16_gemm.cc`, the jaxlib version, the MKL it links and the
compiler command; if `<cache>/<hash>/bf16_gemm.so` is missing it runs the machine's C++ compiler (`$CXX`,
else `g++`) against `jax.ffi.include_dir()` and the `mkl` / `mkl-include` wheels, under a file lock (so that
concurrent processes build it once), and renames the result into place. The cache is
`$JAX_RLHF_KERNEL_CACHE`, else `$XDG_CACHE_HOME/jax_rlhf/kernels`, else `~/.cache/jax_rlhf/kernels`.

Every failure (no MKL wheel, no compiler, a compile error) raises `KernelUnavailable` with one line saying
why; the caller (`jax_rlhf.kernels.gemm`) then falls back to XLA's dot.
"""
from __future__ import annotations

import ctypes
import fcntl
import glob
import hashlib
import importlib.metadata
import os
import shlex
import shutil
import subprocess
import sys

import jax
import jaxlib

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bf16_gemm.cc')
SYMBOL = 'JaxRlhfBf16Gemm'


class KernelUnavailable(RuntimeError):
  """The GEMM handler cannot be built or loaded here (the message says why, in one line)."""


def cache_dir() -> str:
  if os.environ.get('JAX_RLHF_KERNEL_CACHE'):
    return os.environ['JAX_RLHF_KERNEL_CACHE']
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'jax_rlhf', 'kernels')


def _dist_file(dist: str, pattern: str) -> str | None:
  """The first file of the installed distribution `dist` whose name matches the glob `pattern`."""
  try:
    files = importlib.metadata.files(dist) or []
  except importlib.metadata.PackageNotFoundError:
    return None
  import fnmatch
  for f in files:
    if fnmatch.fnmatch(os.path.basename(str(f)), pattern):
      path = os.path.abspath(str(f.locate()))
      if os.path.exists(path):
        return path
  return None


def find_mkl() -> tuple[str, str]:
  """(the directory holding libmkl_rt.so*, the directory holding mkl.h), from the pip wheels or sys.prefix."""
  lib = _dist_file('mkl', 'libmkl_rt.so*')
  header = _dist_file('mkl-include', 'mkl.h')
  if lib is None:
    found = sorted(glob.glob(os.path.join(sys.prefix, 'lib', 'libmkl_rt.so*')))
    lib = found[0] if found else None
  if header is None and os.path.exists(os.path.join(sys.prefix, 'include', 'mkl.h')):
    header = os.path.join(sys.prefix, 'include', 'mkl.h')
  if lib is None:
    raise KernelUnavailable('MKL not found (pip install mkl mkl-include, or `pip install -e .[test]`)')
  if header is None:
    raise KernelUnavailable('mkl.h not found (pip install mkl-include)')
  return lib, os.path.dirname(header)


def _command(src: str, out: str, lib: str, include: str) -> list[str]:
  cxx = shlex.split(os.environ.get('CXX', 'g++'))
  libdir = os.path.dirname(lib)
  return [*cxx, '-O2', '-std=c++17', '-shared', '-fPIC', f'-I{jax.ffi.include_dir()}',
          f'-I{include}', src, '-o', out, f'-L{libdir}', f'-l:{os.path.basename(lib)}', f'-Wl,-rpath,{libdir}']


def build() -> str:
  """Path of the compiled handler library, building it if the cache lacks it."""
  lib, include = find_mkl()
  with open(SOURCE, 'rb') as f:
    source = f.read()
  probe = _command('SRC', 'OUT', lib, include)
  key = hashlib.sha256(b'\0'.join([source, jaxlib.__version__.encode(), jax.__version__.encode(),
                                   os.path.realpath(lib).encode(), ' '.join(probe).encode()])).hexdigest()[:16]
  folder = os.path.join(cache_dir(), key)
  target = os.path.join(folder, 'bf16_gemm.so')
  if os.path.exists(target):
    return target
  if shutil.which(probe[0]) is None:
    raise KernelUnavailable(f'no C++ compiler {probe[0]!r} to build the bf16 GEMM (set $CXX)')
  try:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, '.lock'), 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if os.path.exists(target):  # another process built it while we waited
        return target
      tmp = f'{target}.{os.getpid()}.tmp'
      proc = subprocess.run(_command(SOURCE, tmp, lib, include), capture_output=True, text=True)
      if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ['?'])[-1]
        raise KernelUnavailable(f'compiling {SOURCE} failed: {last}')
      os.replace(tmp, target)
  except OSError as e:  # a read-only or full cache folder: say so, and let the caller fall back
    raise KernelUnavailable(f'cannot build into {folder} ({e}); set $JAX_RLHF_KERNEL_CACHE') from e
  return target


_LOADED: dict[str, object] = {}


def load() -> object:
  """Build if needed, load, and register the FFI target `jax_rlhf_bf16_gemm` for the CPU (once per process)."""
  if 'lib' in _LOADED:
    return _LOADED['lib']
  path = build()
  # MKL's OpenMP threads spin for 200 ms after each GEMM by default, taking the cores from XLA's own threads
  # between the products (a bf16 LM step on 2 cores: 2.6 s -> 1.9 s with 0, both under load). Read by the
  # OpenMP runtime when it starts, i.e. at the first GEMM; a value the user set is kept.
  os.environ.setdefault('KMP_BLOCKTIME', '0')
  try:
    lib = ctypes.cdll.LoadLibrary(path)
    handler = getattr(lib, SYMBOL)
  except (OSError, AttributeError) as e:
    raise KernelUnavailable(f'loading {path} failed: {e}') from e
  jax.ffi.register_ffi_target('jax_rlhf_bf16_gemm', jax.ffi.pycapsule(handler), platform='cpu')
  _LOADED['lib'] = lib
  return lib
