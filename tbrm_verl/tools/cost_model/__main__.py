"""`python -m tbrm_verl.tools.cost_model` (the public name is `python -m tbrm_verl.cost_model`)."""

import sys

from tbrm_verl.tools.cost_model.cli import main

if __name__ == "__main__":
    sys.exit(main())
