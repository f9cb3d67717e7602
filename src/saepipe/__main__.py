import sys

from saepipe.cli import main

sys.exit(main())
