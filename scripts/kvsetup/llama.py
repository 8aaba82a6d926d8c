"""The patched llama.cpp: sdist, source tree, build key, cmake build, <repo>/build link."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from kvpolar.atomic import atomic_write_text
from kvpolar.paths import cache_dir

from . import binding, smoke
from .cpu import cpu_cmake_flags
from .patches import BASE_TAG, UPSTREAM_TAG, apply_patches, git, git_init_commit, tag
from .pins import (
    BUILD_INFO,
    BUILD_MARKER,
    BUILD_TARGETS,
    CMAKE_FLAGS,
    CUDA_FLAGS,
    LAYOUT_VERSION,
    LLAMA_CPP_PYTHON_PIN,
    LLAMA_CPP_PYTHON_SDIST,
    LLAMA_CPP_PYTHON_SDIST_ROOT,
    LLAMA_CPP_PYTHON_SDIST_SHA256,
    PATCH_DIRS,
    SRC_MARKER,
    TREE_HEADERS,
    VENDOR,
)
from .util import (
    BootstrapError,
    PatchError,
    compiler,
    file_lock,
    have_verified,
    log,
    repo_root,
    require_tool,
    run,
    run_logged,
    sha256_file,
    verify_sha256,
    write_stamp,
)
from .venv import cmd_venv, pip_download


def patch_files(root: Path) -> list[Path]:
    """Both series: llama.cpp's, then llama-cpp-python's."""
    return llama_patch_files(root) + binding_patch_files(root)


def llama_patch_files(root: Path) -> list[Path]:
    """The llama.cpp patches (compiled: they enter the build key)."""
    return sorted((root / PATCH_DIRS[0]).glob("*.patch"))


def binding_patch_files(root: Path) -> list[Path]:
    """The llama-cpp-python patches (the Python package; not compiled)."""
    return sorted((root / PATCH_DIRS[1]).glob("*.patch"))


def header_files(root: Path) -> list[Path]:
    """The checkout's headers copied into the tree (pins.TREE_HEADERS), in a fixed order."""
    return [p for pattern, _ in TREE_HEADERS for p in sorted(root.glob(pattern))]


def header_destination(root: Path, header: Path) -> str:
    """Where `header` goes in vendor/llama.cpp (relative path)."""
    rel = header.relative_to(root)
    for pattern, dest in TREE_HEADERS:
        if rel.match(pattern):
            return f"{dest}/{header.name}"
    raise BootstrapError(f"{rel} matches no entry of TREE_HEADERS")


def generator() -> str:
    return "Ninja" if shutil.which("ninja") else "Unix Makefiles"


def cuda_requested() -> bool:
    return os.environ.get("KVPOLAR_CUDA", "") not in ("", "0", "false", "no")


def cuda_cmake_flags() -> tuple[str, ...]:
    """The CUDA variant's flags (KVPOLAR_CUDA=1): GGML_CUDA=ON and the architectures."""
    if not cuda_requested():
        return ()
    archs = os.environ.get("KVPOLAR_CUDA_ARCHS", "native")
    if archs == "native" and not shutil.which("nvidia-smi"):
        raise BootstrapError(
            "a CUDA build for the 'native' architecture needs a visible NVIDIA GPU (nvidia-smi not found); "
            "name the architectures instead, e.g. --cuda-archs 90 (H100/H200) or KVPOLAR_CUDA_ARCHS='80;90'"
        )
    if not shutil.which("nvcc") and not os.environ.get("CUDACXX"):
        raise BootstrapError(
            "a CUDA build needs nvcc on PATH (or CUDACXX): install the CUDA toolkit, "
            "or pip install nvidia-cuda-nvcc and put its bin/ on PATH"
        )
    return (*CUDA_FLAGS, f"-DCMAKE_CUDA_ARCHITECTURES={archs}")


def cmake_flags() -> tuple[str, ...]:
    """Fixed flags, the probed CPU flags, CUDA (if asked for), then KVPOLAR_CMAKE_ARGS.

    All of them enter the build key, so a CUDA build and a CPU build live in separate dirs.
    """
    extra = tuple(shlex.split(os.environ.get("KVPOLAR_CMAKE_ARGS", "")))
    return CMAKE_FLAGS + cpu_cmake_flags() + cuda_cmake_flags() + extra


def compute_build_key(root: Path, flags: Iterable[str] | None = None, gen: str | None = None) -> str:
    """Short sha256 over the pin, every llama.cpp patch, every generated header, and the build flags.

    Files enter with their path relative to `root` and their bytes, in a fixed order, so
    renaming, editing, adding or removing any of them changes the key. The llama-cpp-python
    patches do not enter: they change no compiled file (compute_binding_key keys the binding).
    """
    h = hashlib.sha256()
    _hash_put(h, "layout", LAYOUT_VERSION.encode())
    _hash_put(h, "pin", f"{LLAMA_CPP_PYTHON_PIN} {LLAMA_CPP_PYTHON_SDIST_SHA256}".encode())
    for p in llama_patch_files(root):
        _hash_put(h, "patch:" + p.relative_to(root).as_posix(), p.read_bytes())
    for p in header_files(root):
        _hash_put(h, "header:" + p.relative_to(root).as_posix(), p.read_bytes())
    _hash_put(h, "flags", "\n".join(cmake_flags() if flags is None else flags).encode())
    _hash_put(h, "targets", "\n".join(BUILD_TARGETS).encode())
    _hash_put(h, "generator", (gen or generator()).encode())
    return h.hexdigest()[:16]


def compute_binding_key(root: Path, key: str) -> str:
    """The build key plus the llama-cpp-python patches: what the installed binding and its smoke run
    are keyed by."""
    h = hashlib.sha256(f"build\0{key}\0".encode())
    for p in binding_patch_files(root):
        _hash_put(h, "patch:" + p.relative_to(root).as_posix(), p.read_bytes())
    return h.hexdigest()[:16]


def _hash_put(h, tag: str, data: bytes) -> None:
    """One tagged, length-prefixed item of a key's hash."""
    h.update(f"{tag}\0{len(data)}\0".encode())
    h.update(data)


def sync_binding_patches(root: Path, src: Path) -> bool:
    """Bring the tree's llama-cpp-python patches to the checkout's, without touching vendor/llama.cpp.

    The tree's marker records the patches it holds; when those of patches/llama-cpp-python differ (a
    patch edited, added or removed), the Python package goes back to the tag kvpolar-base and the
    checkout's patches are applied again (git am), and the marker is rewritten. Returns whether it ran.
    A patch that does not apply raises PatchError; the marker keeps the old list, so the next run
    resets and tries again.
    """
    marker = src / SRC_MARKER
    info = json.loads(marker.read_text())
    lpy = binding_patch_files(root)
    want = {p.relative_to(root).as_posix(): sha256_file(p) for p in lpy}
    prefix = PATCH_DIRS[1] + "/"
    have = {k: v for k, v in info.get("patch_sha256", {}).items() if k.startswith(prefix)}
    if want == have:
        return False
    log(f"the llama-cpp-python patches changed: re-applying {len(lpy)} to {src} (llama.cpp is not rebuilt)")
    git(["reset", "-q", "--hard", BASE_TAG], src, "git reset to kvpolar-base")
    if lpy:
        apply_patches(src, lpy)
    info["patches"] = [p for p in info.get("patches", []) if not p.startswith(prefix)] + list(want)
    info["patch_sha256"] = {
        **{k: v for k, v in info.get("patch_sha256", {}).items() if not k.startswith(prefix)},
        **want,
    }
    atomic_write_text(marker, json.dumps(info, indent=2) + "\n")
    return True


def ensure_sdist() -> Path:
    dest = cache_dir() / "dl" / LLAMA_CPP_PYTHON_SDIST
    if have_verified(dest, LLAMA_CPP_PYTHON_SDIST_SHA256):
        return dest
    with tempfile.TemporaryDirectory(prefix="dl-", dir=cache_dir()) as td:
        log(f"pip download --no-binary :all: {LLAMA_CPP_PYTHON_PIN} (~77 MB)")
        f = pip_download(LLAMA_CPP_PYTHON_PIN, Path(td), sdist=True)
        verify_sha256(f, LLAMA_CPP_PYTHON_SDIST_SHA256, f.name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, dest)
    write_stamp(dest, LLAMA_CPP_PYTHON_SDIST_SHA256)
    return dest


def _extract_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, filter="data")
        else:  # pragma: no cover - Python < 3.10.12 / 3.11.4
            tf.extractall(dest)


def prepare_src(root: Path, key: str, src: Path) -> None:
    """Extract the sdist, make git repos, apply the patches, copy headers; rename onto `src`."""
    sdist = ensure_sdist()
    require_tool("git", "to apply the patches", "Install git (apt-get install git).")
    failed = cache_dir() / f"failed-src-{key}"
    if failed.exists():
        shutil.rmtree(failed)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-src-", dir=src.parent))
    try:
        log(f"extracting {sdist.name}")
        _extract_tar(sdist, tmp)
        tree = tmp / LLAMA_CPP_PYTHON_SDIST_ROOT
        vendor = tree / VENDOR
        # llama.cpp commit, from the submodule metadata shipped in the sdist.
        commit = "unknown"
        head = tree / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
        if head.is_file():
            commit = head.read_text().strip()
        # Stale git metadata: vendor/llama.cpp/.git is a file pointing into the sdist's
        # shallow .git/modules; replace both with fresh repos holding the pristine trees.
        for stale in (vendor / ".git", tree / ".git"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            elif stale.exists() or stale.is_symlink():
                stale.unlink()
        git_init_commit(vendor, f"pristine llama.cpp {commit[:7]} from {LLAMA_CPP_PYTHON_PIN}")
        git_init_commit(tree, f"pristine {LLAMA_CPP_PYTHON_PIN}", exclude=[f"/{VENDOR}/", f"/{SRC_MARKER}"])

        # Generated headers first (tag kvpolar-base), so that `patches export` writes exactly
        # the patch commits; patch 0001 includes ggml-polar-format.h.
        headers = header_files(root)
        dests = [header_destination(root, h) for h in headers]
        for h, rel in zip(headers, dests, strict=True):
            shutil.copy2(h, vendor / rel)
        tag(vendor, UPSTREAM_TAG)
        tag(tree, UPSTREAM_TAG)
        if headers:
            git(["add", "-f", "--", *dests], vendor, "git add headers")
            git(
                ["commit", "-q", "--no-verify", "-m", "kvpolar: generated headers"],
                vendor,
                "git commit headers",
            )
            log(f"copied {len(headers)} header(s) into {VENDOR}: " + ", ".join(dests))
        tag(vendor, BASE_TAG)
        tag(tree, BASE_TAG)

        lcpp = llama_patch_files(root)
        lpy = binding_patch_files(root)
        try:
            if lcpp:
                log(
                    f"applying {len(lcpp)} llama.cpp patch(es) with git am: {', '.join(p.name for p in lcpp)}"
                )
                apply_patches(vendor, lcpp)
            if lpy:
                log(
                    f"applying {len(lpy)} llama-cpp-python patch(es) with git am: "
                    + ", ".join(p.name for p in lpy)
                )
                apply_patches(tree, lpy)
        except PatchError as e:
            os.replace(tree, failed)
            raise PatchError(str(e).replace(str(tree), str(failed))) from None

        info = {
            "key": key,
            "pin": LLAMA_CPP_PYTHON_PIN,
            "sdist_sha256": LLAMA_CPP_PYTHON_SDIST_SHA256,
            "llama_cpp_commit": commit,
            "patches": [p.relative_to(root).as_posix() for p in lcpp + lpy],
            "patch_sha256": {p.relative_to(root).as_posix(): sha256_file(p) for p in lcpp + lpy},
            "headers": [h.relative_to(root).as_posix() for h in headers],
        }
        (tree / SRC_MARKER).write_text(json.dumps(info, indent=2) + "\n")
        if src.exists():
            shutil.rmtree(src)
        os.replace(tree, src)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_build_tools() -> None:
    require_tool(
        "cmake",
        "to configure llama.cpp",
        "Install cmake >= 3.21 (apt-get install cmake, or pip install cmake).",
    )
    if not compiler("c") or not compiler("c++"):
        raise BootstrapError(
            "no C/C++ compiler found (cc/gcc/clang and c++/g++/clang++); needed to build llama.cpp. "
            "Install one: apt-get install build-essential"
        )
    out = run(["cmake", "--version"], what="cmake --version", capture=True).stdout
    m = re.search(r"(\d+)\.(\d+)", out)
    if m and (int(m.group(1)), int(m.group(2))) < (3, 21):
        raise BootstrapError(
            f"cmake {m.group(0)} is too old; llama-cpp-python needs cmake >= 3.21 (pip install cmake)."
        )


def build_complete(build: Path, key: str) -> bool:
    marker = build / BUILD_MARKER
    if not marker.is_file() or marker.read_text().strip() != key:
        return False
    return all((build / "bin" / t).exists() for t in BUILD_TARGETS)


def llama_dir(key: str) -> Path:
    """$CACHE/llama-<key>: holds src/ (patched sdist) and build/ (cmake build).

    src and build are siblings so that the compile commands, rewritten relative to the build
    dir by ccache (CCACHE_BASEDIR=$CACHE), are identical for every key: a new key (a patch
    edit) then recompiles only the translation units whose preprocessed input changed.
    """
    return cache_dir() / f"llama-{key}"


def ccache_setup() -> tuple[list[str], dict]:
    """cmake args + environment for ccache when it is installed (optional accelerator)."""
    env = dict(os.environ)
    if not shutil.which("ccache") or env.get("KVPOLAR_NO_CCACHE"):
        # Explicitly empty: a build dir configured while ccache was present must not keep it.
        return ["-DCMAKE_C_COMPILER_LAUNCHER=", "-DCMAKE_CXX_COMPILER_LAUNCHER=", "-DGGML_CCACHE=OFF"], env
    env.setdefault("CCACHE_DIR", str(cache_dir() / "ccache"))
    env.setdefault("CCACHE_MAXSIZE", "3G")
    env["CCACHE_BASEDIR"] = str(cache_dir())
    env["CCACHE_NOHASHDIR"] = "1"
    return ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"], env


def build_llama(
    src: Path,
    build: Path,
    key: str,
    flags: tuple[str, ...] | None = None,
    targets: tuple[str, ...] = BUILD_TARGETS,
) -> float:
    """Configure + build into `build`; resumes a partial build. Returns seconds spent.

    flags: the cmake flags (default: cmake_flags(), the ones in the build key); targets: what
    to build. Benchmarks build variants (e.g. GGML_NATIVE=ON) of the same sources this way.
    """
    t0 = time.time()
    check_build_tools()
    marker = build / BUILD_MARKER
    if marker.exists():
        marker.unlink()
    build.mkdir(parents=True, exist_ok=True)
    logfile = build / "kvpolar-build.log"
    gen = generator()
    jobs = str(os.cpu_count() or 2)
    launcher, env = ccache_setup()
    cc_note = (
        "with ccache"
        if launcher[0].endswith("=ccache")
        else "without ccache (apt-get install ccache makes rebuilds after a patch edit incremental)"
    )
    log(f"configuring llama.cpp ({gen}, {cc_note}) in {build}; log: {logfile}")
    run_logged(
        [
            "cmake",
            "-S",
            src / VENDOR,
            "-B",
            build,
            "-G",
            gen,
            *(cmake_flags() if flags is None else flags),
            *launcher,
        ],
        cwd=build,
        logfile=logfile,
        what="cmake configure",
        env=env,
    )
    log(f"building {', '.join(targets)} with -j{jobs} (cold: ~9 min on 2 cores)")
    run_logged(
        ["cmake", "--build", build, "--target", *targets, "-j", jobs],
        cwd=build,
        logfile=logfile,
        what="cmake build",
        env=env,
    )
    missing = [t for t in targets if not (build / "bin" / t).exists()]
    if missing:
        raise BootstrapError(f"build finished but {missing} are missing from {build / 'bin'}; see {logfile}")
    secs = time.time() - t0
    atomic_write_text(marker, key + "\n", mkdir=True)
    return secs


def link_build(root: Path, build: Path) -> Path:
    """Point <repo>/build at the cache build dir (atomically)."""
    link = root / "build"
    if link.exists() and not link.is_symlink():
        raise BootstrapError(
            f"{link} exists and is not a symlink; bootstrap manages it as a link to the cached build. "
            f"Move it away (e.g. mv {link} {link}.old) and rerun."
        )
    if link.is_symlink() and os.readlink(link) == str(build):
        return link
    tmp = root / f".build.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(build, tmp)
    os.replace(tmp, link)
    return link


def cmd_llama(args: argparse.Namespace) -> dict:
    root = repo_root()
    cache_dir().mkdir(parents=True, exist_ok=True)
    key = compute_build_key(root)
    ldir = llama_dir(key)
    src = ldir / "src"
    build = ldir / "build"
    result: dict = {"key": key, "src": str(src), "build": str(build), "built_s": None}
    with file_lock(f"llama-{key}"):
        ldir.mkdir(parents=True, exist_ok=True)
        (ldir / "last-used").write_text(f"{time.time():.0f} {root}\n")
        if not (src / SRC_MARKER).is_file():
            prepare_src(root, key, src)
        elif not sync_binding_patches(root, src):
            log(f"patched source ok: {src}")
        if getattr(args, "source_only", False):
            log(f"source only: {src} (build key {key}); a machine without network builds it from there")
            return result
        if build_complete(build, key):
            log(f"llama.cpp build ok: {build}")
        else:
            secs = build_llama(src, build, key)
            result["built_s"] = secs
            log(f"llama.cpp built in {secs / 60:.1f} min")
        src_info = json.loads((src / SRC_MARKER).read_text())
        info = {
            **src_info,
            "src": str(src),
            "build": str(build),
            "cmake_flags": list(cmake_flags()),
            "generator": generator(),
            "targets": list(BUILD_TARGETS),
        }
        info_path = build / BUILD_INFO
        if not info_path.is_file() or json.loads(info_path.read_text()) != info:
            atomic_write_text(info_path, json.dumps(info, indent=2) + "\n", mkdir=True)
        link = link_build(root, build)
        log(f"{link} -> {build}")
        if getattr(args, "no_python", False):
            if not getattr(args, "no_smoke", False):
                smoke.run_smoke(build, key, None, force=getattr(args, "smoke", False))
            return result
        py = cmd_venv()
        bkey = compute_binding_key(root, key)
        result["binding_key"] = bkey
        pkg, ran = binding.install_llama_cpp_python(py, src, build, bkey)
        if ran or getattr(args, "verify", False):
            out = binding.verify_binding(py, build)
            log("llama_cpp loads the patched build:\n    " + "\n    ".join(out.splitlines()))
        result["llama_cpp"] = str(pkg)
        if not getattr(args, "no_smoke", False):
            smoke.run_smoke(build, bkey, py, force=getattr(args, "smoke", False))
    return result
