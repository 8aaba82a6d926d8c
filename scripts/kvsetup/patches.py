"""The patch series: applied with `git am` onto the pinned tree, exported back with `git format-patch`.

Source tree layout made by `prepare_src` (vendor/llama.cpp, and the same at the sdist root):

    upstream      tag: the pristine tree of the pinned sdist
    kvpolar-base  tag: + the generated headers copied from converter/kvpolar/csrc
    HEAD          + one commit per patch file, message and author kept (git am)

Edit there (commit, amend, rebase -i kvpolar-base), then `python3 scripts/bootstrap.py
patches export` writes kvpolar-base..HEAD back into patches/ with `git format-patch`.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .pins import GIT_CFG, GIT_ENV, LLAMA_CPP_PYTHON_PIN
from .util import BootstrapError, PatchError, run


def git(args: Sequence[str], cwd: Path, what: str, capture: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **GIT_ENV}
    return run(["git", *GIT_CFG, *args], cwd=cwd, env=env, what=what, capture=capture)


def git_init_commit(tree: Path, message: str, exclude: Sequence[str] = ()) -> None:
    """Turn `tree` into a fresh git repository whose single commit is its current content."""
    git(["init", "-q"], tree, f"git init in {tree}")
    if exclude:
        with open(tree / ".git" / "info" / "exclude", "a") as f:
            f.write("\n".join(exclude) + "\n")
    pathspec = ["--", ".", *[f":(exclude){e.strip('/')}" for e in exclude]]
    git(["add", "-A", "-f", *pathspec], tree, f"git add in {tree}")
    git(["commit", "-q", "--no-verify", "--allow-empty", "-m", message], tree, f"git commit in {tree}")


BASE_TAG = "kvpolar-base"
UPSTREAM_TAG = "upstream"
# One author for the whole series; `export` rewrites nothing else of a commit.
PATCH_AUTHOR = "kvpolar <kvpolar@users.noreply.github.com>"
FORMAT_PATCH_ARGS = (
    "format-patch",
    "--no-numbered",
    "--zero-commit",
    "--no-signature",
    "--full-index",
    "--abbrev=12",
)


def tag(tree: Path, name: str) -> None:
    git(["tag", "-f", name], tree, f"git tag {name}")


def apply_patches(tree: Path, patches: Sequence[Path]) -> None:
    """`git am` each patch in order inside the git repository `tree` (message and author kept).

    A patch that does not apply raises PatchError naming the file, with git's hunk error and
    what to do about it; the tree is left at the last patch that applied.
    """
    for p in patches:
        p = p.resolve()
        try:
            git(
                ["am", "-q", "--keep-cr", "--whitespace=nowarn", "--committer-date-is-author-date", str(p)],
                tree,
                f"git am {p.name}",
            )
        except BootstrapError as e:
            detail = str(e).split("\n", 1)[1] if "\n" in str(e) else str(e)
            subprocess.run(["git", "am", "--abort"], cwd=tree, capture_output=True)
            raise PatchError(
                f"patch does not apply: {p}\n"
                f"  target tree: {tree}\n"
                f"--- git am says ---\n{detail.strip()}\n-------------------\n"
                "What to do: patches apply in file-name order, each on top of the ones before it, to "
                f"the pristine tree of {LLAMA_CPP_PYTHON_PIN} (llama.cpp in vendor/llama.cpp) plus the "
                f"generated headers (tag {BASE_TAG}). Rebase the series there: in the kept tree run "
                f"`git am --3way {p}`, resolve, `git am --continue`, apply the remaining patches, then "
                "`python3 scripts/bootstrap.py patches export --tree <that tree>`."
            ) from None


def export_series(tree: Path, out_dir: Path, *, since: str = BASE_TAG) -> list[Path]:
    """Write `since..HEAD` of `tree` as numbered patch files into `out_dir`, replacing its *.patch.

    Returns the written files. The output of `git format-patch` is made reproducible: zeroed
    commit ids, no version signature, full blob ids; authors are set to PATCH_AUTHOR.
    """
    count = git(["rev-list", "--count", f"{since}..HEAD"], tree, "git rev-list").stdout.strip()
    if not count.isdigit() or int(count) == 0:
        raise BootstrapError(f"no commits on top of {since} in {tree}: nothing to export")
    authors = set(
        git(["log", "--format=%an <%ae>", f"{since}..HEAD"], tree, "git log").stdout.split("\n")
    ) - {""}
    if authors != {PATCH_AUTHOR}:
        raise BootstrapError(
            f"commits in {tree} ({since}..HEAD) have author(s) {sorted(authors)}; the series has one author, "
            f"{PATCH_AUTHOR}: run `git -C {tree} rebase {since} --exec 'git commit --amend --no-edit "
            f'--author="{PATCH_AUTHOR}"\'` first'
        )
    staging = out_dir.parent / f".{out_dir.name}.export"
    if staging.exists():
        for f in staging.iterdir():
            f.unlink()
    staging.mkdir(parents=True, exist_ok=True)
    git([*FORMAT_PATCH_ARGS, "-o", str(staging), f"{since}..HEAD"], tree, "git format-patch")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.patch"):
        old.unlink()
    written = []
    for f in sorted(staging.glob("*.patch")):
        dst = out_dir / f.name
        os.replace(f, dst)
        written.append(dst)
    staging.rmdir()
    return written
