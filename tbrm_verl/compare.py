"""`python -m tbrm_verl.compare`: entry point kept at its public name; the tool lives in `tbrm_verl.tools.compare`."""

from tbrm_verl.tools.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
