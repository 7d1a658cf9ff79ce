"""`python -m tbrm_verl.check_gpu_install`: public entry point; the tool lives in `tbrm_verl.tools.check_gpu_install`."""

from tbrm_verl.tools.check_gpu_install import main

if __name__ == "__main__":
    raise SystemExit(main())
