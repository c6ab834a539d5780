"""CRI benchmark: moorage against a reference runtime (containerd's CRI plugin) on one machine.

    sudo .venv/bin/python -m bench.cri_bench [--quick] [--json out.json]
         [--runtimes moorage,containerd]
         [--figures pod,container,exec,list,relist,parallel,pull,memory]
         [--profile DIR]

Sets up a node network namespace, a CNI bridge config, a loopback registry with a busybox,
a pause and a big multi-layer image, starts every runtime with its own state in a temp dir,
runs the figures interleaved, prints a table and writes JSON with the raw samples. Removes
everything at the end, on errors and on Ctrl-C too. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from bench.cribench.figures import Bench, Sizes, stage
from bench.cribench.node import Node, ensure_packages, machine
from bench.cribench.runtimes import RUNTIMES, Moorage, Runtime
from bench.cribench.stats import Report

FIGURES = ("pod", "container", "exec", "list", "relist", "parallel", "pull", "memory")
T0 = time.monotonic()


def log(text: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {text}", flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.cri_bench",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="few iterations, small N and a 50 MB image (under two minutes)")
    p.add_argument("--json", type=Path, help="write the report (with raw samples) here")
    p.add_argument("--runtimes", default="moorage,containerd",
                   help="comma-separated, first is measured against the others "
                   f"(known: {', '.join(RUNTIMES)})")
    p.add_argument("--figures", default=",".join(FIGURES),
                   help=f"comma-separated subset of {', '.join(FIGURES)}")
    p.add_argument("--profile", type=Path,
                   help="run moorage under cProfile and write DIR/moorage.prof")
    p.add_argument("--big-mib", type=int, help="size of the big image (default 300, quick 50)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (runc, namespaces, mounts)", file=sys.stderr)
        return 2
    figures = [f for f in args.figures.split(",") if f]
    unknown = [f for f in figures if f not in FIGURES]
    names = [n for n in args.runtimes.split(",") if n]
    unknown += [n for n in names if n not in RUNTIMES]
    if unknown:
        print(f"unknown figure or runtime: {', '.join(unknown)}", file=sys.stderr)
        return 2
    sizes = Sizes.quick() if args.quick else Sizes()
    big = args.big_mib or (50 if args.quick else 300)

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    ensure_packages()
    report = Report(reference=next((n for n in names if n != "moorage"), "containerd"))
    report.meta = {"machine": machine(), "quick": args.quick, "sizes": vars(sizes),
                   "argv": sys.argv[1:], "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    node = Node(big_mib=big, big_layer_count=5 if args.quick else 6)
    runtimes: list[Runtime] = []
    code = 0
    try:
        with stage(log, f"setup: namespace, registry, images ({big} MiB big image)"):
            node.setup()
        for name in names:
            with stage(log, f"start {name}"):
                if name == "moorage":
                    if args.profile:
                        args.profile.mkdir(parents=True, exist_ok=True)
                    prof = args.profile.resolve() / "moorage.prof" if args.profile else None
                    rt: Runtime = Moorage(node, prof)
                else:
                    rt = RUNTIMES[name](node)
                runtimes.append(rt)
                rt.start()
                report.meta.setdefault("versions", {})[name] = rt.version()
        bench = Bench(node, runtimes, sizes, report, log)
        with stage(log, "pull busybox and pause images"):
            bench.pull_images()
        if "memory" in figures:
            time.sleep(sizes.settle)
            bench.memory_idle()
        steps = {
            "pod": ("pod lifecycle", bench.pod_lifecycle),
            "container": ("container lifecycle + runc floor", bench.container_lifecycle),
            "exec": ("ExecSync", bench.exec_sync),
            "list": ("List/Status scaling (and during a pull)",
                     lambda: bench.list_status(with_pull="pull" in figures or not args.quick)),
            "relist": ("kubelet's relist while pods start and a pull runs",
                       bench.relist_under_load),
            "parallel": (f"{sizes.parallel_pods} pods in parallel", bench.parallel_pods),
            "pull": ("pull and unpack", bench.pull),
            "memory": ("memory with running containers", bench.memory_loaded),
        }
        for key in FIGURES:
            if key in figures:
                title, fn = steps[key]
                with stage(log, title):
                    fn()
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        code = 130
    except Exception:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        with stage(log, "cleanup"):
            for rt in reversed(runtimes):
                try:
                    rt.remove_all()
                finally:
                    rt.stop()
            node.close()
    report.meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report.meta["loadavg_at_end"] = os.getloadavg()
    print()
    print(report.table(names))
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=1))
        log(f"wrote {args.json}")
    return code


if __name__ == "__main__":
    sys.exit(main())
