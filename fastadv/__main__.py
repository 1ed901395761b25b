"""python -m fastadv: the fastadv command (see fastadv.cli)."""
import sys

from fastadv.cli import main

sys.exit(main())
