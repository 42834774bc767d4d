"""`python -m jaxlab` is the `jaxlab` command."""

from jaxlab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
