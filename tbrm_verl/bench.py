"""`python -m tbrm_verl.bench`: entry point kept at its public name; the tool lives in `tbrm_verl.tools.bench`."""

from tbrm_verl.tools.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
