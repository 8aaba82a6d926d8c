"""scripts/synth_gguf.py: skeletons of GGUF headers and GGUFs with random weights built from them.

A tiny GGUF written here covers every metadata value type, a non-UTF-8 string, a custom
alignment and the type rules (1-D, rows of 32, other rows, a K-quant, 3-D); SmolLM2 checks a
real model: its metadata and tensors round-trip exactly and llama-bench / llama-completion load
the random-weight file and run a few tokens.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

import synth_gguf as sg
from kvpolar.gguf_scan import scan

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "synth_gguf.py"
CHANGED_KEYS = {"general.name", "general.file_type", sg.SYNTHETIC_KEY, sg.SEED_KEY}

# (name, shape in numpy order, source type, output type under --type q8_0)
TINY_TENSORS = [
    ("token_embd.weight", (8, 64), Q.F32, Q.Q8_0),
    ("blk.0.attn_norm.weight", (64,), Q.F32, Q.F32),
    ("blk.0.attn_q.bias", (64,), Q.F32, Q.F32),
    ("blk.0.odd.weight", (3, 48), Q.F16, Q.F16),
    ("blk.0.kquant.weight", (2, 256), Q.Q4_K, Q.Q8_0),
    ("blk.0.experts.weight", (2, 3, 32), Q.F32, Q.Q8_0),
]


def write_tiny(path: Path) -> Path:
    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(64)
    for i, t in enumerate((V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64)):
        w.add_key_value(f"test.{t.name.lower()}", -1 - i if t.name.startswith("INT") else 200 + i, t)
    w.add_key_value("test.float32", 1e-5, V.FLOAT32)
    w.add_key_value("test.float64", 1 / 3, V.FLOAT64)
    w.add_key_value("test.bool", True, V.BOOL)
    w.add_key_value("test.string", "héllo\n", V.STRING)
    w.add_key_value("test.not_utf8", b"\xff\xfe", V.STRING)
    w.add_key_value("general.file_type", 3, V.UINT32)
    w.add_key_value("tokenizer.ggml.tokens", ["<s>", "a", b"\xc3", " b"], V.ARRAY, V.STRING)
    w.add_key_value("tokenizer.ggml.token_type", [3, 1, 6, 1], V.ARRAY, V.INT32)
    w.add_key_value("test.floats", [0.5, -2.25], V.ARRAY, V.FLOAT32)
    w.add_key_value("test.bools", [True, False], V.ARRAY, V.BOOL)
    rng = np.random.default_rng(7)
    for name, shape, qtype, _ in TINY_TENSORS:
        if qtype == Q.Q4_K:
            data = np.zeros(gguf.quants.quant_shape_to_byte_shape(shape, qtype), np.uint8)
            w.add_tensor(name, data, raw_dtype=qtype)
        else:
            w.add_tensor(
                name, rng.standard_normal(shape).astype(np.float16 if qtype == Q.F16 else np.float32)
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def kv_of(path: Path) -> dict:
    """{key: (type, element type, value)} of a GGUF file."""
    return {k: (kv.type, kv.sub_type, kv.value) for k, kv in scan(path).kv.items()}


def tensors_of(path: Path) -> list[tuple[str, tuple, Q]]:
    return [(t.name, t.shape, t.type) for t in scan(path).tensors]


def values_of(path: Path) -> dict[str, np.ndarray]:
    r = gguf.GGUFReader(path)
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in r.tensors}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny_skel(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_skel") / "tiny.skel"
    assert sg.main(["skeleton", str(tiny), str(path)]) == 0
    return path


def test_skeleton_is_gzipped_json_with_exact_types(tiny, tiny_skel):
    skel = json.loads(gzip.decompress(tiny_skel.read_bytes()))
    assert skel["format"] == sg.SKELETON_FORMAT
    meta = {e["key"]: e for e in skel["metadata"]}
    assert list(meta) == list(kv_of(tiny))
    assert meta["test.uint8"] == {"key": "test.uint8", "type": "UINT8", "value": 200}
    assert meta["test.int64"] == {"key": "test.int64", "type": "INT64", "value": -8}
    assert meta["test.not_utf8"]["value"] == {"hex": "fffe"}
    assert meta["tokenizer.ggml.tokens"]["sub_type"] == "STRING"
    assert meta["tokenizer.ggml.tokens"]["value"][2] == {"hex": "c3"}
    assert [(t["name"], tuple(t["shape"]), Q[t["type"]]) for t in skel["tensors"]] == tensors_of(tiny)
    assert sg.load_skeleton(tiny_skel) == sg.load_source(tiny)  # the file form == read from the GGUF


def test_build_keeps_metadata_and_tensors(tiny, tiny_skel, tmp_path):
    out = tmp_path / "out.gguf"
    assert sg.main(["build", str(tiny_skel), str(out), "--seed", "5"]) == 0
    src, got = kv_of(tiny), kv_of(out)
    assert {k: v for k, v in got.items() if k not in CHANGED_KEYS} == {
        k: v for k, v in src.items() if k not in CHANGED_KEYS
    }
    assert [k for k in got if k in src] == list(src)  # same order; the new keys come last
    assert got["general.name"] == (V.STRING, None, "llama (random weights)")  # tiny has no name
    assert got["general.file_type"] == (V.UINT32, None, int(gguf.LlamaFileType.MOSTLY_Q8_0))
    assert got[sg.SYNTHETIC_KEY] == (V.BOOL, None, True)
    assert got[sg.SEED_KEY] == (V.UINT64, None, 5)
    assert scan(out).alignment == 64
    assert tensors_of(out) == [(n, s, q8) for n, s, _, q8 in TINY_TENSORS]

    vals = values_of(out)
    assert np.all(vals["blk.0.attn_norm.weight"] == 1.0)
    assert 0 < np.abs(vals["blk.0.attn_q.bias"]).max() < 0.02
    for name in ("token_embd.weight", "blk.0.odd.weight", "blk.0.kquant.weight", "blk.0.experts.weight"):
        x = vals[name]
        assert x.size == math.prod(dict((n, s) for n, s, *_ in TINY_TENSORS)[name])
        assert 0.01 < x.std() < 0.03, (name, x.std())


def test_dequant_keeps_values_as_f32(tiny, tmp_path):
    out = tmp_path / "f32.gguf"
    assert sg.main(["dequant", str(tiny), str(out)]) == 0
    src, got = kv_of(tiny), kv_of(out)
    assert {k: v for k, v in got.items() if k not in CHANGED_KEYS} == {
        k: v for k, v in src.items() if k not in CHANGED_KEYS
    }
    assert sg.SYNTHETIC_KEY not in got and sg.SEED_KEY not in got  # real weights
    assert got["general.name"] == (V.STRING, None, "llama" + sg.DEQUANT_SUFFIX)
    assert got["general.file_type"] == (V.UINT32, None, int(gguf.LlamaFileType.ALL_F32))
    assert tensors_of(out) == [(n, s, Q.F32) for n, s, _, _ in TINY_TENSORS]
    want, vals = values_of(tiny), values_of(out)
    for name, *_ in TINY_TENSORS:
        assert np.array_equal(vals[name].reshape(-1), want[name].reshape(-1).astype(np.float32)), name


def test_build_is_seeded(tiny, tiny_skel, tmp_path):
    paths = {}
    for key, src, seed in (("a", tiny_skel, 1), ("b", tiny_skel, 1), ("gguf", tiny, 1), ("c", tiny_skel, 2)):
        paths[key] = tmp_path / f"{key}.gguf"
        sg.build(sg.load_source(src), paths[key], "q8_0", seed)
    data = {k: p.read_bytes() for k, p in paths.items()}
    assert data["a"] == data["b"] == data["gguf"]  # from the skeleton or the GGUF itself
    va, vc = values_of(paths["a"]), values_of(paths["c"])
    assert not np.array_equal(va["token_embd.weight"], vc["token_embd.weight"])


def test_type_f16(tiny_skel, tmp_path):
    out = tmp_path / "f16.gguf"
    stats = sg.build(sg.load_source(tiny_skel), out, "f16")
    want = [(n, s, Q.F32 if len(s) == 1 else Q.F16) for n, s, *_ in TINY_TENSORS]
    assert tensors_of(out) == want
    assert stats["types"] == {"F32": 2, "F16": 4}
    assert kv_of(out)["general.file_type"][2] == int(gguf.LlamaFileType.MOSTLY_F16)


def test_type_same(tiny_skel, tmp_path):
    """--type same keeps each source type where gguf-py can quantize it, file_type included."""
    src = sg.load_source(tiny_skel)
    src["tensors"] = [t for t in src["tensors"] if t["type"] != Q.Q4_K]
    out = tmp_path / "same.gguf"
    sg.build(src, out, "same")
    assert tensors_of(out) == [(n, s, q) for n, s, q, _ in TINY_TENSORS if q != Q.Q4_K]
    assert kv_of(out)["general.file_type"][2] == 3


def test_type_same_refuses_kquants(tiny_skel, tmp_path, capsys):
    out = tmp_path / "same.gguf"
    assert sg.main(["build", str(tiny_skel), str(out), "--type", "same"]) == 1
    err = capsys.readouterr().err
    assert "cannot quantize Q4_K (1 tensors, e.g. blk.0.kquant.weight)" in err, err
    assert "--type q8_0" in err
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left


def test_errors(tmp_path, tiny_skel, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a model\n")
    assert sg.main(["build", str(text), str(tmp_path / "o.gguf")]) == 1
    assert "expected a GGUF file (magic b'GGUF') or a skeleton" in capsys.readouterr().err
    assert sg.main(["skeleton", str(text), str(tmp_path / "o.skel")]) == 1
    assert "not a GGUF file: expected magic b'GGUF', found b'hell'" in capsys.readouterr().err
    for cmd, out in (("build", "o.gguf"), ("skeleton", "o.skel")):
        assert sg.main([cmd, str(tmp_path / "missing.gguf"), str(tmp_path / out)]) == 1
        assert "missing.gguf" in capsys.readouterr().err
    other = tmp_path / "other.json.gz"
    other.write_bytes(gzip.compress(b'{"format": "something else"}'))
    assert sg.main(["build", str(other), str(tmp_path / "o.gguf")]) == 1
    assert "expected a skeleton with format 'kvpolar-gguf-skeleton', found 'something else'" in (
        capsys.readouterr().err
    )
    skel = json.loads(gzip.decompress(tiny_skel.read_bytes()))
    entry = next(e for e in skel["metadata"] if e["key"] == "test.uint16")
    entry["value"] = 70000
    bad = tmp_path / "bad.skel"
    bad.write_bytes(gzip.compress(json.dumps(skel).encode()))
    assert sg.main(["build", str(bad), str(tmp_path / "o.gguf")]) == 1
    assert "('test.uint16'): expected values of type UINT16, found [70000]" in capsys.readouterr().err
    assert sg.main(["build", str(tiny_skel), str(tmp_path / "no_dir" / "o.gguf")]) == 1
    assert "the output directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.skel", "notes.txt", "other.json.gz"]


def test_cli_exit_status(tmp_path, tiny_skel):
    """As a program: an unknown --type is a usage error (2), a bad input exits 1."""
    run = [sys.executable, str(SCRIPT), "build", str(tiny_skel), str(tmp_path / "o.gguf")]
    p = subprocess.run([*run, "--type", "q4_k"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "invalid choice: 'q4_k' (choose from" in p.stderr, p.stderr
    p = subprocess.run(
        [*run[:3], str(tmp_path / "none.skel"), run[4]], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 1
    assert "none.skel: no such file" in p.stderr, p.stderr
    assert not (tmp_path / "o.gguf").exists()


# ----------------------------------------------------------------------------------------------
# SmolLM2: the real header round-trips, llama.cpp runs the random-weight file


@pytest.fixture(scope="module")
def smollm2_synth(smollm2_path, tmp_path_factory) -> tuple[Path, Path]:
    """(skeleton, synthetic Q8_0 GGUF built from the skeleton) of SmolLM2."""
    d = tmp_path_factory.mktemp("smollm2_synth")
    skel, out = d / "smollm2.skel", d / "smollm2-random.gguf"
    assert sg.main(["skeleton", str(smollm2_path), str(skel)]) == 0
    assert sg.main(["build", str(skel), str(out)]) == 0
    return skel, out


def test_smollm2_roundtrip(smollm2_path, smollm2_synth):
    skel, out = smollm2_synth
    assert skel.stat().st_size < 2 * 2**20  # 0.4 MiB on the development machine
    assert sg.load_skeleton(skel) == sg.load_source(smollm2_path)
    src, got = kv_of(smollm2_path), kv_of(out)
    assert len(src["tokenizer.ggml.tokens"][2]) == 49152
    assert {k: v for k, v in got.items() if k not in CHANGED_KEYS} == {
        k: v for k, v in src.items() if k not in CHANGED_KEYS
    }
    assert got["general.name"][2] == src["general.name"][2] + " (random weights)"
    assert [(n, s) for n, s, _ in tensors_of(out)] == [(n, s) for n, s, _ in tensors_of(smollm2_path)]
    assert {q for *_, q in tensors_of(out)} == {Q.F32, Q.Q8_0}


def _run(cmd: list, timeout: int) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} exited with {p.returncode}:\n{p.stderr[-3000:]}"
    return p


@pytest.mark.build
def test_smollm2_llama_bench(build_dir, smollm2_synth):
    _, out = smollm2_synth
    cmd = [build_dir / "bin" / "llama-bench", "-m", out, "-p", 16, "-n", 8, "-r", 1, "-t", 2, "-o", "json"]
    rows = json.loads(_run(cmd, timeout=300).stdout)
    assert [(r["n_prompt"], r["n_gen"]) for r in rows] == [(16, 0), (0, 8)]
    assert all(r["avg_ts"] > 0 for r in rows)
    assert rows[0]["model_type"].endswith("Q8_0")


@pytest.mark.build
def test_smollm2_llama_completion(build_dir, smollm2_synth):
    _, out = smollm2_synth
    cmd = [build_dir / "bin" / "llama-completion", "-m", out, "-p", "hello", "-n", 8, "-no-cnv"]
    p = _run([*cmd, "--ignore-eos", "-s", 1, "-t", 2], timeout=300)
    assert p.stdout.startswith("hello") and len(p.stdout) > len("hello"), p.stdout
    assert re.search(r"eval time =\s+[\d.]+ ms /\s+8 runs", p.stderr), p.stderr[-2000:]
