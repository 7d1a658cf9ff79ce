"""`python -m tbrm_verl.eval`: the paper's evaluation protocol (the CLI is tbrm_verl/eval/cli.py)."""

from tbrm_verl.eval.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
