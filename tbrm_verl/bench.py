"""`python -m tbrm_verl.bench`: public entry point; the tool lives in `tbrm_verl.tools.bench`."""

from tbrm_verl.tools.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
