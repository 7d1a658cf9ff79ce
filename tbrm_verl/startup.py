"""`python -m tbrm_verl.startup`: public entry point; the tool lives in `tbrm_verl.tools.startup`."""

from tbrm_verl.tools.startup import main

if __name__ == "__main__":
    raise SystemExit(main())
