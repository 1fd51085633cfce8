"""Which images look like this one?  python search.py --image q.png [--index IDX] [-k 10] [--json] [--html out.html]

The same as `imgindex search`; see `python search.py --help`.
"""
import sys

from indexes.cli import search_main

if __name__ == "__main__":
    sys.exit(search_main())
