"""scripts/gpu_run.sh (the steps of a llama.cpp GPU run) parses, and answers a missing or unknown
step with its usage and exit status 2 instead of running anything."""

from __future__ import annotations

import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_run.sh"


def test_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.parametrize("args", [[], ["nonsense"]])
def test_usage(args, tmp_path):
    r = subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 2, r
    assert "prepare" in r.stderr and "bench" in r.stderr, r.stderr


@pytest.mark.parametrize("passes", ["0", "two", "-1"])
def test_ab_passes_checked_first(passes, tmp_path):
    """A bad AB_PASSES is refused, naming it, before anything waits for models or a build."""
    r = subprocess.run(
        ["bash", str(SCRIPT), "ab", "targets"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin", "AB_PASSES": passes, "HOME": str(tmp_path)},
    )
    assert r.returncode == 2, r
    assert f"AB_PASSES must be a positive integer, got '{passes}'" in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["script"], "a script file"),
        (["script", "no/such/diagnosis.sh"], "a script file"),
        (["cupy"], "tests, bench, decode or issue11"),
        (["cupy", "nonsense"], "tests, bench, decode or issue11"),
    ],
)
def test_step_needs_its_argument(args, expected, tmp_path):
    """`script FILE` refuses a missing file, `cupy` anything but tests, bench, decode or issue11: each names
    what it got, before it waits for models or a build or looks for a wheel."""
    r = subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert r.returncode == 2, r
    got = args[1] if len(args) > 1 else ""
    assert f"gpu_run {args[0]}: expected {expected}, got '{got}'" in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("xbin", "gpu_run xbin: no xbin.part.a: carry .gpurun/x1 and .gpurun/x2 (one call each; "),
        ("xprepare", "gpu_run xprepare: no {G}/a: run prepare first (it remakes .gpurun)"),
        (
            "build",
            "gpu_run build: no gguf wheel for the CuPy tests: carry .gpurun/a from this version's prepare",
        ),
    ],
)
def test_cross_build_steps_need_their_folders(step, message, tmp_path):
    """xprepare needs prepare's folders, xbin the carried halves of the binaries, build (with the CuPy tests)
    the gguf wheel: each says so first."""
    g = tmp_path / "gpurun"
    g.mkdir()
    r = subprocess.run(
        ["bash", str(SCRIPT), step],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "OUT": str(tmp_path),
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "GPU_RUN_DIR": str(g),
            "GPU_RUN_PARTS": str(tmp_path / "parts"),
        },
    )
    assert r.returncode == 2, r
    assert message.format(G=g) in r.stderr, r.stderr


@pytest.mark.parametrize("where", ["a", "whl", None])
def test_parts_names_the_gguf_wheel(where, tmp_path):
    """The model and CuPy steps install the gguf wheel from whichever folder was carried (`parts` names it).
    With only .gpurun/a carried, the lookup must not end the script: in session 28 it did, with ls's status 2
    under pipefail, and `build` stopped after its harness."""
    g = tmp_path / "gpurun"
    g.mkdir()
    if where:
        (g / where).mkdir()
        (g / where / "gguf-0.19.0-py3-none-any.whl").write_bytes(b"")
    parts = tmp_path / "parts"
    r = subprocess.run(
        ["bash", str(SCRIPT), "parts"],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "OUT": str(tmp_path / "out"),
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "GPU_RUN_DIR": str(g),
            "GPU_RUN_PARTS": str(parts),
        },
    )
    assert r.returncode == 0, r
    want = {"a": parts / "gguf-0.19.0-py3-none-any.whl", "whl": g / "whl" / "gguf-0.19.0-py3-none-any.whl"}
    if where:
        assert f"gguf wheel: {want[where]}\n" in r.stdout, r.stdout
    else:
        assert "gguf wheel: none (carry .gpurun/a or .gpurun/whl)" in r.stdout, r.stdout


def _machine(tmp_path):
    """A GPU machine's run state after `build` finished and the models were unpacked, and a stand-in for
    cuda_llama_check.sh that records its switches and exits with $FAKE_CHECK_RC."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "gpu-run-build.log").write_text("llama.cpp built in 4.5 min\n")
    (state / "models.ok").write_text("")
    check = tmp_path / "check.sh"
    check.write_text(
        'echo "ops=${CHECK_OPS_ONLY:-0} model=${CHECK_MODEL_ONLY:-0} args=$*" >> "$FAKE_CHECK_LOG"\n'
        "exit ${FAKE_CHECK_RC:-0}\n"
    )
    env = {
        "OUT": str(tmp_path / "out"),
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "GPU_RUN_DIR": str(tmp_path / "gpurun"),
        "GPU_RUN_PARTS": str(tmp_path / "parts"),
        "GPU_RUN_STATE": str(state),
        "GPU_RUN_CHECK": str(check),
        "FAKE_CHECK_LOG": str(tmp_path / "check-calls.txt"),
    }
    return state, env


def _step(step, env, rc=0):
    r = subprocess.run(
        ["bash", str(SCRIPT), step],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "FAKE_CHECK_RC": str(rc)},
    )
    return r


def _checks_switches(state, env):
    """Run `checks` (which starts the check in the background) and wait for it: the stand-in's last line."""
    r = _step("checks", env)
    assert r.returncode == 0, r
    log = state / "gpu-run-check.log"
    deadline = time.monotonic() + 30
    while "check rc=" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "the background check did not end"
        time.sleep(0.1)
    assert "check rc=0" in log.read_text()
    return Path(env["FAKE_CHECK_LOG"]).read_text().splitlines()[-1], r.stdout


def _key(env):
    return subprocess.run(
        ["python3", "scripts/bootstrap.py", "key"],
        cwd=SCRIPT.parents[1],
        capture_output=True,
        text=True,
        check=True,
        env={**env, "KVPOLAR_CUDA": "1", "KVPOLAR_CUDA_ARCHS": env.get("KVPOLAR_CUDA_ARCHS", "90")},
    ).stdout.strip()


def test_ops_marker_lets_checks_skip_steps_1_2(tmp_path):
    """A passing `ops` writes the build key it passed on; `checks` on that build then runs steps 3-7 only."""
    state, env = _machine(tmp_path)
    r = _step("ops", env)
    assert r.returncode == 0, r
    assert Path(env["FAKE_CHECK_LOG"]).read_text().splitlines() == [
        f"ops=1 model=0 args=build/bin - {state}/gpu-run-ops"
    ]
    assert (state / "gpu-run-ops.ok").read_text().strip() == _key(env)
    line, out = _checks_switches(state, env)
    assert line == f"ops=0 model=1 args=build/bin /tmp/smol.gguf {state}/gpu-run-check", line
    assert "ops passed on this build" in out


def test_failed_ops_leaves_no_marker(tmp_path):
    """`ops` that fails removes an earlier marker, and `checks` runs every step."""
    state, env = _machine(tmp_path)
    (state / "gpu-run-ops.ok").write_text(_key(env) + "\n")
    r = _step("ops", env, rc=1)
    assert r.returncode == 1, r
    assert not (state / "gpu-run-ops.ok").exists()
    line, out = _checks_switches(state, env)
    assert line.startswith("ops=0 model=0 "), line
    assert "ops passed" not in out


def test_marker_of_another_build_is_ignored(tmp_path):
    """A marker left by `ops` on a build of another key (another tree built on the same machine since) does
    not let `checks` skip steps 1-2."""
    state, env = _machine(tmp_path)
    (state / "gpu-run-ops.ok").write_text("0123456789abcdef\n")
    line, out = _checks_switches(state, env)
    assert line.startswith("ops=0 model=0 "), line
    assert "ops passed" not in out


def test_usage_is_the_whole_header(tmp_path):
    """The usage printed for a missing step is the script's whole header comment, its last line included."""
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env={"OUT": str(tmp_path)})
    assert r.returncode == 2
    assert r.stderr.rstrip().endswith("# step failed (bench: when a benchmark script failed).")
    assert "gpu_run.sh cupy tests" in r.stderr


FAKE_PYTHON = """#!/bin/bash
# a stand-in python3: pip succeeds; scripts/bench_gpu.py logs its arguments and writes its --json file
if [[ $1 == -m ]]; then exit 0; fi
echo "$*" >> "$FAKE_LOG"
while [[ $# -gt 0 ]]; do
    if [[ $1 == --json ]]; then echo '{}' > "$2"; fi
    shift
done
echo "measured"
"""


def _issue11(tmp_path, *args):
    bin_dir, out, runs = tmp_path / "bin", tmp_path / "out", tmp_path / "gpurun"
    for d in (bin_dir, out, runs / "whl"):
        d.mkdir(parents=True)
    (runs / "whl" / "gguf-0.1-py3-none-any.whl").write_text("")
    fake = bin_dir / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {
        "OUT": str(out),
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "GPU_RUN_DIR": str(runs),
        "GPU_RUN_PARTS": str(tmp_path / "parts"),
        "FAKE_LOG": str(tmp_path / "log"),
    }
    r = subprocess.run(
        ["bash", str(SCRIPT), "cupy", "issue11", *args], capture_output=True, text=True, timeout=60, env=env
    )
    log = (tmp_path / "log").read_text().splitlines() if (tmp_path / "log").exists() else []
    return r, out, log


def test_cupy_issue11_runs_the_measurements_in_order(tmp_path):
    """`cupy issue11`: compare, scaling, tune-mma's depth and ctas phases, anatomy, encode, in that order,
    each with its JSON, which are packed in one archive; a budget too small for a step skips it, says so
    and fails."""
    r, out, log = _issue11(tmp_path)
    assert r.returncode == 0, r.stderr
    assert [line.split()[1] for line in log] == ["compare", "scaling", "tune-mma", "anatomy", "encode"]
    assert "--phases depth ctas" in log[2] and f"--json {out}/issue11-compare.json" in log[0]
    assert "--batches 2 4 8 16" in log[1]
    with tarfile.open(out / "issue11-json.tgz") as t:
        assert sorted(t.getnames()) == [
            f"issue11-{n}.json" for n in ("anatomy", "compare", "encode", "scaling", "tune")
        ]
    assert not list(out.glob("issue11-*.json")) and (out / "issue11-tune.txt").read_text() == "measured\n"
    r, out, log = _issue11(tmp_path / "short", "10")
    assert r.returncode == 1 and log == []
    assert "compare skipped, 10 s of 10 left" in (out / "issue11-compare.txt").read_text()
    r, _, _ = _issue11(tmp_path / "bad", "ten")
    assert r.returncode == 2 and "expected SECONDS (an integer), got 'ten'" in r.stderr
