"""`python -m saepipe <stage>`: the CLI as a module, which is how `torchrun -m saepipe train` starts it."""

import os
import sys

from saepipe.cli import main

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.exit(main())
