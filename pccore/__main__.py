"""`python -m pccore`: the command-line tool (see `pccore --help`)."""

from pccore._cli import main

raise SystemExit(main())
