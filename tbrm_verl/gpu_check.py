"""`python -m tbrm_verl.gpu_check`: entry point kept at its public name; the tool lives in `tbrm_verl.tools.gpu_check`."""

from tbrm_verl.tools.gpu_check import main

if __name__ == "__main__":
    raise SystemExit(main())
