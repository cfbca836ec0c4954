r"""Kill a running ``fxpress search`` after some trials finish, resume it, and count what was reused.

Starts ``fxpress search RECIPE -o DIR --json`` in its own session, waits until ``--after`` trials
have written their result, sends the signal to its process group (what Ctrl-C in a terminal does
for SIGINT; the driver and Ray's head processes killed at once for SIGKILL), waits for every
process of the session to end (Ray's workers, in their own groups, end with the head), then runs
the same command again and reports the finished trials it found, the trials it reused, and its
choice beside a reference search's (``--reference DIR/search.json``).

    python -m bench.search_resume --signal INT --after 4 -o /tmp/effnet-int \
        --reference /tmp/effnet-search/search.json
    python -m bench.search_resume --signal KILL --after 4 -o /tmp/effnet-kill --no-ray
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parent.parent / "examples" / "search" / "efficientnet-lite0.toml"


def main(argv: list[str] | None = None) -> int:
    """Interrupt, resume, compare; exit 1 when the resumed search reran a finished trial or chose differently."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default=str(RECIPE), help="a search recipe (default: EfficientNet's)")
    parser.add_argument("-o", "--output", required=True, help="search directory (should start empty)")
    parser.add_argument("--signal", choices=("INT", "KILL"), default="INT")
    parser.add_argument("--after", type=int, default=2, help="finished trials before the signal")
    parser.add_argument("--no-ray", action="store_true", help="run the search in one process")
    parser.add_argument("--reference", default=None, help="search.json of an uninterrupted run of the same recipe")
    args = parser.parse_args(argv)
    command = [sys.executable, "-m", "compiler.cli", "search", args.recipe, "-o", args.output, "--json"]
    command += ["--no-ray"] if args.no_ray else []
    started = time.perf_counter()
    killed = _interrupt(command, Path(args.output), args.after, getattr(signal, f"SIG{args.signal}"))
    finished = _finished(Path(args.output))
    print(f"SIG{args.signal} after {killed['seconds']:.0f} s: exit {killed['returncode']}, "
          f"{finished} trials finished; {killed['message']}")
    resumed_at = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, check=False)
    if run.returncode not in (0, 6):
        print(run.stderr[-3000:], file=sys.stderr)
        return run.returncode
    resumed = json.loads(run.stdout)
    print(f"resumed: {resumed['trials_run']} trials, {resumed['reused']} reused from the cache, "
          f"{time.perf_counter() - resumed_at:.0f} s (total {time.perf_counter() - started:.0f} s)")
    print(f"chosen: {(resumed['chosen'] or {}).get('patch')}")
    same = True
    if args.reference:
        reference = json.loads(Path(args.reference).read_text())
        same = (reference["chosen"] or {}).get("patch") == (resumed["chosen"] or {}).get("patch")
        print(f"reference chose {(reference['chosen'] or {}).get('patch')}: {'same' if same else 'DIFFERENT'}; "
              f"verdicts {'equal' if _verdicts(reference) == _verdicts(resumed) else 'DIFFERENT'}")
    return 0 if resumed["reused"] == finished and same else 1


def _interrupt(command: list[str], output: Path, after: int, kill: signal.Signals) -> dict:
    """Run ``command`` until ``after`` trials have results, then signal its process group; wait for all of it."""
    started = time.perf_counter()
    # A fresh session, as a terminal's job; SIGINT back to its default, which a job started with `&`
    # from a script inherits as ignored (then Python installs no KeyboardInterrupt handler).
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    while _finished(output) < after:
        if process.poll() is not None:
            raise SystemExit(f"the search ended (exit {process.returncode}) before {after} trials finished")
        time.sleep(0.5)
    os.killpg(process.pid, kill)
    _, stderr = process.communicate(timeout=600)
    _wait_for_session(process.pid)
    lines = [line for line in stderr.splitlines() if line.startswith("fxpress:")]
    return {"returncode": process.returncode, "seconds": time.perf_counter() - started,
            "message": lines[-1] if lines else "(no message)"}


def _wait_for_session(session: int, timeout: float = 120.0) -> None:
    """Until no process of ``session`` is left: Ray's workers (their own process groups) end after the driver."""
    deadline = time.monotonic() + timeout
    while (left := _session_members(session)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        os.kill(pid, signal.SIGKILL)


def _session_members(session: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":  # after the command: state, ppid, pgrp, session
            members.append(int(entry.name))
    return members


def _finished(output: Path) -> int:
    return len(list(output.glob("trials/*/result.json")))


def _verdicts(summary: dict) -> list:
    return sorted((json.dumps(trial["patch"], sort_keys=True), trial["stage"], trial["passed"])
                  for trial in summary["trials"])


if __name__ == "__main__":
    sys.exit(main())
