"""Which images look like this one?  python search.py --image q.png [--index IDX] [-k 10] [--json] [--html out.html]

The same as `imgindex search`; see `python search.py --help`. Run it with the Python that has
imgindex installed (`.venv/bin/python search.py ...` after `make setup`, or an activated venv).
"""
import sys

try:
    from imgindex.cli import search_main
except ModuleNotFoundError as exc:
    sys.exit(f"search.py: cannot import {exc.name!r} with {sys.executable}: run it with the Python that has "
             "imgindex installed (.venv/bin/python search.py ... after `make setup`, or pip install imgindex)")

if __name__ == "__main__":
    sys.exit(search_main())
