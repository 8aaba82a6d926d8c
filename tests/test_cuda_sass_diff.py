"""scripts/cuda_sass_diff.sh and scripts/ggml_cuda_nvcc.sh refuse what they cannot do, naming what they
expected (the compile itself needs nvcc and a patched tree: run by hand, docs/results-cuda.md session 15)."""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "cuda_sass_diff.sh"


def _run(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env)


def test_usage_without_arguments():
    p = _run()
    assert p.returncode == 2 and "TREE COMMIT_A COMMIT_B" in p.stderr


def test_tree_must_be_a_patched_llama_cpp(tmp_path):
    p = _run(str(tmp_path), "HEAD", "HEAD", env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert p.returncode == 2
    # without nvcc it says so first; with it, it names the missing header
    assert "nvcc is not on PATH" in p.stderr or "not a patched llama.cpp tree" in p.stderr
    (tmp_path / "nvcc").write_text("#!/bin/sh\n")
    (tmp_path / "cuobjdump").write_text("#!/bin/sh\n")
    (tmp_path / "nvcc").chmod(0o755)
    (tmp_path / "cuobjdump").chmod(0o755)
    p = _run(str(tmp_path), "HEAD", "HEAD", env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert p.returncode == 2 and "not a patched llama.cpp tree" in p.stderr


NVCC = SCRIPT.parent / "ggml_cuda_nvcc.sh"  # the compile cuda_sass_diff.sh, sass_order.py, gpu_run.sh share


def _nvcc(*args, env=None):
    return subprocess.run(["bash", str(NVCC), *args], capture_output=True, text=True, env=env)


def test_ggml_cuda_nvcc_refuses_bad_arguments(tmp_path):
    p = _nvcc()
    assert p.returncode == 2 and "TREE ARCH NVCC_ARGS" in p.stderr
    p = _nvcc(str(tmp_path), "90", "-c", "x.cu")
    assert p.returncode == 2 and "is not a llama.cpp tree" in p.stderr
    (tmp_path / "ggml" / "src" / "ggml-cuda").mkdir(parents=True)
    p = _nvcc(str(tmp_path), "sm_90", "-c", "x.cu")
    assert p.returncode == 2 and "ARCH must be an SM version" in p.stderr and "sm_90" in p.stderr


def test_ggml_cuda_nvcc_flags(tmp_path):
    """The flags it passes: a stand-in nvcc prints its arguments."""
    tree = tmp_path / "tree"
    (tree / "ggml" / "src" / "ggml-cuda").mkdir(parents=True)
    bin_dir = tmp_path / "cuda" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "nvcc").write_text('#!/bin/sh\necho "$@"\n')
    (bin_dir / "nvcc").chmod(0o755)
    p = _nvcc(str(tree), "90", "-c", "a.cu", "-o", "a.o", env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    args = p.stdout.split()
    assert args[:3] == ["-std=c++17", "-arch=sm_90", "-O3"]
    assert f"-I{tree}/ggml/src/ggml-cuda" in args and f"-I{tmp_path / 'cuda'}/include" in args
    assert args[-4:] == ["-c", "a.cu", "-o", "a.o"]


# stand-ins for test_names_the_functions_that_differ
FAKE_NVCC = r"""#!/bin/bash
src=; out=
while [[ $# -gt 0 ]]; do [[ $1 == -c ]] && src=$2; [[ $1 == -o ]] && out=$2; shift; done
echo "$src" > "$out"
"""
FAKE_CUOBJDUMP = r"""#!/bin/bash
printf '\t\tFunction : kept\n        FADD R1, R2, R3 ;\n\t\tFunction : changed\n'
if grep -q "~0" "$2"; then op=FMUL; else op=FADD; fi
printf '        %s R1, R2, R3 ;\n' "$op"
"""


def test_names_the_functions_that_differ(tmp_path):
    """Where the SASS of a file differs, the functions whose SASS differs are named (the others are not).
    Stand-ins: nvcc writes the path it compiled into its object, and cuobjdump prints two functions, the
    second of which depends on that path; HEAD and HEAD~0 are the same header in two work folders."""
    tree = tmp_path / "tree"
    (tree / "ggml" / "src" / "ggml-cuda").mkdir(parents=True)
    (tree / "ggml" / "src" / "ggml-cuda" / "polar_block.cuh").write_text("// header\n")
    (tree / "ggml" / "src" / "ggml-cuda" / "k.cu").write_text("// kernels\n")
    bin_dir = tmp_path / "cuda" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "nvcc").write_text(FAKE_NVCC)
    (bin_dir / "cuobjdump").write_text(FAKE_CUOBJDUMP)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    p = _run(str(tree), "HEAD", "HEAD~0", "ggml/src/ggml-cuda/k.cu", env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert p.returncode == 1, p
    assert "SASS differs: ggml/src/ggml-cuda/k.cu" in p.stdout, p.stdout
    assert "1 of 2 functions differ:\n  changed\n" in p.stdout, p.stdout
    assert "  kept" not in p.stdout, p.stdout
