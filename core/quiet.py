"""Run commands as named stages: moeq's own lines on the terminal, everything else in a log file.

`make demo` runs its stages through this. Each stage prints one line when it starts and one when it
ends (with its time); a stage given `--progress` patterns shows a progress bar (on a terminal) driven
by moeq's own lines; lines matching `--show` (and moeq's warnings and errors) are printed too. All
output of every command — libraries' logs, warnings and progress bars included — goes to `--log`.
A failing stage prints the end of its log and stops the run with its exit status.

    python -m moeq.quiet --log results/demo.log \\
        --stage "build tiny" "moeq build tiny" --progress 'step (?P<n>\\d+)/(?P<total>\\d+)' \\
        --stage "report" "moeq report" --show '^report:'

A `--progress` pattern with named groups sets the bar: `n` (position), `total`, `item` (the bar counts
the distinct items seen and shows the latest); one without named groups advances the bar by one. Only
the standard library and tqdm are used, so either environment's interpreter runs it.
"""
import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

MOEQ_LINE = re.compile(r"^(\[(moeq|build|quantize|eval)\b|report:|error:)")
ALWAYS_SHOWN = re.compile(r"WARNING|ERROR|^error:")


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:02.0f}s" if seconds >= 60 else f"{seconds:.0f}s"


class Bar:
    """A tqdm bar on a terminal; elsewhere (output to a file) a line per new item or quarter of the way."""

    def __init__(self, title: str, tty: bool):
        self.bar, self.n, self.total, self.items, self.quarter = None, 0, None, [], 0
        if tty:
            from tqdm import tqdm
            width = min(shutil.get_terminal_size((100, 24)).columns or 100, 120)
            self.bar = tqdm(total=None, desc=title, leave=False, ncols=width, file=sys.stdout, delay=1,
                            bar_format="{desc} {bar} {n_fmt}/{total_fmt}{postfix} [{elapsed}]")

    def update(self, n=None, total=None, item=None, step=False):
        new = item is not None and item not in self.items
        if new:
            self.items.append(item)
            n = len(self.items)
        self.total = int(total) if total is not None else self.total
        self.n = int(n) if n is not None else self.n + 1 if step else self.n
        if self.bar is not None:
            self.bar.total, self.bar.n = self.total, self.n
            if item is not None:
                self.bar.set_postfix_str(item, refresh=False)
            self.bar.refresh()
        elif new or (self.total and 4 * self.n // self.total > self.quarter):
            self.quarter = 4 * self.n // self.total if self.total else 0
            print(f"    {self.n}/{self.total or '?'} {item or ''}".rstrip(), flush=True)

    def write(self, line: str):
        if self.bar is None:
            print(line, flush=True)
        else:
            self.bar.write(line)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_stage(index: int, count: int, stage: dict, log, tty: bool) -> int:
    head = f"[{index}/{count}] {stage['title']}"
    print(f"{head} ...", flush=True)
    log.write(f"\n===== {head}: {stage['cmd']}\n")
    log.flush()
    progress = [re.compile(p) for p in stage["progress"]]
    shown = [re.compile(p) for p in stage["show"]]
    bar = Bar(f"    {stage['title']}", tty and bool(progress))
    if stage["total"]:
        bar.update(total=stage["total"])
    tail = []
    t0 = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(shlex.split(stage["cmd"]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, text=True, errors="replace", bufsize=1)
    try:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            line = line.rstrip("\n")
            tail = (tail + [line])[-40:]
            if not MOEQ_LINE.match(line):
                continue
            for p in progress:
                if m := p.search(line):
                    groups = {k: v for k, v in m.groupdict().items() if v is not None}
                    bar.update(**groups, step=not m.re.groupindex)
            if ALWAYS_SHOWN.search(line) or any(p.search(line) for p in shown):
                bar.write(f"    {line}")
    except KeyboardInterrupt:  # the command got the same Ctrl-C: let it clean up, then stop
        proc.wait()
    rc = proc.wait()
    bar.close()
    took = time.time() - t0
    log.write(f"===== {head}: exit {rc} after {took:.1f}s\n")
    if rc < 0 or rc == 130:
        print(f"{head}: interrupted after {minutes(took)}", flush=True)
        return 130
    if rc:
        print(f"{head}: FAILED (exit {rc}) after {minutes(took)}; the end of its output:", flush=True)
        print("\n".join(f"    | {t}" for t in tail), flush=True)
    else:
        print(f"{head}: done in {minutes(took)}", flush=True)
    return rc


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[dict]]:
    parser = argparse.ArgumentParser(prog="python -m moeq.quiet", description=__doc__.split("\n")[0])
    parser.add_argument("--log", required=True, help="file that receives every command's whole output")
    parser.add_argument("--name", default="moeq", help="what the first and last lines call this run")
    stages: list[dict] = []

    class Stage(argparse.Action):
        def __call__(self, parser, ns, values, option=None):
            if option == "--stage":
                stages.append({"title": values[0], "cmd": values[1], "progress": [], "show": [], "total": None})
            elif not stages:
                parser.error(f"{option} belongs to a --stage and must follow one")
            elif option == "--total":
                stages[-1]["total"] = int(values)
            else:
                stages[-1][option[2:]].append(values)

    parser.add_argument("--stage", nargs=2, metavar=("TITLE", "COMMAND"), action=Stage, required=True)
    parser.add_argument("--progress", metavar="REGEX", action=Stage, help="moeq line that moves the stage's bar")
    parser.add_argument("--show", metavar="REGEX", action=Stage, help="moeq line to print")
    parser.add_argument("--total", metavar="N", action=Stage, help="the bar's length, if no line tells it")
    return parser.parse_args(argv), stages


def main(argv=None) -> int:
    args, stages = parse(sys.argv[1:] if argv is None else argv)
    log_path = Path(args.log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tty = sys.stdout.isatty()
    t0 = time.time()
    print(f"{args.name}: {len(stages)} stages; library output goes to {log_path}", flush=True)
    with open(log_path, "w") as log:
        log.write(f"{args.name}: started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        for i, stage in enumerate(stages, 1):
            if rc := run_stage(i, len(stages), stage, log, tty):
                print(f"{args.name}: stopped at stage {i} after {minutes(time.time() - t0)}; "
                      f"the whole output is in {log_path}", flush=True)
                return rc
    print(f"{args.name}: finished in {minutes(time.time() - t0)}; library logs: {log_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
