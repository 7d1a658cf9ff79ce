"""`python -m tbrm_verl.sweep`: public entry point; the tool lives in `tbrm_verl.tools.sweep`."""

from tbrm_verl.tools.sweep import main

if __name__ == "__main__":
    raise SystemExit(main())
