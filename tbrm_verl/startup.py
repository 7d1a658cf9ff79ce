"""`python -m tbrm_verl.startup`: entry point kept at its public name; the tool lives in `tbrm_verl.tools.startup`."""

from tbrm_verl.tools.startup import main

if __name__ == "__main__":
    raise SystemExit(main())
