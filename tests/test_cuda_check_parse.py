"""scripts/cuda_llama_check.sh reads test-backend-ops logs: a failing case must count as failing.

test-backend-ops prints a failing case after its error on the same line ("[RESHAPE] ERR = ... >
...   LAYER_CHAINS(...): FAIL"). Until session 8 the check matched cases only at the start of a
line, so it counted such failures as absent and reported the rest "OK" (session 7's CENTER_SET_ROWS
and session 8's LAYER_CHAINS and FLASH_ATTN_EXT failures went unseen that way). The excerpt in
tests/data is a real log of the H200 run of session 8 (patch 0018 before its test tolerance).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "cuda_llama_check.sh"
EXCERPT = ROOT / "tests" / "data" / "test-backend-ops-LAYER_CHAINS-h200-session8-excerpt.log"
ESC = "\x1b"


def check(log: Path, want: str = "OK") -> tuple[int, str]:
    """Source the script's functions and run check_cases on log; (status, output)."""
    cmd = f'source "{SCRIPT}"; check_cases "{log}" "test" {want}; echo "status=$status"'
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=True).stdout
    return int(out.rsplit("status=", 1)[1]), out


def case(status: str, color: str = "32") -> str:
    return f"  SET_ROWS(type=polar,ne=[64,5,1,1]): {ESC}[1;{color}m{status}{ESC}[0m\n"


def test_real_log_with_failures_fails():
    status, out = check(EXCERPT)
    assert status == 1, out
    assert "FAIL" in out and "LAYER_CHAINS(type_k=polar,type_v=polar,d=64" in out, out


def test_error_prefixed_failure_is_counted(tmp_path):
    log = tmp_path / "log"
    failing = f"[SET_ROWS] ERR = 0.000000169 > 0.000000000 {case('FAIL', '31').lstrip()}"
    log.write_text(case("OK") + failing + case("OK"))
    status, out = check(log)
    assert status == 1 and "1 of 3 polar cases not OK" in out, out


def test_all_ok_passes(tmp_path):
    log = tmp_path / "log"
    log.write_text(case("OK") * 3 + f"  Backend CUDA0: {ESC}[1;32mOK{ESC}[0m\n")
    status, out = check(log)
    assert status == 0 and "ok: test: 3 polar cases OK" in out, out


def test_backend_summary_fail_alone_fails(tmp_path):
    log = tmp_path / "log"
    log.write_text(case("OK") * 2 + f"  Backend CUDA0: {ESC}[1;31mFAIL{ESC}[0m\n")
    status, out = check(log)
    assert status == 1 and "reports CUDA0 failing" in out, out


def test_support_query(tmp_path):
    log = tmp_path / "log"
    log.write_text("  FLASH_ATTN_EXT(type_K=polar): SUPPORTED\n  SET_ROWS(type=polar3): not supported\n")
    status, out = check(log, "SUPPORTED")
    assert status == 1 and "1 of 2 polar cases not OK" in out, out


def test_no_case_fails(tmp_path):
    log = tmp_path / "log"
    log.write_text("Testing 2 devices\n")
    status, out = check(log)
    assert status == 1 and "no polar case ran" in out, out


def kld_check(tmp_path, gpu: str, host: str, rel: str = "") -> tuple[int, str]:
    """Source the script and run kld_gpu_host with a stand-in llama-perplexity that prints the mean KLD
    `gpu`, or `host` when given -nkvo; (status, output)."""
    fake = tmp_path / "ppl.sh"
    line = 'echo "Mean    KLD:   {} ±   0.0001"'
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'for a in "$@"; do [[ $a == -nkvo ]] && {{ {line.format(host)}; exit; }}; done\n'
        f"{line.format(gpu)}\n"
    )
    fake.chmod(0o755)
    tol = f"KLD_REL_TOL={rel} " if rel else ""
    cmd = (
        f'source "{SCRIPT}"; OUTDIR="{tmp_path}"; base=b.kld; ppl=("{fake}" -c 2048); '
        f'{tol}kld_gpu_host polar-polar-streams "polar/polar, 4 sequences" -ctk polar -b 8192; '
        'echo "status=$status"'
    )
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=True).stdout
    return int(out.rsplit("status=", 1)[1]), out


def test_kld_gpu_host_within_tolerance(tmp_path):
    status, out = kld_check(tmp_path, "0.031285", "0.031100")
    assert status == 0 and "ok: polar/polar, 4 sequences: mean KLD on the GPU 0.031285" in out, out
    assert (tmp_path / "kld-polar-polar-streams-gpu.log").is_file()
    assert (tmp_path / "kld-polar-polar-streams-host.log").is_file()


def test_kld_gpu_host_apart_or_missing_fails(tmp_path):
    status, out = kld_check(tmp_path, "0.0320", "0.0310")
    assert status == 1 and "more than 0.0005 apart" in out, out
    # the failing line names both logs, which `gpu_run.sh collect` packs by their /tmp/gpu-run-check/ paths
    assert (
        f"logs: {tmp_path}/kld-polar-polar-streams-gpu.log {tmp_path}/kld-polar-polar-streams-host.log)"
        in out
    ), out
    status, out = kld_check(tmp_path, "", "0.0310")
    assert status == 1 and "GPU ''" in out, out


def test_kld_gpu_host_relative_tolerance(tmp_path):
    """KLD_REL_TOL (step 6's -fa off rows): within that share of the host's KLD where it exceeds 0.0005."""
    status, out = kld_check(tmp_path, "0.035432", "0.036104", rel="0.05")  # session 26's polar K, -fa off
    assert status == 0 and "ok:" in out, out
    status, out = kld_check(tmp_path, "0.052184", "0.036104", rel="0.05")  # session 24's, before patch 0038
    assert status == 1 and "more than 0.0018052 apart" in out, out
    status, out = kld_check(tmp_path, "0.0108", "0.0100", rel="0.05")  # 5 % of 0.01 is under 0.0005
    assert status == 1 and "more than 0.0005 apart" in out, out
    status, out = kld_check(tmp_path, "0.035432", "0.036104")  # without it: 0.0005
    assert status == 1 and "more than 0.0005 apart" in out, out


def test_step_time_line():
    """step_time prints the seconds the script has run (bash's SECONDS) when a step starts."""
    cmd = f'source "{SCRIPT}"; SECONDS=41; step_time 6'
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=True).stdout
    assert out.strip() in ("time: step 6 starts at 41 s", "time: step 6 starts at 42 s"), out


def test_fa_off_diag_reuses_the_check(tmp_path):
    """scripts/fa_off_diag.sh runs step 6's pair (kld_gpu_host, sourced from this script) per setting, with
    the setting in the environment of both runs, and test-backend-ops through check_cases; its exit status
    is the check's. Stand-in binaries: the GPU run of a polar K cache without flash attention reports a KLD
    0.016 above the host's unless LLAMA_KV_EXACT_SINK=0 (the shape of the session-24 failure)."""
    diag = SCRIPT.parent / "fa_off_diag.sh"
    b = tmp_path / "bin"
    b.mkdir()
    (b / "llama-perplexity").write_text(
        "#!/usr/bin/env bash\n"
        'host=0; polar=0; off=0; for a in "$@"; do [[ $a == -nkvo ]] && host=1; [[ $a == polar ]] && polar=1;'
        " [[ $a == off ]] && off=1; done\n"
        "kld=0.0361; if [[ $host == 0 && $polar == 1 && $off == 1 && ${LLAMA_KV_EXACT_SINK:-1} == 1 ]]; then"
        " kld=0.0522; fi\n"
        'echo "Mean    KLD:   $kld ±   0.0001"\n'
    )
    (b / "test-backend-ops").write_text(
        "#!/usr/bin/env bash\n"
        "op=; while [[ $# -gt 0 ]]; do [[ $1 == -o ]] && op=$2; shift; done\n"
        'echo "  $op(type=polar,d=64): OK"\n'
    )
    for f in b.iterdir():
        f.chmod(0o755)
    env = {
        "PATH": "/usr/bin:/bin",
        "BIN": str(b),
        "OUT": str(tmp_path),
        "DIAG_DIR": str(tmp_path / "diag"),
        "DIAG_BASE": str(tmp_path / "base.kld"),
    }
    r = subprocess.run(["bash", str(diag)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1, r
    assert "ok: test-backend-ops -o SET: 1 polar cases OK" in r.stdout, r.stdout
    assert "FAIL: polar-ub512: mean KLD on the GPU '0.0522' vs host attention '0.0361'" in r.stdout, r.stdout
    assert "ok: polar-off-nosink LLAMA_KV_EXACT_SINK=0: mean KLD on the GPU 0.0361" in r.stdout, r.stdout
    assert "ok: f16-ub512: mean KLD on the GPU 0.0361" in r.stdout, r.stdout
    for dropped in ("polar-off:", "polar3-off:", "f16-off:", "q40-off:", "polar-off-ub2048:"):
        assert dropped not in r.stdout, r.stdout  # the sweep's rows of the same runs
    assert (tmp_path / "diag.tgz").is_file()


def test_fa_off_diag_table_from_logs(tmp_path):
    """fa_off_diag.sh --table DIR: the ubatch sweep's gaps from the logs alone; a missing pair is named."""
    diag = SCRIPT.parent / "fa_off_diag.sh"
    (tmp_path / "kld-polar-ub512-gpu.log").write_text("Mean    KLD:   0.035432 ±   0.0001\n")
    (tmp_path / "kld-polar-ub512-host.log").write_text("Mean    KLD:   0.036104 ±   0.0001\n")
    r = subprocess.run(
        ["bash", str(diag), "--table", str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert "| polar | 512 | 0.035432 | 0.036104 | 0.000672 | 1.9 % |" in r.stdout, r.stdout
    assert "| f16 | 256 | - | - | missing | |" in r.stdout, r.stdout
    r = subprocess.run(["bash", str(diag), "--table", str(tmp_path / "none")], capture_output=True, text=True)
    assert r.returncode == 2 and "expected a folder" in r.stderr, r.stderr


STUB = """#!/usr/bin/env bash
# a test-backend-ops stand-in: one polar case for the op asked (-o), OK (test) or SUPPORTED (support)
mode=$1; shift
ops=SET_ROWS
while [[ $# -gt 0 ]]; do [[ $1 == -o ]] && ops=$2; shift; done
for op in ${ops//,/ }; do
    st=$STUB_STATUS
    [[ $mode == support ]] && st=SUPPORTED
    echo "  $op(type=polar): $st"
done
"""


def run_ops_only(
    tmp_path: Path, status: str, env_value: str = "1", model: str = "-"
) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "test-backend-ops"
    stub.write_text(STUB)
    stub.chmod(0o755)
    return subprocess.run(
        ["bash", str(SCRIPT), str(bin_dir), model, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "CHECK_OPS_ONLY": env_value, "STUB_STATUS": status},
    )


def test_ops_only_runs_steps_1_and_2_without_a_model(tmp_path):
    """CHECK_OPS_ONLY=1 (gpu_run.sh ops, a short lease): every test-backend-ops step and the support query,
    then a stop that names what was not run; no model and no llama-completion needed."""
    r = run_ops_only(tmp_path, "OK")
    assert r.returncode == 0, r
    for op in ("SET_ROWS", "CENTER_SET_ROWS", "LAYER_CHAINS", "CPY", "MUL_MAT", "SET", "FLASH_ATTN_EXT"):
        assert f"ok: test-backend-ops -o {op}: 1 polar cases OK" in r.stdout, r.stdout
    assert "ok: test-backend-ops support: 8 polar cases SUPPORTED" in r.stdout, r.stdout
    assert "steps 1-2 passed (CHECK_OPS_ONLY=1: steps 3-7, which run the model, not run" in r.stdout, r.stdout
    assert "step 3" not in r.stdout, r.stdout


def test_ops_only_fails_on_a_failing_case(tmp_path):
    r = run_ops_only(tmp_path, "FAIL")
    assert r.returncode == 1, r
    assert "FAIL: test-backend-ops -o SET_ROWS: 1 of 1 polar cases not OK" in r.stdout, r.stdout
    assert "steps 1-2 passed" not in r.stdout, r.stdout


def test_ops_only_value_checked_and_model_still_needed_without_it(tmp_path):
    r = run_ops_only(tmp_path, "OK", env_value="yes")
    assert r.returncode == 2, r
    assert "CHECK_OPS_ONLY must be 1 (steps 1-2 only) or 0/unset (every step), got 'yes'" in r.stderr, (
        r.stderr
    )
    r = run_ops_only(tmp_path, "OK", env_value="0", model="")
    assert r.returncode == 2, r
    assert "usage:" in r.stderr, r.stderr


COMPLETION_STUB = """#!/usr/bin/env bash
# a llama-completion stand-in: the same text for every run, and the host-cache warning on stderr
echo "Rome."
echo "cannot write a polar KV cache" >&2
"""


def run_model_only(tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("test-backend-ops", STUB), ("llama-completion", COMPLETION_STUB)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    return subprocess.run(
        ["bash", str(SCRIPT), str(bin_dir), str(model), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "STUB_STATUS": "OK", **env},
    )


def test_model_only_skips_steps_1_and_2(tmp_path):
    """CHECK_MODEL_ONLY=1 (gpu_run.sh checks after ops passed): no test-backend-ops case runs, the guard
    and the model steps do."""
    r = run_model_only(tmp_path, {"CHECK_MODEL_ONLY": "1"})
    assert "steps 1-2 not run (CHECK_MODEL_ONLY=1" in r.stdout, r.stdout
    assert "ok: test-backend-ops -o" not in r.stdout and "time: step 1 " not in r.stdout, r.stdout
    assert "time: step 3 starts" in r.stdout and "time: step 7 starts" in r.stdout, r.stdout
    full = run_model_only(tmp_path, {})
    assert "ok: test-backend-ops -o SET_ROWS: 1 polar cases OK" in full.stdout, full.stdout
    assert "steps 1-2 not run" not in full.stdout, full.stdout


def test_model_only_value_checked_and_exclusive_with_ops_only(tmp_path):
    r = run_model_only(tmp_path, {"CHECK_MODEL_ONLY": "yes"})
    assert r.returncode == 2, r
    want = "CHECK_MODEL_ONLY must be 1 (steps 3-7 only) or 0/unset (every step), got 'yes'"
    assert want in r.stderr, r.stderr
    r = run_model_only(tmp_path, {"CHECK_MODEL_ONLY": "1", "CHECK_OPS_ONLY": "1"})
    assert r.returncode == 2, r
    assert "exclude each other" in r.stderr, r.stderr
