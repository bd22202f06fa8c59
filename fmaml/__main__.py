"""``python -m fmaml``: the ``fmaml`` command, whose code is the application in ``fmaml/app/``."""

from fmaml.app.main import main

if __name__ == "__main__":
    raise SystemExit(main())
