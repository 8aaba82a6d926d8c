"""The kvpolar command line: inspect/encode/decode/dump, exit codes and error lines."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from kvpolar import cli, codec, gguf_scan


def _x(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _ref(x, fmt) -> np.ndarray:
    return codec.dequantize(codec.quantize(x, fmt), fmt)


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _error_line(err: str) -> str:
    """The one error line (argparse/logging warnings aside), checked to carry no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------------------------
# Happy paths


def test_no_arguments_prints_help(capsys):
    rc, out, _ = run(capsys)
    assert rc == 0 and "usage: kvpolar" in out
    for cmd in ("inspect", "encode", "decode", "dump"):
        assert cmd in out


@pytest.mark.parametrize("fmt", ["polar", "polar3"])
def test_encode_decode_npy_round_trip(tmp_path, capsys, fmt):
    x = _x((2, 8, 128))
    np.save(tmp_path / "k.npy", x)
    rc, out, err = run(capsys, "encode", tmp_path / "k.npy", tmp_path / "k.gguf", "--type", fmt)
    assert rc == 0, err
    assert f"1 {fmt.upper()}" in out and "bits/elem" in out
    rc, out, err = run(capsys, "decode", tmp_path / "k.gguf", tmp_path / "y.npy")
    assert rc == 0, err
    y = np.load(tmp_path / "y.npy")
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_array_equal(y, _ref(x, fmt))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.gguf", "k.npy", "y.npy"]  # no temp files


def test_inspect_json_and_text(tmp_path, capsys):
    np.save(tmp_path / "k.npy", _x((4, 256)))
    assert run(capsys, "encode", tmp_path / "k.npy", tmp_path / "k.gguf", "--name", "blk.0.k")[0] == 0
    rc, out, _ = run(capsys, "inspect", tmp_path / "k.gguf", "--json")
    assert rc == 0
    s = json.loads(out)
    (t,) = s["tensors"]
    assert (t["name"], t["type"], t["type_id"], t["shape"]) == ("blk.0.k", "POLAR", 43, [4, 256])
    assert t["nbytes"] == 4 * 4 * 34 and t["bits_per_elem"] == 4.25
    assert s["totals"]["n_tensors"] == 1 and s["totals"]["f32_nbytes"] == 4 * 4 * 256
    assert s["file_size"] == (tmp_path / "k.gguf").stat().st_size
    rc, out, _ = run(capsys, "--verbose", "inspect", tmp_path / "k.gguf")
    assert rc == 0
    assert "blk.0.k" in out and "POLAR" in out and "4 x 256" in out and "4.25" in out and "total:" in out


def test_encode_json_and_mixed_npz(tmp_path, capsys, caplog):
    k, b = _x((3, 64), 1), _x(10, 2)
    np.savez(tmp_path / "m.npz", k=k, b=b, i=np.arange(5, dtype=np.int32))
    rc, out, err = run(capsys, "encode", tmp_path / "m.npz", tmp_path / "m.gguf", "-t", "polar3", "--json")
    assert rc == 0, err
    s = json.loads(out)
    assert {t["name"]: t["type"] for t in s["tensors"]} == {"k": "POLAR3", "b": "F32", "i": "I32"}
    assert "tensor 'b' (dtype float32, shape (10,))" in caplog.text and "stored as F32" in caplog.text
    rc, out, err = run(capsys, "decode", tmp_path / "m.gguf", tmp_path / "o.npz", "--json")
    assert rc == 0, err
    assert [t["name"] for t in json.loads(out)["tensors"]] == ["k", "b", "i"]
    with np.load(tmp_path / "o.npz") as o:
        np.testing.assert_array_equal(o["k"], _ref(k, "polar3"))
        np.testing.assert_array_equal(o["b"], b)
        assert o["i"].tolist() == [0, 1, 2, 3, 4]
    rc, _, err = run(capsys, "decode", tmp_path / "m.gguf", tmp_path / "k.npy", "--tensor", "k")
    assert rc == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "k.npy"), _ref(k, "polar3"))


@pytest.mark.parametrize("fmt", ["polar", "polar3"])
def test_safetensors_round_trip(tmp_path, capsys, fmt):
    stn = pytest.importorskip("safetensors.numpy")
    k, v = _x((2, 4, 128), 3), _x((2, 4, 64), 4).astype(np.float16)
    stn.save_file({"blk.0.k": k, "blk.0.v": v}, str(tmp_path / "kv.safetensors"))
    rc, _, err = run(
        capsys, "encode", tmp_path / "kv.safetensors", tmp_path / "kv.gguf", "--type", fmt, "--strict"
    )
    assert rc == 0, err
    rc, _, err = run(capsys, "decode", tmp_path / "kv.gguf", tmp_path / "out.safetensors")
    assert rc == 0, err
    y = stn.load_file(str(tmp_path / "out.safetensors"))
    assert sorted(y) == ["blk.0.k", "blk.0.v"]
    np.testing.assert_array_equal(y["blk.0.k"], _ref(k, fmt))
    np.testing.assert_array_equal(y["blk.0.v"], _ref(v, fmt))


def test_dump_prints_polar(tmp_path, capsys):
    np.save(tmp_path / "k.npy", _x((2, 128)))
    assert run(capsys, "encode", tmp_path / "k.npy", tmp_path / "k.gguf", "--type", "polar3")[0] == 0
    rc, out, _ = run(capsys, "dump", tmp_path / "k.gguf")
    assert rc == 0 and "POLAR3" in out and "| k" in out
    rc, out, _ = run(capsys, "dump", "--json", tmp_path / "k.gguf")
    assert rc == 0 and json.loads(out)["tensors"]["k"]["type"] == "POLAR3"


def test_error_missing_input(tmp_path, capsys):
    rc, _, err = run(capsys, "encode", tmp_path / "none.npy", tmp_path / "o.gguf")
    assert rc == 2
    line = _error_line(err)
    assert line.startswith("kvpolar encode: error:") and "none.npy" in line and "does not exist" in line
    rc, _, err = run(capsys, "inspect", tmp_path / "none.gguf")
    assert rc == 2 and "does not exist" in _error_line(err)


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (
            ["encode", "{d}/k.txt", "{d}/o.gguf"],
            "expected the input to end in .npy, .npz, .safetensors, got '{d}/k.txt'",
        ),
        (["encode", "{d}/k.npy", "{d}/o.bin"], "expected the output to end in .gguf, got '{d}/o.bin'"),
        (["decode", "{d}/k.gguf", "{d}/o.csv"], "expected the output to end in .npy, .npz, .safetensors"),
        (["inspect", "{d}/k.npy"], "{d}/k.npy: not a GGUF file: expected magic b'GGUF', found b'\\x93NUM'"),
        (["decode", "{d}/k.gguf", "{d}/o.npy", "--tensor", "v"], "no tensor 'v'; expected one of ['k']"),
    ],
)
def test_error_bad_arguments(tmp_path, capsys, argv, expect):
    np.save(tmp_path / "k.npy", _x((1, 64)))
    (tmp_path / "k.txt").write_text("x")
    assert run(capsys, "encode", tmp_path / "k.npy", tmp_path / "k.gguf")[0] == 0
    rc, _, err = run(capsys, *[a.format(d=tmp_path) for a in argv])
    assert rc == 2
    assert expect.format(d=tmp_path) in _error_line(err)


def test_error_shape_not_multiple_of_64(tmp_path, capsys, caplog):
    np.save(tmp_path / "k.npy", _x((4, 96)))
    rc, _, err = run(capsys, "encode", tmp_path / "k.npy", tmp_path / "k.gguf", "--strict")
    assert rc == 2
    line = _error_line(err)
    assert "tensor 'k'" in line and "(4, 96)" in line and "multiple of 64" in line
    assert not (tmp_path / "k.gguf").exists()
    rc, _, err = run(capsys, "encode", tmp_path / "k.npy", tmp_path / "k.gguf")  # not strict: kept as F32
    assert rc == 0 and "tensor 'k'" in caplog.text and "stored as F32" in caplog.text
    assert gguf_scan.scan(tmp_path / "k.gguf").tensors[0].type.name == "F32"


def test_error_nan_names_the_tensor(tmp_path, capsys):
    x = _x((2, 128))
    x[1, 70] = np.nan
    np.savez(tmp_path / "kv.npz", good=_x((1, 64)), bad=x)
    rc, _, err = run(capsys, "encode", tmp_path / "kv.npz", tmp_path / "kv.gguf")
    assert rc == 2
    line = _error_line(err)
    assert "tensor 'bad'" in line and "NaN/Inf" in line and "(1, 70)" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kv.npz"]
    rc, _, err = run(capsys, "encode", tmp_path / "kv.npz", tmp_path / "kv.gguf", "--sanitize")
    assert rc == 0, err


def test_error_npy_needs_tensor_when_several(tmp_path, capsys):
    np.savez(tmp_path / "kv.npz", k=_x((1, 64)), v=_x((1, 64)))
    assert run(capsys, "encode", tmp_path / "kv.npz", tmp_path / "kv.gguf")[0] == 0
    rc, _, err = run(capsys, "decode", tmp_path / "kv.gguf", tmp_path / "o.npy")
    assert rc == 2
    line = _error_line(err)
    assert "holds 2 tensors (k, v)" in line and "--tensor NAME" in line


def test_error_corrupt_gguf(tmp_path, capsys):
    np.save(tmp_path / "k.npy", _x((4, 128)))
    assert run(capsys, "encode", tmp_path / "k.npy", tmp_path / "k.gguf")[0] == 0
    data = (tmp_path / "k.gguf").read_bytes()
    (tmp_path / "k.gguf").write_bytes(data[:-100])
    (tmp_path / "text.txt").write_text("calibration text")
    outputs = {
        "decode": [tmp_path / "o.npy"],
        "calibrate": [tmp_path / "c.gguf", "--text", tmp_path / "text.txt"],
    }
    for cmd in (["inspect"], ["decode"], ["dump"], ["calibrate"]):
        argv = [*cmd, tmp_path / "k.gguf", *outputs.get(cmd[0], [])]
        rc, _, err = run(capsys, *argv)
        assert rc == 2
        line = _error_line(err)
        assert "truncated GGUF file" in line and str(tmp_path / "k.gguf") in line
    assert not (tmp_path / "c.gguf").exists()


def test_error_safetensors_not_installed(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    (tmp_path / "kv.safetensors").write_bytes(b"\0" * 16)
    rc, _, err = run(capsys, "encode", tmp_path / "kv.safetensors", tmp_path / "kv.gguf")
    assert rc == 2 and "pip install safetensors" in _error_line(err)


def test_verbose_shows_traceback(tmp_path, capsys):
    rc, _, err = run(capsys, "--verbose", "encode", tmp_path / "none.npy", tmp_path / "o.gguf")
    assert rc == 2 and "Traceback" in err and "CLIError" in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["encode"])
    assert ei.value.code == 2
    with pytest.raises(SystemExit) as ei:
        cli.main(["encode", "a.npy", "b.gguf", "--type", "q4_0"])
    assert ei.value.code == 2
    assert "invalid choice: 'q4_0'" in capsys.readouterr().err


def test_python_m_kvpolar_exit_code(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "kvpolar", "inspect", str(tmp_path / "none.gguf")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == f"kvpolar inspect: error: GGUF file '{tmp_path / 'none.gguf'}' does not exist"
