"""llama-cpp-python on top of the patched build, without compiling llama.cpp a second time."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from kvpolar.atomic import atomic_write_text

from .pins import LLAMA_CPP_PYTHON_DEPS, VENV_LLAMA_MARKER
from .util import BootstrapError, log, run
from .venv import pip_install


def shared_libs(bin_dir: Path) -> list[Path]:
    return sorted(p for p in bin_dir.iterdir() if re.match(r"lib.*\.so(\.\d+)*$", p.name))


def site_package_dir(py: Path, pkg: str) -> Path | None:
    code = (
        "import importlib.util,sys;s=importlib.util.find_spec(sys.argv[1]);"
        "print(s.submodule_search_locations[0] if s and s.submodule_search_locations else '')"
    )
    out = run([py, "-c", code, pkg], what=f"locate {pkg}", capture=True).stdout.strip()
    return Path(out) if out else None


def install_llama_cpp_python(py: Path, src: Path, build: Path, key: str) -> tuple[Path, bool]:
    """Install llama_cpp from the patched sdist without compiling, then link our libs into it.

    Returns (package dir, whether pip ran).
    """
    venv = py.parent.parent
    marker = venv / VENV_LLAMA_MARKER
    pkg = site_package_dir(py, "llama_cpp")
    ran = False
    if not (pkg and marker.is_file() and marker.read_text().strip() == key):
        t0 = time.time()
        log("installing llama-cpp-python from the patched sdist with -DLLAMA_BUILD=OFF (no compile)")
        pip_install(py, list(LLAMA_CPP_PYTHON_DEPS), what="pip install llama-cpp-python deps")
        env = {**os.environ, "CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"}
        env.pop("FORCE_CMAKE", None)
        pip_install(
            py,
            ["--no-deps", "--force-reinstall", str(src)],
            what="pip install llama-cpp-python (LLAMA_BUILD=OFF)",
            env=env,
        )
        pkg = site_package_dir(py, "llama_cpp")
        if not pkg:
            raise BootstrapError("llama-cpp-python installed but llama_cpp cannot be found in the venv")
        atomic_write_text(marker, key + "\n", mkdir=True)
        log(f"llama-cpp-python installed in {time.time() - t0:.0f}s")
        ran = True
    # Symlink the build's shared libraries into the package's lib/ dir: llama_cpp.py honours
    # LLAMA_CPP_LIB_PATH but _ggml.py and mtmd_cpp.py look in <pkg>/lib first.
    libdir = pkg / "lib"
    libdir.mkdir(exist_ok=True)
    wanted = {p.name: p for p in shared_libs(build / "bin")}
    for old in libdir.iterdir():
        if old.is_symlink() or (old.name not in wanted and re.match(r"lib.*\.so", old.name)):
            if old.name not in wanted or os.readlink(old) != str(wanted[old.name]):
                old.unlink()
    for name, target in wanted.items():
        link = libdir / name
        if not link.is_symlink():
            if link.exists():
                link.unlink()
            os.symlink(target, link)
    return pkg, ran


VERIFY_CODE = r"""
import os, sys
import llama_cpp
info = llama_cpp.llama_print_system_info()
print(info.decode() if isinstance(info, bytes) else info)
import llama_cpp._ggml  # loads libggml from the package lib/ dir
maps = open('/proc/self/maps').read().split('\n') if os.path.exists('/proc/self/maps') else []
libs = sorted({l.split()[-1] for l in maps if ('libllama' in l or 'libggml' in l) and '/' in l})
build = os.path.realpath(sys.argv[1])
bad = [l for l in libs if not os.path.realpath(l).startswith(build + os.sep)]
for l in libs: print('loaded', l)
if bad:
    sys.exit('llama_cpp loaded libraries outside the build: %s' % bad)
"""


def verify_binding(py: Path, build: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "MTMD_CPP_LIB")}
    out = run([py, "-c", VERIFY_CODE, build], env=env, what="import llama_cpp (verify)", capture=True).stdout
    return out.strip()
