"""`python -m tbrm_verl.cost_model`: public entry point; the tool lives in `tbrm_verl.tools.cost_model`."""

from tbrm_verl.tools.cost_model import main

if __name__ == "__main__":
    raise SystemExit(main())
