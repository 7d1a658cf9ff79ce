"""`python -m tbrm_verl.eval`: the paper's evaluation protocol (tbrm_verl/eval/)."""

from tbrm_verl.eval.protocol import main

if __name__ == "__main__":
    raise SystemExit(main())
