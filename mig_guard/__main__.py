import sys

from mig_guard.cli import main

sys.exit(main())
