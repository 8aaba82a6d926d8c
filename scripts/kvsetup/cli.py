"""`python3 scripts/bootstrap.py {venv,data,llama,all,env,key,gc,patches}`: the set-up commands."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kvpolar.paths import cache_dir, data_dir

from . import util
from .data import cmd_data, sass_tool
from .llama import cmd_llama, compute_build_key
from .patches import export_series
from .pins import BUILD_INFO, GEMMA3, HAYSTACK, PATCH_DIRS, QWEN, SMOLLM2, SQUAD, VENDOR, VENV_MARKER
from .util import BootstrapError, _try_lock, log, repo_root, sh_quote
from .venv import cmd_venv, venv_dir, venv_python, venv_ready


def cmd_all(args: argparse.Namespace) -> None:
    t0 = time.time()
    py = cmd_venv(args)
    cmd_data(args)
    res = cmd_llama(args)
    dd = data_dir()
    print("kvpolar bootstrap: ready" + f" ({time.time() - t0:.0f}s)")
    print(f"  venv python : {py}")
    print(f"  data        : {dd}")
    for name in (SMOLLM2["out"], SQUAD["out"], QWEN["out"], GEMMA3["out"], HAYSTACK["out"]):
        if (dd / name).is_file():
            print(f"                {name} ({(dd / name).stat().st_size / 1e6:.1f} MB)")
    print(f"  build       : {repo_root() / 'build'} -> {res['build']} (key {res['key']})")
    if res["built_s"] is not None:
        print(f"                compiled in {res['built_s'] / 60:.1f} min")
    print(f"  sources     : {res['src']}")


def cmd_env(args: argparse.Namespace) -> None:
    root = repo_root()
    venv = venv_dir()
    build = root / "build"
    lines = [f"export KVPOLAR_CACHE={sh_quote(str(cache_dir()))}"]
    if venv_ready(venv):
        lines += [
            f"export KVPOLAR_VENV={sh_quote(str(venv))}",
            f"export KVPOLAR_PYTHON={sh_quote(str(venv_python(venv)))}",
        ]
    else:
        lines.append("# venv not created yet: python3 scripts/bootstrap.py venv")
    if (build / "bin").is_dir():
        lines += [
            f"export KVPOLAR_BUILD={sh_quote(str(build))}",
            f"export LLAMA_CPP_LIB_PATH={sh_quote(str(build / 'bin'))}",
            f"export MTMD_CPP_LIB={sh_quote(str(build / 'bin'))}",
        ]
    else:
        lines.append("# patched llama.cpp not built yet: python3 scripts/bootstrap.py llama")
    nvrtc, cuobjdump = (sass_tool(m) for m in ("lib/libnvrtc.so.13", "bin/cuobjdump"))
    if nvrtc.is_file() and cuobjdump.is_file():  # (bootstrap.py data --sass-tools)
        lines += [
            f"export KVPOLAR_NVRTC={sh_quote(str(nvrtc))}",
            f'export PATH={sh_quote(str(cuobjdump.parent))}:"$PATH"',
        ]
    print("\n".join(lines))


def cmd_gc(args: argparse.Namespace) -> None:
    """Delete llama-<key> trees not used for --days days (never this checkout's current key)."""
    root = cache_dir()
    if not root.is_dir():
        return
    current = compute_build_key(repo_root())
    horizon = time.time() - args.days * 86400
    freed = 0
    for d in sorted(root.iterdir()):
        m = re.match(r"(llama|src|build|failed-src)-([0-9a-f]{16})$", d.name)
        if not m or not d.is_dir():
            continue
        key = m.group(2)
        if key == current and m.group(1) == "llama":
            continue
        used = d / "last-used"
        when = float(used.read_text().split()[0]) if used.is_file() else d.stat().st_mtime
        if when > horizon and m.group(1) == "llama":
            continue
        lock = _try_lock(f"llama-{key}")
        if lock is None:
            log(f"skipping {d} (in use)")
            continue
        try:
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file() and not f.is_symlink())
            if args.dry_run:
                log(f"would remove {d} ({size / 1e6:.0f} MB)")
            else:
                shutil.rmtree(d)
                log(f"removed {d} ({size / 1e6:.0f} MB)")
                freed += size
        finally:
            lock.close()
    # venvs: a checkout's older venvs (pyproject.toml changed) and venvs of deleted checkouts.
    for d in sorted(root.glob("venv-*")):
        if d == venv_dir() or not d.is_dir():
            continue
        try:
            owner = json.loads((d / VENV_MARKER).read_text()).get("repo", "")
        except (OSError, ValueError):
            owner = ""
        stale = owner == str(repo_root()) or (owner and not Path(owner).exists())
        if not stale:
            continue
        if args.dry_run:
            log(f"would remove {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)
            log(f"removed {d}")
    log(f"freed {freed / 1e6:.0f} MB (llama trees)")


def cmd_patches(args: argparse.Namespace) -> None:
    """Write both series back from a patched source tree (the sdist root with vendor/llama.cpp)."""
    root = repo_root()
    tree = args.tree
    if tree is None:
        info = root / "build" / BUILD_INFO
        if not info.is_file():
            raise BootstrapError(f"no {info}: build once (python3 scripts/bootstrap.py llama) or pass --tree")
        tree = Path(json.loads(info.read_text())["src"])
    tree = tree.resolve()
    if not (tree / VENDOR / ".git").is_dir():
        raise BootstrapError(f"{tree} is not a patched source tree: expected {VENDOR}/.git inside it")
    for repo, out in ((tree / VENDOR, PATCH_DIRS[0]), (tree, PATCH_DIRS[1])):
        written = export_series(repo, root / out)
        log(f"{out}: {len(written)} patch(es) from {repo}")
    log("done; `git diff patches/` shows what changed, `python3 scripts/bootstrap.py key` the new build key")


def cmd_key(args: argparse.Namespace) -> None:
    print(compute_build_key(repo_root()))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bootstrap.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="show commands and full build output")
    sub = ap.add_subparsers(dest="cmd", required=True)

    sub.add_parser("venv", help="create the venv and pip install -e '.[test]'")
    for name, hlp in (("data", "fetch and verify model/text data"), ("all", "venv + data + llama")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("--qwen", action="store_true", help="also Qwen2.5-Coder-1.5B Q4_K_M (1.1 GB)")
        p.add_argument("--gemma", action="store_true", help="also Gemma 3 270M Q4_K_M (253 MB)")
        p.add_argument("--haystack", action="store_true", help="also the Paul Graham essays text")
        p.add_argument(
            "--sass-tools",
            action="store_true",
            help="also NVRTC 13.0, cuobjdump and nvdisasm (~95 MB of wheels): the kernels' register tests",
        )
        if name == "all":
            p.add_argument("--verify", action="store_true", help="re-check that llama_cpp loads our libs")
    p = sub.add_parser("llama", help="patched llama.cpp build + llama-cpp-python binding")
    p.add_argument("--no-python", action="store_true", help="skip installing llama-cpp-python into the venv")
    p.add_argument("--verify", action="store_true", help="re-check that llama_cpp loads our libs")
    p.add_argument(
        "--source-only",
        action="store_true",
        help="prepare the patched source tree of this build key and stop (for a machine without network: "
        "copy $KVPOLAR_CACHE/llama-<key>/src there, same checkout and settings, then build there)",
    )
    for p in (sub.choices["all"], sub.choices["llama"]):
        p.add_argument(
            "--smoke", action="store_true", help="run the smoke run even if this build passed it here"
        )
        p.add_argument("--no-smoke", action="store_true", help="skip the smoke run (a few tokens per tool)")
        p.add_argument("--cuda", action="store_true", help="build with GGML_CUDA=ON (same as KVPOLAR_CUDA=1)")
        p.add_argument(
            "--cuda-archs", help="CMAKE_CUDA_ARCHITECTURES, e.g. 90 (default: native; KVPOLAR_CUDA_ARCHS)"
        )
    p = sub.add_parser("patches", help="the patch series: export the patched tree back into patches/")
    p.add_argument(
        "action", choices=["export"], help="export: git format-patch kvpolar-base..HEAD into patches/"
    )
    p.add_argument(
        "--tree",
        type=Path,
        help="patched source tree (default: the current build's, build/kvpolar-build.json)",
    )
    sub.add_parser("env", help='print shell exports (eval "$(python3 scripts/bootstrap.py env)")')
    sub.add_parser("key", help="print the build key of the current patches/headers")
    p = sub.add_parser("gc", help="delete llama.cpp trees of other keys unused for --days, and stale venvs")
    p.add_argument("--days", type=float, default=2.0)
    p.add_argument("--dry-run", action="store_true")

    args = ap.parse_args(argv)
    util.VERBOSE = args.verbose
    if getattr(args, "cuda", False):
        os.environ["KVPOLAR_CUDA"] = "1"
    if getattr(args, "cuda_archs", None):
        os.environ["KVPOLAR_CUDA_ARCHS"] = args.cuda_archs
    handlers = {
        "venv": lambda a: print(cmd_venv(a)),
        "data": cmd_data,
        "llama": cmd_llama,
        "all": cmd_all,
        "env": cmd_env,
        "key": cmd_key,
        "gc": cmd_gc,
        "patches": cmd_patches,
    }
    try:
        handlers[args.cmd](args)
    except BootstrapError as e:
        print(f"\nbootstrap {args.cmd}: ERROR: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbootstrap: interrupted (rerun to resume; partial outputs are discarded)", file=sys.stderr)
        return 130
    return 0
