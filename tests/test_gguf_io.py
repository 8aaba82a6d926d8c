"""kvpolar.gguf_types / gguf_scan / gguf_io: polar types registered in gguf-py, byte-identical
GGUF round trips, bounded reading of truncated/corrupt files, atomic writes."""

from __future__ import annotations

import enum
import os
import pickle
import re
import struct
import subprocess
import sys
import time

import gguf
import gguf.quants
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValue, GGUFValueType

from kvpolar import codec, gguf_io, gguf_scan, gguf_types
from kvpolar.format import FORMATS
from kvpolar.gguf_io import RawTensor
from kvpolar.gguf_scan import GGUFFormatError

T = GGMLQuantizationType
FMTS = sorted(FORMATS)


def _x(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _ref(x, fmt) -> np.ndarray:
    return codec.dequantize(codec.quantize(x, fmt), fmt)


def _mixed(tmp_path, fmt, name="mixed.gguf"):
    """A file with two polar tensors, an F32 and an I32 tensor and typed metadata."""
    path = tmp_path / name
    tensors = {
        "blk.0.k": _x((2, 4, 128), 1),
        "blk.0.v": _x((4, 64), 2),
        "bias": RawTensor(T.F32, (5,), _x(5, 3)),
        "pos": RawTensor(T.I32, (2, 3), np.arange(6, dtype=np.int32).reshape(2, 3)),
    }
    tensors = {
        k: v if isinstance(v, RawTensor) else gguf_io.encode_tensor(k, v, fmt) for k, v in tensors.items()
    }
    meta = {
        "kvpolar.note": "round trip",
        "kvpolar.n": 7,
        "kvpolar.big": 1 << 40,
        "kvpolar.scale": 0.5,
        "kvpolar.flag": True,
        "kvpolar.names": ["a", "bb"],
        "kvpolar.ids": [1, 2, 3],
        "kvpolar.u64": np.uint64(5),
        "kvpolar.f64": GGUFValue(0.1, GGUFValueType.FLOAT64),
    }
    gguf_io.write_tensors(path, tensors, None, meta)
    return path


# ----------------------------------------------------------------------------------------------
# Registration


@pytest.mark.parametrize("name", FMTS)
def test_registration_ids_sizes_lookups(name):
    fmt = FORMATS[name]
    qt = gguf_types.ggml_type(name)
    assert int(qt) == fmt.type_id == {"polar": 43, "polar3": 44}[name]
    assert T(fmt.type_id) is qt
    assert T[name.upper()] is qt
    assert getattr(T, name.upper()) is qt
    assert qt.name == name.upper() and isinstance(qt, T) and qt in list(T)
    assert T.__members__[name.upper()] is qt
    assert pickle.loads(pickle.dumps(qt)) is qt
    assert GGML_QUANT_SIZES[qt] == (64, fmt.type_size)
    cls = gguf.quants._type_traits[qt]
    assert cls is gguf_types.QUANT_CLASSES[name]
    assert cls.__name__ == name.upper() and issubclass(cls, vars(gguf.quants)["__Quant"])
    assert (cls.qtype, cls.block_size, cls.type_size) == (qt, 64, fmt.type_size)
    assert gguf_types.polar_format_of(qt) == fmt and gguf_types.polar_format_of(T.F32) is None


def test_register_is_idempotent():
    n, names = len(T), list(T.__members__)
    traits, sizes = dict(gguf.quants._type_traits), dict(GGML_QUANT_SIZES)
    for _ in range(3):
        assert gguf_types.register() == {"polar": T.POLAR, "polar3": T.POLAR3}
    assert len(T) == n and list(T.__members__) == names
    assert gguf.quants._type_traits == traits and dict(GGML_QUANT_SIZES) == sizes


def test_enum_extension_refuses_conflicts():
    class E(enum.IntEnum):
        A = 0
        B = 43

    with pytest.raises(RuntimeError, match="already defines E value 43 as B"):
        gguf_types._add_enum_member(E, "POLAR", 43)
    with pytest.raises(RuntimeError, match=r"E\.A exists with value 0, not 5"):
        gguf_types._add_enum_member(E, "A", 5)
    m = gguf_types._add_enum_member(E, "C", 44)
    assert E(44) is m is E["C"] is E.C and list(E)[-1] is m and len(E) == 3
    assert gguf_types._add_enum_member(E, "C", 44) is m and len(E) == 3
    with pytest.raises(AttributeError):
        E.C = 1


@pytest.mark.parametrize("name", FMTS)
def test_gguf_quants_dispatch(name):
    x = _x((3, 2, 128))
    qt = gguf_types.ggml_type(name)
    b = gguf.quants.quantize(x, qt)
    assert b.dtype == np.uint8 and b.shape == (3, 2, 2 * FORMATS[name].type_size)
    np.testing.assert_array_equal(b, codec.quantize(x, name))
    y = gguf.quants.dequantize(b, qt)
    np.testing.assert_array_equal(y, codec.dequantize(b, name))


@pytest.mark.parametrize("name", FMTS)
def test_gguf_writer_and_reader_handle_polar(tmp_path, name):
    """Plain gguf-py: GGUFWriter takes the bytes with raw_dtype, GGUFReader gives them back."""
    qt = gguf_types.ggml_type(name)
    x = _x((3, 128))
    b = codec.quantize(x, name)
    path = tmp_path / "plain.gguf"
    w = gguf.GGUFWriter(path, "kvpolar")
    w.add_tensor("k", b, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = gguf.GGUFReader(path)
    (t,) = r.tensors
    assert t.tensor_type is qt and t.name == "k"
    assert t.shape.tolist() == [128, 3]  # ggml ne order
    assert t.n_elements == 3 * 128 and t.n_bytes == b.nbytes
    np.testing.assert_array_equal(np.asarray(t.data), b)
    np.testing.assert_array_equal(gguf.quants.dequantize(t.data, qt), _ref(x, name))
    assert np.array_equal(gguf_io.read_tensors(path)["k"], _ref(x, name))


# ----------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("name", FMTS)
def test_round_trip_byte_identical(tmp_path, name):
    p1 = _mixed(tmp_path, name)
    f = gguf_io.read_gguf(p1, decode=False)
    assert f.arch == "kvpolar" and f.version == 3 and f.alignment == 32
    k = f.tensors["blk.0.k"]
    assert k.type is gguf_types.ggml_type(name) and k.shape == (2, 4, 128)
    assert (
        k.data.shape == (2, 4, 2 * FORMATS[name].type_size) and k.bits_per_elem == FORMATS[name].bits_per_elem
    )
    assert f.tensors["bias"].type is T.F32 and f.tensors["pos"].type is T.I32
    assert f.metadata["kvpolar.big"] == GGUFValue(1 << 40, GGUFValueType.INT64)
    assert f.metadata["kvpolar.u64"].type == GGUFValueType.UINT64
    assert f.metadata["kvpolar.names"] == GGUFValue(["a", "bb"], GGUFValueType.ARRAY, GGUFValueType.STRING)
    assert f.metadata["kvpolar.f64"] == GGUFValue(0.1, GGUFValueType.FLOAT64)

    p2 = tmp_path / "again.gguf"
    gguf_io.write_tensors(p2, f.tensors, None, f.metadata, f.arch)
    assert p1.read_bytes() == p2.read_bytes()

    y = gguf_io.read_tensors(p1)
    assert list(y) == ["blk.0.k", "blk.0.v", "bias", "pos"]
    np.testing.assert_array_equal(y["blk.0.k"], _ref(_x((2, 4, 128), 1), name))
    np.testing.assert_array_equal(y["blk.0.v"], _ref(_x((4, 64), 2), name))
    np.testing.assert_array_equal(y["bias"], _x(5, 3))
    assert y["pos"].dtype == np.int32 and y["pos"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert y["blk.0.k"].dtype == np.float32


def test_write_encodes_floats_and_custom_alignment(tmp_path):
    x = _x((8, 256)).astype(np.float64)
    p = gguf_io.write_tensors(tmp_path / "a.gguf", {"k": x}, "polar3", {"general.alignment": np.uint32(64)})
    lay = gguf_scan.scan(p)
    assert lay.alignment == 64 and lay.data_offset % 64 == 0
    (t,) = lay.tensors
    assert (t.type, t.shape, t.nbytes, t.bits_per_elem) == (T.POLAR3, (8, 256), 8 * 4 * 26, 3.25)
    np.testing.assert_array_equal(gguf_io.read_tensors(p)["k"], _ref(x, "polar3"))
    f = gguf_io.read_gguf(p, decode=False)
    p2 = gguf_io.write_tensors(tmp_path / "b.gguf", f.tensors, None, f.metadata, f.arch)
    assert p.read_bytes() == p2.read_bytes()


def test_read_without_copy_views_the_file(tmp_path):
    p = _mixed(tmp_path, "polar")
    copied = gguf_io.read_gguf(p, decode=False).tensors
    viewed = gguf_io.read_gguf(p, decode=False, copy=False).tensors
    for name, t in viewed.items():
        assert (t.type, t.shape) == (copied[name].type, copied[name].shape)
        np.testing.assert_array_equal(t.data, copied[name].data)
        assert not t.data.flags.writeable and copied[name].data.flags.writeable
    with pytest.raises(ValueError, match="copy=False applies to decode=False"):
        gguf_io.read_gguf(p, copy=False)


def test_read_big_endian_file(tmp_path):
    """gguf-py writes big-endian files (values and tensor data byte-swapped); read as native."""
    p = tmp_path / "be.gguf"
    x = _x((3, 64))
    w = gguf.GGUFWriter(p, "kvpolar", endianess=gguf.GGUFEndian.BIG)
    w.add_uint32("kvpolar.n", 7)
    w.add_array("kvpolar.ids", [1, 2, 3])
    w.add_tensor("x", x)
    w.add_tensor("i", np.arange(4, dtype=np.int32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert gguf_scan.scan(p).byte_order == ">"
    f = gguf_io.read_gguf(p)
    assert f.metadata["kvpolar.n"] == GGUFValue(7, GGUFValueType.UINT32)
    assert f.metadata["kvpolar.ids"] == GGUFValue([1, 2, 3], GGUFValueType.ARRAY, GGUFValueType.INT32)
    assert f.tensors["x"].dtype == np.float32 and f.tensors["x"].dtype.isnative
    np.testing.assert_array_equal(f.tensors["x"], x)
    assert f.tensors["i"].tolist() == [0, 1, 2, 3]


def test_summary(tmp_path):
    s = gguf_scan.summary(_mixed(tmp_path, "polar"))
    assert [t["type"] for t in s["tensors"]] == ["POLAR", "POLAR", "F32", "I32"]
    k = s["tensors"][0]
    assert k["shape"] == [2, 4, 128] and k["ne"] == [128, 4, 2] and k["bits_per_elem"] == 4.25
    assert s["by_type"]["POLAR"] == {"n_tensors": 2, "n_elements": 1024 + 256, "nbytes": (16 + 4) * 34}
    assert s["totals"]["n_elements"] == 1024 + 256 + 5 + 6
    assert s["metadata"]["kvpolar.names"] == {"type": "[STRING]", "length": 2}
    assert s["architecture"] == "kvpolar"


# ----------------------------------------------------------------------------------------------
# Writing: input checks and atomicity


@pytest.mark.parametrize("name", FMTS)
def test_write_rejects_shape_not_multiple_of_block(tmp_path, name):
    out = tmp_path / "bad.gguf"
    with pytest.raises(ValueError, match=r"tensor 'blk\.0\.k'.*multiple of .*block size 64.*\(4, 96\)"):
        gguf_io.write_tensors(out, {"ok": _x((2, 64)), "blk.0.k": _x((4, 96))}, name)
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_nonfinite_naming_the_tensor(tmp_path):
    x = _x((2, 64))
    x[1, 5] = np.nan
    with pytest.raises(ValueError, match=r"tensor 'v'.*NaN/Inf.*\(1, 5\)"):
        gguf_io.write_tensors(tmp_path / "a.gguf", {"v": x}, "polar")
    p = gguf_io.write_tensors(tmp_path / "a.gguf", {"v": x}, "polar", nonfinite="sanitize")
    assert np.isfinite(gguf_io.read_tensors(p)["v"]).all()


@pytest.mark.parametrize(
    ("tensors", "fmt", "msg"),
    [
        ({"x": np.zeros((1, 1, 1, 1, 64), np.float32)}, "polar", "at most 4"),
        ({"x": np.zeros(64, np.int32)}, "polar", "floating-point"),
        ({"x": np.zeros(4, np.uint8)}, None, "dtype uint8 cannot be stored"),
        ({"n" * 64: np.zeros(64, np.float32)}, "polar", "expected at most 63"),
        (
            {"x": RawTensor(T.POLAR, (2, 64), np.zeros((2, 33), np.uint8))},
            None,
            r"expected data uint8 of shape \(2, 34\)",
        ),
        (
            {"x": RawTensor(T.POLAR, (1, 64), np.full((1, 34), 0xFF, np.uint8))},
            None,
            "block 0 has scale d = nan",
        ),
    ],
)
def test_write_rejects_bad_tensors(tmp_path, tensors, fmt, msg):
    with pytest.raises(ValueError, match=msg):
        gguf_io.write_tensors(tmp_path / "a.gguf", tensors, fmt)
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_bad_metadata(tmp_path):
    x = {"k": _x((1, 64))}
    with pytest.raises(ValueError, match="'m': expected str"):
        gguf_io.write_tensors(tmp_path / "a.gguf", x, "polar", {"m": object()})
    with pytest.raises(ValueError, match="share one type"):
        gguf_io.write_tensors(tmp_path / "a.gguf", x, "polar", {"m": [1, "a"]})
    with pytest.raises(ValueError, match=r"pass 'general\.architecture' as arch="):
        gguf_io.write_tensors(tmp_path / "a.gguf", x, "polar", {"general.architecture": "x"})
    with pytest.raises(ValueError, match="power of two"):
        gguf_io.write_tensors(tmp_path / "a.gguf", x, "polar", {"general.alignment": np.uint32(48)})
    with pytest.raises(FileNotFoundError, match="output directory"):
        gguf_io.write_tensors(tmp_path / "nodir" / "a.gguf", x, "polar")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_temp_and_keeps_old_file(tmp_path, monkeypatch):
    out = tmp_path / "out.gguf"
    gguf_io.write_tensors(out, {"k": _x((2, 64))}, "polar")
    before = out.read_bytes()

    def broken(self, *, progress=False):
        self.write_ti_data_to_file()
        self.fout[0].write(b"\0" * 40)  # part of the data, then the disk "fills up"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="No space left"):
        gguf_io.write_tensors(out, {"k": _x((4, 128), 5)}, "polar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]
    assert out.read_bytes() == before

    def interrupted(self, *, progress=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gguf_io.write_tensors(tmp_path / "new.gguf", {"k": _x((2, 64))}, "polar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


def test_written_file_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = gguf_io.write_tensors(tmp_path / "a.gguf", {"k": _x((1, 64))}, "polar")
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------------------------
# Reading truncated and corrupt files


def _one_polar(tmp_path) -> tuple[bytes, gguf_scan.Layout]:
    p = gguf_io.write_tensors(tmp_path / "src.gguf", {"k": _x((4, 128))}, "polar", {"kvpolar.note": "abcdef"})
    return p.read_bytes(), gguf_scan.scan(p)


def _cut_points(lay: gguf_scan.Layout) -> dict[str, int]:
    t = lay.tensors[0]
    return {
        "empty": 0,
        "magic": 3,
        "header": 13,
        "header_end": 24,
        "kv_key": lay.kv["kvpolar.note"].offset + 10,
        "kv_value": lay.kv["kvpolar.note"].offset + 8 + len("kvpolar.note") + 4 + 9,
        "tensor_info": t.info_offset + 9,
        "tensor_dims": t.info_offset + 8 + 1 + 4 + 3,
        "before_data": lay.data_offset,
        "data": t.offset + t.nbytes // 2,
        "last_byte": t.offset + t.nbytes - 1,
    }


CUTS = ["empty", "magic", "header", "header_end", "kv_key", "kv_value", "tensor_info", "tensor_dims"]
CUTS += ["before_data", "data", "last_byte"]


@pytest.mark.parametrize("where", CUTS)
def test_truncated_files_raise_clear_errors(tmp_path, where):
    data, lay = _one_polar(tmp_path)
    cut = _cut_points(lay)[where]
    assert 0 <= cut < len(data)
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:cut])
    for fn in (gguf_io.read_tensors, gguf_scan.scan, gguf_scan.summary):
        with pytest.raises(GGUFFormatError, match=re.escape(str(bad))) as ei:
            fn(bad)
        msg = str(ei.value)
        assert "truncated" in msg and "\n" not in msg, msg
        assert re.search(r"(needs|expected|at least) .*found (a file of )?\d+", msg), msg
    assert isinstance(ei.value, ValueError)


def _patched(data: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def test_corrupt_files_raise_clear_errors(tmp_path):
    data, lay = _one_polar(tmp_path)
    t = lay.tensors[0]
    type_at = t.info_offset + 8 + 1 + 4 + 8 * 2  # name length, "k", n_dims, ne[0..1]
    assert struct.unpack_from("<I", data, type_at)[0] == 43
    note = lay.kv["kvpolar.note"].offset
    cases = {
        "magic": (
            _patched(data, 0, "4s", b"GGUG"),
            r"not a GGUF file: expected magic b'GGUF', found b'GGUG'",
        ),
        "version": (_patched(data, 4, "<I", 7), r"unsupported GGUF version 7; expected one of \[2, 3\]"),
        "type id": (
            _patched(data, type_at, "<I", 99),
            r"tensor 'k' has ggml type id 99, which is not a known type",
        ),
        "type id 42": (_patched(data, type_at, "<I", 42), r"type id 42.*knows ids 0\.\.3[0-9]?, .*43\.\.44"),
        "tensor count": (_patched(data, 8, "<Q", 1 << 40), r"declares 1099511627776 tensors"),
        "kv count": (_patched(data, 16, "<Q", 1 << 62), r"key/value pairs \(at least"),
        "n_dims": (
            _patched(data, t.info_offset + 9, "<I", 9),
            r"tensor 'k' has 9 dimensions, expected at most 4",
        ),
        "ne0": (
            _patched(data, t.info_offset + 13, "<Q", 100),
            r"ne\[0\] = 100\), expected ne\[0\] a multiple of its block size 64",
        ),
        "offset": (_patched(data, type_at + 4, "<Q", 32), r"data offset 32, expected 0"),
        "value type": (
            _patched(data, note + 8 + 12, "<I", 77),
            r"metadata key 'kvpolar.note' has value type 77",
        ),
        "key length": (_patched(data, note, "<Q", 1 << 50), r"length of key|key of metadata entry"),
        "scale": (_patched(data, t.offset, "<H", 0x7C00), r"tensor 'k' \(polar\): block 0 has scale d = inf"),
    }
    bad = tmp_path / "bad.gguf"
    for name, (blob, pattern) in cases.items():
        bad.write_bytes(blob)
        with pytest.raises(GGUFFormatError, match=re.escape(str(bad))) as ei:
            gguf_io.read_tensors(bad, decode=name != "scale")
        assert re.search(pattern, str(ei.value)), (name, str(ei.value))


def test_huge_array_length_is_bounded_not_looped(tmp_path):
    """gguf-py's reader would walk 2^60 elements past EOF; scan refuses at once."""
    p = gguf_io.write_tensors(tmp_path / "a.gguf", {"k": _x((1, 64))}, "polar", {"ids": [1, 2, 3]})
    lay = gguf_scan.scan(p)
    at = lay.kv["ids"].offset + 8 + len("ids") + 4 + 4  # key, value type, element type
    p.write_bytes(_patched(p.read_bytes(), at, "<Q", 1 << 60))
    t0 = time.perf_counter()
    with pytest.raises(
        GGUFFormatError, match=r"value of 'ids'.*declares 1152921504606846976 elements of INT32"
    ):
        gguf_io.read_gguf(p)
    assert time.perf_counter() - t0 < 1.0


def test_missing_and_directory_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        gguf_io.read_tensors(tmp_path / "none.gguf")
    with pytest.raises(IsADirectoryError):
        gguf_io.read_tensors(tmp_path)


# ----------------------------------------------------------------------------------------------
# gguf-dump


def _dump(args: list[str], register: bool) -> subprocess.CompletedProcess:
    code = "import kvpolar.gguf_types\n" if register else ""
    code += "import sys\nfrom gguf.scripts import gguf_dump\n"
    code += "sys.argv = ['gguf-dump', *sys.argv[1:]]\ngguf_dump.main()\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)


def test_gguf_dump_prints_polar_types(tmp_path):
    p = tmp_path / "two.gguf"
    gguf_io.write_tensors(
        p,
        {
            "k": gguf_io.encode_tensor("k", _x((2, 128)), "polar"),
            "v": gguf_io.encode_tensor("v", _x((2, 64)), "polar3"),
        },
        None,
    )
    r = _dump([str(p)], register=True)
    assert r.returncode == 0, r.stderr
    assert re.search(r"\|\s+128,\s+2,\s+1,\s+1 \| POLAR\s+\| k$", r.stdout, re.M), r.stdout
    assert re.search(r"\| POLAR3\s+\| v$", r.stdout, re.M), r.stdout
    # The limit of registering at import: a process without kvpolar does not know id 43.
    r = _dump([str(p)], register=False)
    assert r.returncode != 0 and re.search(r"\b43\)? is not a valid GGMLQuantizationType", r.stderr)
