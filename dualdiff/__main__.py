"""`python -m dualdiff info`: what was built and which backends are usable here."""
from dualdiff.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
