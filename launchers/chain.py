#!/usr/bin/env python
"""Submit a whole clipbd run to SLURM as dependent jobs: pretrain -> extraction job array -> reduce.

    python launchers/chain.py +experiment=default --extract-tasks 8 \
        hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=8 --train tasks_per_node=8
    python launchers/chain.py --run-dir outputs/default/x ...   # same dir again: only what is missing

Arguments that are not options are clipbd overrides, as for `python -m clipbd.run`; those starting
with `hydra.launcher.` set the launcher config (conf/hydra/launcher/<--launcher>.yaml) of every job,
`--train/--extract/--reduce KEY=VALUE` that of one phase only. Prints the run directory and job ids;
`--wait` blocks until the chain ends and exits non-zero if a job failed. See docs/slurm.md.
"""

from __future__ import annotations

import argparse
import sys

from clipbd.launch import default_run_dir, submit_chain


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", help="the run directory (default outputs/<name>/<time>); re-use one to resume")
    ap.add_argument("--launcher", default="slurm", help="conf/hydra/launcher/<name>.yaml (slurm | local)")
    ap.add_argument("--extract-tasks", type=int, default=4, help="array tasks that share the extraction")
    for phase in ("train", "extract", "reduce"):
        ap.add_argument(f"--{phase}", action="append", default=[], metavar="KEY=VALUE",
                        help=f"launcher setting for the {phase} job(s) only")
    ap.add_argument("--wait", action="store_true", help="wait for the chain; non-zero exit if a job failed")
    args, rest = ap.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("--")]
    if unknown:
        ap.error(f"unknown option(s) {unknown}")
    launcher = [a for a in rest if a.startswith("hydra.launcher.")]
    overrides = [a for a in rest if not a.startswith("hydra.launcher.")]
    run_dir = args.run_dir or default_run_dir(overrides)
    chain = submit_chain(overrides, run_dir, launcher=args.launcher, launcher_overrides=launcher,
                         phase_overrides={"train": args.train, "extract": args.extract, "reduce": args.reduce},
                         extract_tasks=args.extract_tasks)
    print(f"run dir: {chain.run_dir}")
    for phase, ids in chain.job_ids().items():
        print(f"{phase}: {' '.join(ids)}")
    sys.stdout.flush()
    if args.wait:
        try:
            chain.wait()
        except Exception as e:  # noqa: BLE001 - submitit's errors name the job and its log
            print(f"chain failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
            print(str(e)[-3000:], file=sys.stderr)
            return 1
        print("chain done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
