"""`python -m tbrm_verl.gpu_check`: entry point kept at its public name; the tool is the package
`tbrm_verl.tools.gpu_check` (checks, measurements, CLI), its bare-machine imports `tbrm_verl.tools.bare_imports`."""

from tbrm_verl.tools.gpu_check import main

if __name__ == "__main__":
    raise SystemExit(main())
