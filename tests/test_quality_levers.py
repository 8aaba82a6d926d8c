"""Issue 12, levers 2 and 3 in the patched llama.cpp (patch 0012, docs/quality-levers.md).

- The online K offset is weighted toward the first key (the attention sink):
  mu = (1 - w) mean + w k_0 (LLAMA_KV_CENTER_SINK=w, default 0.25).
- K balancing (on by default, LLAMA_KV_BALANCE=0 turns it off): the cache stores D (k - mu) and
  the query is multiplied by D^-1, D a power of two per KV head and RoPE pair, measured with the
  online offsets from the first ubatch. Exact: with an f16 cache the logits must not change at
  all, also after a K shift; the factors travel with the state.

The numpy tests check the study's factors (scripts/quality_levers.py) the same way.
"""

from __future__ import annotations

import numpy as np
import pytest

from kv_llama import k_shift_logits, logits, new_llama, prompted, restored_logits
from quality_levers import _exact_at, _top_mass, _top_score, k_factors, pair_ids
from study import AttentionRef

N_LAYER, N_EMBD_KV = 30, 192  # SmolLM2-135M: 3 KV heads x 64, RoPE pairs (2i, 2i+1)
CENTER_MAGIC = b"PVCK" + N_LAYER.to_bytes(4, "little")  # llama_kv_cache::state_write_center
BALANCE_MAGIC = b"PVCB" + N_LAYER.to_bytes(4, "little")


# ----------------------------------------------------------------------------------------------
# numpy: the study's factors


def test_sinks_study_helpers():
    """--sinks: the most-attended keys are found per KV head, and keeping keys exact puts back exactly
    those rows, so their error (and only theirs) goes away."""
    rng = np.random.default_rng(0)
    hkv, rep, t, d = 2, 2, 32, 8
    q = rng.standard_normal((hkv * rep, t, d))
    k = rng.standard_normal((hkv, t, d))
    k[0, 5] = q[0, -1] * 8  # head 0: token 5 takes most of the last query's attention
    k[1, 9] = q[2, -1] * 8
    ref = AttentionRef(q, k, rng.standard_normal((hkv, t, d)), np.array([t - 1]))
    top = _top_mass(ref, 1)
    assert [int(x[0]) for x in top] == [5, 9]
    kh = k + 0.1 * rng.standard_normal(k.shape)
    fixed = _exact_at(kh, k, [np.arange(3), np.array([9])])
    assert np.array_equal(fixed[0, :3], k[0, :3]) and np.array_equal(fixed[1, 9], k[1, 9])
    assert np.array_equal(fixed[0, 3:], kh[0, 3:]) and np.array_equal(fixed[1, :9], kh[1, :9])
    assert not np.array_equal(kh[0, :3], k[0, :3])  # the input is not changed in place
    assert ref.k_sums(_exact_at(kh, k, top))["kl"] < ref.k_sums(kh)["kl"]
    score = np.array([[0.0, 5.0, 1.0, 7.0], [3.0, 0.0, 2.0, 1.0]])
    assert [list(i) for i in _top_score(score, 2)] == [[0, 1, 3], [0, 2]]  # token 0 always


@pytest.mark.parametrize("pairing", ["norm", "neox"])
def test_study_factors_are_exact_and_tied(pairing):
    rng = np.random.default_rng(1)
    hq, hkv, t, d = 6, 2, 200, 64
    q = (rng.normal(size=(hq, t, d)) * rng.uniform(0.1, 8, d)).astype(np.float32)
    k = (rng.normal(size=(hkv, t, d)) * rng.uniform(0.1, 8, d) + 3).astype(np.float32)
    mu = k.mean(1, keepdims=True).astype(np.float64)
    D = k_factors(q, k, mu, pairing)[:, 0]  # (hkv, d)
    lg = np.log2(D)
    assert np.array_equal(lg, np.round(lg)) and np.abs(lg).max() <= 8 and lg.std() > 0.5
    pid = pair_ids(d, pairing)
    for p in range(d // 2):
        a, b = np.flatnonzero(pid == p)
        assert np.array_equal(D[:, a], D[:, b])
    # (q / D) . (D k) == q . k, bit for bit in float32
    g = hq // hkv
    for h in range(hq):
        dk = D[h // g].astype(np.float32)
        assert np.array_equal((q[h] / dk) @ (k[h // g] * dk).T, q[h] @ k[h // g].T)


# ----------------------------------------------------------------------------------------------
# the patched llama.cpp (llama-cpp-python binding on the build)


def section(state: bytes, magic: bytes, n: int) -> tuple[int, np.ndarray] | None:
    """(offset, [N_LAYER, n] f32) of a per-layer block of the state; None when absent."""
    i = state.find(magic)
    if i < 0:
        return None
    i += len(magic)
    start, rows = i, []
    for _ in range(N_LAYER):
        assert int.from_bytes(state[i : i + 4], "little") == n
        rows.append(np.frombuffer(state[i + 4 : i + 4 + 4 * n], dtype=np.float32))
        i += 4 + 4 * n
    return start, np.stack(rows)


def offsets(state: bytes) -> np.ndarray:
    s = section(state, CENTER_MAGIC, N_EMBD_KV)
    assert s is not None, "the state carries no K offsets"
    return s[1]


def factors(state: bytes) -> np.ndarray | None:
    """[N_LAYER, 2, N_EMBD_KV]: D and D^-1 of every layer, None when the state has none."""
    s = section(state, BALANCE_MAGIC, 2 * N_EMBD_KV)
    return None if s is None else s[1].reshape(N_LAYER, 2, N_EMBD_KV)


def with_factors(state: bytes, f: np.ndarray) -> bytes:
    start = state.find(BALANCE_MAGIC) + len(BALANCE_MAGIC)
    out = bytearray(state)
    for il in range(N_LAYER):
        i = start + il * (4 + 8 * N_EMBD_KV) + 4
        out[i : i + 8 * N_EMBD_KV] = f[il].astype(np.float32).tobytes()
    return bytes(out)


@pytest.mark.build
def test_factors_in_state_are_powers_of_two_per_rope_pair(llama_cpp, kv_env, smollm2_path, tokens):
    prompt, _, _ = tokens
    kv_env()  # on by default
    llm = new_llama(llama_cpp, smollm2_path)
    llm.eval(prompt)
    f = factors(llm.save_state().llama_state)
    assert f is not None, "polar K: the state carries no balancing factors"
    D, Dinv = f[:, 0], f[:, 1]
    lg = np.log2(D)
    assert np.array_equal(lg, np.round(lg)) and np.abs(lg).max() <= 8
    assert np.array_equal(D * Dinv, np.ones_like(D))
    assert np.array_equal(D[:, 0::2], D[:, 1::2])  # llama RoPE pairs (2i, 2i+1)
    assert (D != 1).mean() > 0.01, "balancing measured nothing"  # SmolLM2: mostly layer 0
    kv_env(LLAMA_KV_BALANCE="0")
    llm = new_llama(llama_cpp, smollm2_path)
    llm.eval(prompt)
    assert factors(llm.save_state().llama_state) is None


@pytest.mark.build
def test_balancing_is_exact_with_f16_cache(llama_cpp, kv_env, smollm2_path, tokens):
    """Powers of two: q/D and D (k - mu) are exact in f32 and f16, so are the logits."""
    prompt, cont, _ = tokens
    out = {}
    for bal in ("0", "1"):
        kv_env(LLAMA_KV_CENTER="1", LLAMA_KV_BALANCE=bal)
        llm = new_llama(llama_cpp, smollm2_path, ctk="f16")
        llm.eval(prompt)
        f = factors(llm.save_state().llama_state)
        assert (f is not None) == (bal == "1")
        llm.eval(cont)
        out[bal] = logits(llama_cpp, llm)
    assert np.array_equal(out["0"], out["1"])


@pytest.mark.build
def test_k_shift_keeps_balancing_exact(llama_cpp, kv_env, smollm2_path, tokens):
    """K shift rotates D (k - mu) as R(D k) - D mu: D is one factor per RoPE pair, so R(D k) = D R(k)
    exactly; with an f16 cache the shifted run equals the unbalanced one bit for bit."""
    prompt, cont, _ = tokens
    out = {}
    for bal in ("0", "1"):
        kv_env(LLAMA_KV_CENTER="1", LLAMA_KV_BALANCE=bal)
        out[bal] = k_shift_logits(llama_cpp, new_llama(llama_cpp, smollm2_path, ctk="f16"), prompt, cont)
    assert np.array_equal(out["0"], out["1"])


@pytest.mark.build
def test_factors_survive_state_restore(llama_cpp, kv_env, smollm2_path, tokens):
    prompt, cont, _ = tokens
    kv_env(LLAMA_KV_BALANCE="1")
    llm, state = prompted(llama_cpp, smollm2_path, prompt)
    f = factors(state.llama_state)
    llm.eval(cont)
    want = logits(llama_cpp, llm)

    assert np.array_equal(restored_logits(llama_cpp, smollm2_path, state, cont), want)

    # the state's factors are what the restored cache uses: D^-1 on the query doubled -> other logits
    g = f.copy()
    g[:, 1] *= 2
    state.llama_state = with_factors(state.llama_state, g)
    assert np.abs(restored_logits(llama_cpp, smollm2_path, state, cont) - want).max() > 0.05

    # a context that does not balance refuses balanced keys
    kv_env(LLAMA_KV_BALANCE="0")
    llm4 = new_llama(llama_cpp, smollm2_path)
    with pytest.raises(RuntimeError, match="Failed to set llama state data"):
        llm4.load_state(state)


@pytest.mark.build
def test_offset_weighted_toward_first_key(llama_cpp, kv_env, smollm2_path, tokens):
    """mu(w) = (1 - w) mean + w k_0: mu(1) is the first key (it depends on the first token only).

    With an f16 cache (centering on) the offsets change the keys of later layers only through f16
    rounding; layer 0 sees the same keys in every run."""
    prompt, _, other = tokens
    mu = {}
    for w in ("0", "0.25", "1", None):
        kv_env(LLAMA_KV_CENTER="1", **({} if w is None else {"LLAMA_KV_CENTER_SINK": w}))
        llm = new_llama(llama_cpp, smollm2_path, ctk="f16")
        llm.eval(prompt)
        mu[w] = offsets(llm.save_state().llama_state).astype(np.float64)
    assert np.array_equal(mu[None], mu["0.25"])  # the default
    want = 0.75 * mu["0"] + 0.25 * mu["1"]
    scale = np.abs(mu["0"]).max()
    assert np.abs(mu["0.25"][0] - want[0]).max() < 1e-6 * scale
    assert np.abs(mu["0.25"] - want).max() < 2e-2 * scale
    assert np.abs(mu["1"] - mu["0"]).max() > 0.5

    # the same first token, other tokens after it: the same k_0
    kv_env(LLAMA_KV_CENTER="1", LLAMA_KV_CENTER_SINK="1")
    llm = new_llama(llama_cpp, smollm2_path, ctk="f16")
    llm.eval([prompt[0], *other[: len(prompt) - 1]])
    assert np.array_equal(offsets(llm.save_state().llama_state), mu["1"].astype(np.float32))


@pytest.mark.build
def test_bad_settings_are_refused(llama_cpp, kv_env, smollm2_path):
    """Out of range, and mistyped (patch 0023: parsed whole, where atoi/atof made "auto" or "on" 0)."""
    for env in (
        {"LLAMA_KV_CENTER_SINK": "2"},
        {"LLAMA_KV_BALANCE": "-1"},
        {"LLAMA_KV_CENTER_SINK": "auto"},
        {"LLAMA_KV_BALANCE": "on"},
        {"LLAMA_KV_CENTER": "yes"},
        {"LLAMA_KV_CENTER_V": "2"},
        {"LLAMA_KV_CENTER_ONLINE": "true"},
        {"LLAMA_KV_EXACT_SINK": "on"},
    ):
        kv_env(**env)
        with pytest.raises(ValueError):
            new_llama(llama_cpp, smollm2_path)


# ----------------------------------------------------------------------------------------------
# the kld subcommand on the stand-in llama-perplexity (tests/fake_perplexity.py: the fixture fake_bin)


def test_kld_fa_off_runs_the_measured_settings_without_flash_attention(
    tmp_path, fake_bin, monkeypatch, capsys
):
    """--fa off: the measured runs get -fa off (the base logits stay -fa on); the rows and table say so."""
    import json

    import quality_levers

    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "log.jsonl"))
    monkeypatch.setattr(quality_levers, "data_file", lambda name: tmp_path / str(name))
    out = tmp_path / "kld.json"
    argv = ["kld", "--bin", str(fake_bin), "--model", "smollm2-135m", "--set", "ktypes"]
    assert quality_levers.main([*argv, "--fa", "off", "--work", str(tmp_path / "w"), "--json", str(out)]) == 0
    calls = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    fa = [c[c.index("-fa") + 1] for c in calls]
    assert fa == ["on", "off", "off"]  # base, then polar/f16 and polar3/f16
    rows = json.loads(out.read_text())["rows"]
    want = [("polar", "off", 0.015), ("polar3", "off", 0.075)]  # the stand-in's KLD: (K's + V's) / 2
    assert [(r["ctk"], r["fa"], r["kld"]) for r in rows] == want
    assert "(default) `-fa off` | 0.0150" in capsys.readouterr().out


def test_kld_layout_runs_the_chunks_as_several_sequences(tmp_path, fake_bin, monkeypatch, capsys):
    """--layout: each setting once a chunk at a time (-b = -c), then with a cache for 4 sequences, a
    stream each (-b = 4 x -c) and one unified stream (-kvu); the base logits are made once, a chunk at a
    time. The rows, the table and the JSON's command say which."""
    import json

    import quality_levers

    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "log.jsonl"))
    monkeypatch.setattr(quality_levers, "data_file", lambda name: tmp_path / str(name))
    out = tmp_path / "kld.json"
    argv = ["kld", "--bin", str(fake_bin), "--model", "smollm2-135m", "--set", "ktypes"]
    argv += ["--only", "polar/f16", "--layout", "single", "streams", "unified"]
    argv += ["--work", str(tmp_path / "w"), "--json", str(out)]
    assert quality_levers.main(argv) == 0
    calls = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(c[c.index("-b") + 1], "-kvu" in c) for c in calls] == [
        ("2048", False),  # the base
        ("2048", False),
        ("8192", False),
        ("8192", True),
    ]
    res = json.loads(out.read_text())
    assert [r.get("layout") for r in res["rows"]] == [None, "streams", "unified"]
    assert res["command"] == "python3 scripts/quality_levers.py " + " ".join(argv)
    assert res["build"] is None  # the stand-in has no kvpolar-build.json
    text = capsys.readouterr().out
    assert "(default) (a cache for 4 sequences, a stream each) |" in text
    assert "(default) (a cache for 4 sequences, one unified stream) |" in text


def test_kld_base_interrupted_leaves_no_base(tmp_path, fake_bin, monkeypatch):
    """A base run that dies while writing its logits leaves no base file that a later run would take for
    whole: the logits are written under another name and renamed when the run succeeded."""
    import quality_levers

    monkeypatch.setattr(quality_levers, "data_file", lambda name: tmp_path / str(name))
    monkeypatch.setenv("FAKE_PPL", "partial")
    work = tmp_path / "w"
    with pytest.raises(RuntimeError, match="llama-perplexity failed"):
        quality_levers.kld_base(fake_bin, "smollm2-135m", 4, work)
    assert not (work / "smollm2-135m-4.kld").exists()
    monkeypatch.setenv("FAKE_PPL", "ok")
    base = quality_levers.kld_base(fake_bin, "smollm2-135m", 4, work)
    assert base == work / "smollm2-135m-4.kld" and base.read_bytes() == b"logits"


def test_kld_text_tail_reads_the_second_half(tmp_path, fake_bin, monkeypatch):
    """--text tail: the base and the rows read SQuAD's second half (from a line start), the base gets
    its own name, and the JSON says which text."""
    import json

    import quality_levers
    from kvpolar.paths import SQUAD_TXT

    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "log.jsonl"))
    monkeypatch.setattr(quality_levers, "data_file", lambda name: tmp_path / str(name))
    (tmp_path / str(SQUAD_TXT)).write_text("".join(f"line {i}\n" for i in range(10)))
    out = tmp_path / "kld.json"
    work = tmp_path / "w"
    argv = ["kld", "--bin", str(fake_bin), "--model", "smollm2-135m", "--set", "ktypes"]
    argv += ["--only", "polar/f16", "--text", "tail", "--work", str(work), "--json", str(out)]
    assert quality_levers.main(argv) == 0
    calls = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [c[c.index("-f") + 1] for c in calls] == [str(work / "squad-tail.txt")] * 2
    assert calls[0][calls[0].index("--kl-divergence-base") + 1].endswith("smollm2-135m-tail-4.kld.part")
    # from the line start after the midpoint
    assert (work / "squad-tail.txt").read_text() == "".join(f"line {i}\n" for i in range(6, 10))
    assert json.loads(out.read_text())["text"] == "squad second half"


def test_kld_vxform_set_names_each_models_matrices(tmp_path, fake_bin, monkeypatch):
    """--set vxform (session 30's measurement build): LLAMA_KV_VXFORM is the row's model's folder of
    `vtransform-files` under --work, in the run and in the row."""
    import json

    import quality_levers

    monkeypatch.setenv("FAKE_ENV_LOG", str(tmp_path / "env.jsonl"))
    monkeypatch.setattr(quality_levers, "data_file", lambda name: tmp_path / str(name))
    work = tmp_path / "w"
    out = tmp_path / "kld.json"
    argv = ["kld", "--bin", str(fake_bin), "--model", "smollm2-135m", "qwen2.5-coder-1.5b", "--set", "vxform"]
    argv += ["--only", "polar/polar", "--work", str(work), "--json", str(out)]
    assert quality_levers.main(argv) == 0
    seen = [
        json.loads(line).get("LLAMA_KV_VXFORM") for line in (tmp_path / "env.jsonl").read_text().splitlines()
    ]
    want = [None]  # each model: the base, the plain row, then a row per variant
    for m in ("smollm2-135m", "qwen2.5-coder-1.5b"):
        want = [*want, None, f"{work}/vxform/{m}/klt-1_4", f"{work}/vxform/{m}/diag-1_4"]
    want.insert(4, None)  # Qwen's base
    assert seen == want
    rows = json.loads(out.read_text())["rows"]
    assert [r["env"].get("LLAMA_KV_VXFORM") for r in rows] == [
        w for i, w in enumerate(want) if i not in (0, 4)
    ]


def test_vtransform_files_refuses_a_bad_calibration_window(capsys):
    import quality_levers

    with pytest.raises(SystemExit) as e:
        quality_levers.main(["vtransform-files", "--calib", "2"])
    assert e.value.code == 2
    assert "vtransform-files --calib: must be in 3..1024 (--seq-len), got 2" in capsys.readouterr().err


def test_changes_against_the_default_rows_and_the_band(tmp_path, capsys):
    """`changes`: each row with an environment against its setting's default row (from any file given), and
    the rows whose environment matches --band pooled per setting."""
    import json

    import quality_levers

    def row(kld, env=None, ctv="polar3"):
        return {"model": "m", "ctk": "polar", "ctv": ctv, "env": env or {}, "fa": "on", "kld": kld}

    a = {"rows": [row(0.04), row(0.03, ctv="polar"), row(0.05, {"X": "rand-1"}), row(0.036, {"X": "klt"})]}
    b = {"rows": [row(0.03, {"X": "rand-2"}), row(0.033, {"X": "other"}, ctv="polar")]}
    for name, res in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(res))
    argv = ["changes", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--band", "^rand"]
    assert quality_levers.main(argv) == 0
    out = capsys.readouterr().out
    assert "| m | polar / polar3 | `X=rand-1` | 0.050000 | +25.0 % |" in out
    assert "| m | polar / polar3 | `X=klt` | 0.036000 | -10.0 % |" in out
    assert "| m | polar / polar | `X=other` | 0.033000 | +10.0 % |" in out  # against its own default
    assert "| m | polar / polar3 | 2 | +0.0 % | 35.4 % | -25.0 % | +25.0 % |" in out
    (tmp_path / "c.json").write_text(json.dumps(b))
    with pytest.raises(SystemExit, match="no default row"):
        quality_levers.main(["changes", str(tmp_path / "c.json")])
