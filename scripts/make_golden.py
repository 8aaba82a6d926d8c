"""Write tests/data/golden.json: input blocks and their expected polar/polar3 bytes.

    python scripts/make_golden.py

The bytes come from the numpy reference (kvpolar.codec); the C and GPU encoders are tested
against this file, and tests/test_codec.py re-derives every entry with an independent
brute-force encoder. Regenerate only when docs/FORMAT.md changes on purpose.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kvpolar import codec, format
from kvpolar.atomic import atomic_write_text

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden.json"


def golden_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    f32 = np.float32
    cases = {
        "gaussian": rng.standard_normal((6, 64)).astype(f32),
        "heavy_tailed": rng.standard_t(2.0, (3, 64)).astype(f32),
        "offset": (rng.standard_normal((2, 64)) + 40 * (np.arange(64) % 7 == 3)).astype(f32),
        "zeros": np.zeros((1, 64), f32),
        "one_nonzero": np.eye(1, 64, 17, dtype=f32) * f32(3.5),
        "tiny": (rng.standard_normal((1, 64)) * 1e-6).astype(f32),
        "subnormal": (rng.standard_normal((1, 64)) * 1e-39).astype(f32),
        "huge": (rng.standard_normal((1, 64)) * 1e30).astype(f32),
        "fp16_edge": (rng.standard_normal((1, 64)) * 7e4).astype(f32),
        "nonfinite": np.array([[np.nan, np.inf, -np.inf] + [1.0] * 61], f32),
        "constant": np.full((1, 64), 0.25, f32),
    }
    t = format.tables("polar")
    pts = np.stack([t.cx, t.cy], 1)[rng.integers(0, 256, 32)]
    cases["codebook_points"] = (pts.reshape(1, 64) * f32(2.0)).astype(f32)
    return cases


def main() -> int:
    doc = {"format_doc": "docs/FORMAT.md", "cases": []}
    for name, x in golden_inputs().items():
        for i, row in enumerate(x):
            entry = {"name": f"{name}[{i}]", "x": [float(v).hex() for v in row.astype(np.float64)]}
            for fmt in format.FORMATS:
                entry[fmt] = codec.quantize_blocks(row[None], fmt)[0].tobytes().hex()
            doc["cases"].append(entry)
    atomic_write_text(OUT, json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT} ({len(doc['cases'])} blocks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
