"""``python -m lowrank_ext info``: print backend_info() readably."""

import json

HELP = "show which backend (compiled C++/CUDA or pure-torch fallback) is active"


def add_arguments(parser):
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args):
    from .info import backend_info

    info = backend_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(key) for key in info)
    for key, value in info.items():
        if key == "kernels":
            value = ", ".join(f"{op}: {'/'.join(devs) or 'fallback'}" for op, devs in value.items())
        print(f"{key:<{width}}  {value}")
    return 0
