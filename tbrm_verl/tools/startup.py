"""`python -m tbrm_verl.startup [key=value ...]`: where a run's wall time goes outside its training steps.

Runs `python -m tbrm_verl.main` with the given overrides, stamps every line of its output with the seconds since
launch, and reads the phases off verl's and tbrm_verl's own log lines:

    driver     launch -> the driver has composed and checked the config (imports, Hydra, verl's checks, data check)
    ray        -> Ray's local instance is up
    taskrunner -> the TaskRunner actor has started and imported verl
    setup      -> the trainer has built datasets and TransferQueue and asks for the FSDP worker group
    workers    -> the FSDP workers have started, imported verl and built the actor (and reference) engines
    rollout    -> the rollout server, agent-loop and reward workers are up ("ready to fit")
    val_0      -> the validation before training is done
    steps      -> the last training step is logged (its mean per step is printed too)
    exit       -> the process has exited (final validation, checkpoint, report, Ray shutdown)

Writes the stamped log and a JSON of the phases to --out-dir. The numbers depend on the machine's load: run it on an
otherwise idle machine to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

# (phase, regular expression of the log line that ends it), in order
MARKERS = [
    ("driver", r"\[tbrm_verl\] method="),
    ("ray", r"Started a local Ray instance"),
    ("taskrunner", r"\(TBRMTaskRunner pid="),
    ("setup", r"create worker group"),
    ("workers", r"model engine initialized"),
    ("rollout", r"ready to fit"),
    ("val_0", r"Initial validation metrics|\bstep:1(?:/\d+)? "),
]
# a step's console line: tbrm_verl's progress line `step:N/T reward=...`, or verl's `step:N - key:value - ...`
STEP_LINE = re.compile(r"\bstep:(\d+)(?:/\d+)? ")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def phases(stamped: list[tuple[float, str]], exit_s: float) -> dict:
    """Phase durations from (seconds since launch, line) pairs."""
    ends, i = {}, 0
    for t, line in stamped:
        while i < len(MARKERS) and re.search(MARKERS[i][1], line):
            ends[MARKERS[i][0]] = t
            i += 1
    steps = [(t, int(m.group(1))) for t, line in stamped if (m := STEP_LINE.search(line))]
    steps = [(t, s) for t, s in steps if s > 0]
    out, prev = {}, 0.0
    for name, _ in MARKERS:
        if name in ends:
            out[name] = ends[name] - prev
            prev = ends[name]
    if steps:
        out["steps"] = steps[-1][0] - prev
        prev = steps[-1][0]
    out["exit"] = exit_s - prev
    res = {"phases_s": out, "wall_s": exit_s, "steps": len(steps)}
    if len(steps) > 2:  # mean over steps after the first (the first includes one-off warm-up)
        res["mean_step_s"] = (steps[-1][0] - steps[0][0]) / (len(steps) - 1)
        res["outside_steps_s"] = exit_s - (steps[-1][0] - steps[0][0])
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tbrm_verl.startup", description=__doc__.split("\n\n")[0],
                                 epilog="Other arguments are passed to python -m tbrm_verl.main.")
    ap.add_argument("--out-dir", default="startup_out")
    args, overrides = ap.parse_known_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-u", "-m", "tbrm_verl.main", *overrides], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    stamped = []
    with open(os.path.join(args.out_dir, "stamped.log"), "w") as log:
        for line in proc.stdout:
            t = time.time() - t0
            line = ANSI.sub("", line.rstrip("\n"))
            stamped.append((t, line))
            log.write(f"{t:8.2f} {line}\n")
    rc = proc.wait()
    res = phases(stamped, time.time() - t0)
    res["rc"] = rc
    res["overrides"] = overrides
    res["load_average"] = os.getloadavg()
    with open(os.path.join(args.out_dir, "startup.json"), "w") as f:
        json.dump(res, f, indent=2)
    for name, s in res["phases_s"].items():
        print(f"{name:11s} {s:7.1f} s")
    print(f"{'wall':11s} {res['wall_s']:7.1f} s  (exit {rc}, {res['steps']} steps"
          + (f", {res['mean_step_s']:.2f} s/step, {res['outside_steps_s']:.0f} s outside the steps"
             if "mean_step_s" in res else "") + f"; load average {res['load_average'][0]:.1f})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
