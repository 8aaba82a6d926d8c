#!/usr/bin/env python3
"""Regenerate docs/format-study.md and docs/format-study.json: `study.cli` (scripts/study/cli.py).

python3 scripts/format_study.py run | render [--help]
"""

from study.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
