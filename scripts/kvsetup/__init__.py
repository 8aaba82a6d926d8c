"""The set-up of a kvpolar checkout (standard library only): `python3 scripts/bootstrap.py`.

    pins      the upstream pin (patches/upstream.json), data packages, cmake flags
    util      errors, logging, checksums, stamps, locks, subprocesses
    venv      the project venv and pip
    data      verified model and text files
    cpu       the CPU instruction sets the build may use (executed probes)
    patches   the patch series (git am / git format-patch)
    llama     sources, build key, cmake build, <repo>/build
    binding   llama-cpp-python on the build
    smoke     a few tokens through every built tool and the binding, once per build
    cli       the subcommands

The cache layout comes from kvpolar.paths, atomic writes from kvpolar.atomic.
"""
