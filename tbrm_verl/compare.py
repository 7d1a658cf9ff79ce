"""`python -m tbrm_verl.compare`: public entry point; the tool lives in `tbrm_verl.tools.compare`."""

from tbrm_verl.tools.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
