"""`dejavu worker`: one worker process, started by the controller, mpirun or an operator."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("worker", help="run one worker process (started by the controller or by mpirun)")
    p.add_argument("--controller", required=True, help="HOST:PORT of the controller")
    p.add_argument("--token-file", default=None, metavar="PATH",
                   help="read the cluster token from this file (mode 600) instead of DEJAVU_CLUSTER_TOKEN")
    p.add_argument("--token", default=None, help=argparse.SUPPRESS)  # refused: see cmd_worker
    p.add_argument("--rank", type=int, default=None,
                   help="worker rank (default: from mpirun's or srun's environment, else the controller assigns one)")
    p.add_argument("--advertise-address", default=None, metavar="HOST",
                   help="the address other hosts reach this worker at; its listeners bind it (default: this "
                        "host's address on the route to the controller)")
    p.add_argument("--standby", action="store_true",
                   help="register as a standby: the controller gives it the rank of the next worker that fails "
                        "(serve --recovery standby)")
    p.set_defaults(func=cmd_worker)


def cmd_worker(args) -> int:
    from ..parallel.auth import read_token
    from ..cluster.worker import run

    if args.token is not None:
        raise ValueError("--token is not accepted: a command line is readable by every user (/proc/PID/cmdline); "
                         "put the cluster token in DEJAVU_CLUSTER_TOKEN or a mode-600 file (--token-file PATH)")
    token = read_token(args.token_file)
    return run(args.controller, token, args.rank, standby=args.standby, advertise=args.advertise_address)
