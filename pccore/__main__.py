"""`python -m pccore`: the command-line tool (see `pccore --help`)."""

if __name__ == "__main__":
    from pccore._cli import main

    raise SystemExit(main())
