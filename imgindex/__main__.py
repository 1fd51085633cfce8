"""`python -m imgindex ...` is the `imgindex` command."""
import sys

from imgindex.cli import main

sys.exit(main())
