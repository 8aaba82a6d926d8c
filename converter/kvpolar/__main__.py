"""python -m kvpolar: the kvpolar command line (kvpolar.cli)."""

from .cli import main

raise SystemExit(main())
