"""``python -m calltune``: the command line, as the ``calltune`` script runs it.

Launchers start a module, not a console script: ``accelerate launch -m calltune train RECIPE`` and
``torchrun --nproc_per_node N -m calltune train RECIPE`` run this in every process.
"""

import sys

from calltune.cli import main

if __name__ == "__main__":
    sys.exit(main())
