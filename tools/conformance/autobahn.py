"""The Autobahn TestSuite cases 1.* to 13.* against kythera, run by `kosoku`.

Starts `target/release/kythera --listen 127.0.0.1:PORT --shards 2` (or uses
`--address`), runs

    kosoku -m fuzzingclient -i 1.* ... -i 10.* -i 12.* -i 13.* -p 2 -o OUTDIR 127.0.0.1:PORT

(there are no groups 8 and 11; `--cases` picks others, e.g. `--cases '13.*'`)

(kosoku is a native runner of Autobahn's own case files; it connects to `/`, kythera's
echo route), reads the Autobahn-format report it writes (`OUTDIR/index.json`, one
`{agent: {case: {behavior, behaviorClose, ...}}}` map, plus one JSON file per case),
prints the count of cases per behavior and per close behavior, and exits non-zero
naming every case whose `behavior` or `behaviorClose` is not OK or INFORMATIONAL, with
what the case expected and what it saw. NON-STRICT fails too: every case passed
strictly once invalid UTF-8 was failed as it arrived (6.4.3 and 6.4.4, issue 16). The server is always
stopped (SIGTERM), and must exit 0: a server that has to be killed or exits non-zero
fails the run too.

Cases 12.* and 13.* exercise permessage-deflate (kosoku offers it on those only).

With `--tls` kythera also gets a `wss://` listener (a test CA from `trustme`), and the
cases run over it: kosoku speaks only plain `ws://`, so it connects to a relay
(`tls_relay.py`) that carries each of its connections to kythera inside TLS.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kythera_proc import (  # noqa: E402
    DEFAULT_BINARY,
    REPO,
    KytheraServer,
    ServerError,
    add_server_arg_option,
    tls_options,
    wait_tls_url,
)
from tls_relay import TlsRelay  # noqa: E402

ACCEPTED = {"OK", "INFORMATIONAL"}
# Autobahn has no groups 8 and 11.
INCLUDE = [f"{n}.*" for n in (1, 2, 3, 4, 5, 6, 7, 9, 10, 12, 13)]
DEFAULT_OUTDIR = REPO / "target" / "autobahn"


def case_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(p) for p in case_id.split(".") if p.isdigit())


def find_kosoku() -> str:
    beside = Path(sys.executable).parent / "kosoku"
    if beside.is_file():
        return str(beside)
    found = shutil.which("kosoku")
    if found:
        return found
    raise SystemExit(
        "autobahn: kosoku not found (pip install -r tools/conformance/requirements.txt)"
    )


def run_kosoku(
    kosoku: str, address: str, outdir: Path, parallelism: int, timeout: float, cases: list[str]
) -> int:
    if outdir.exists():
        shutil.rmtree(outdir)  # never read a previous run's report
    cmd = [kosoku, "-m", "fuzzingclient"]
    for pattern in cases:
        cmd += ["-i", pattern]
    cmd += ["-p", str(parallelism), "-o", str(outdir), address]
    print("running:", " ".join(cmd), flush=True)
    t = time.monotonic()
    # kosoku's own output lists failing cases; the summary below is built from the
    # report, so keep its output in a file and show it only when there is no report.
    log = outdir.parent / "kosoku.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        try:
            rc = subprocess.run(
                cmd, check=False, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            raise SystemExit(f"autobahn: kosoku did not finish within {timeout:.0f} s") from None
    print(f"kosoku exited with status {rc} after {time.monotonic() - t:.1f} s", flush=True)
    if not (outdir / "index.json").is_file():
        print(log.read_text(errors="replace")[-4000:], file=sys.stderr)
        raise SystemExit(f"autobahn: kosoku wrote no {outdir}/index.json")
    return rc


def short(value: object, limit: int = 400) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit] + " ..."


def explain(outdir: Path, case_id: str, entry: dict) -> list[str]:
    """What a failing case expected and what it observed, from its report file."""
    lines = [
        f"{case_id}: behavior={entry.get('behavior')} "
        f"behaviorClose={entry.get('behaviorClose')} "
        f"remoteCloseCode={entry.get('remoteCloseCode')}"
    ]
    try:
        case = json.loads((outdir / entry["reportfile"]).read_text())
    except (OSError, KeyError, ValueError) as e:
        return lines + [f"    (no case report: {e})"]
    lines += [
        f"    description:   {short(case.get('description'))}",
        f"    expectation:   {short(case.get('expectation'))}",
        f"    result:        {short(case.get('result'))}",
        f"    resultClose:   {short(case.get('resultClose'))}",
        f"    expected:      {short(case.get('expected'))}",
        f"    received:      {short(case.get('received'))}",
        f"    expectedClose: {short(case.get('expectedClose'))}",
        f"    remote close:  {case.get('remoteCloseCode')} {case.get('remoteCloseReason')!r}"
        f"; local close: {case.get('localCloseCode')} {case.get('localCloseReason')!r}",
        f"    wasClean={case.get('wasClean')} "
        f"wasNotCleanReason={case.get('wasNotCleanReason')!r} "
        f"droppedByMe={case.get('droppedByMe')} failedByMe={case.get('failedByMe')} "
        f"serverDropTimeout={case.get('wasServerConnectionDropTimeout')} "
        f"closeHandshakeTimeout={case.get('wasCloseHandshakeTimeout')}",
    ]
    return lines


def summarize(outdir: Path, selected: list[str]) -> list[str]:
    """Prints the summary; returns the failing case ids."""
    index = json.loads((outdir / "index.json").read_text())
    cases: dict[str, dict] = {}
    for agent, per_case in index.items():
        for case_id, entry in per_case.items():
            cases[case_id] = entry
        print(f"agent: {agent!r}")
    if not cases:
        raise SystemExit("autobahn: the report holds no case")
    # Every selected group must have run, and nothing else: a runner that skipped a
    # group (or ran others) would otherwise pass unnoticed.
    groups = {case_key(c)[0] for c in cases}
    wanted = {int(p.split(".")[0]) for p in selected if p.split(".")[0].isdigit()}
    if groups != wanted:
        raise SystemExit(
            f"autobahn: groups run {sorted(groups)}, selected {sorted(wanted)}"
        )

    behavior = collections.Counter(e.get("behavior") for e in cases.values())
    close = collections.Counter(e.get("behaviorClose") for e in cases.values())
    print(f"{len(cases)} cases")
    print("behavior:      " + ", ".join(f"{k} {v}" for k, v in sorted(behavior.items())))
    print("behaviorClose: " + ", ".join(f"{k} {v}" for k, v in sorted(close.items())))
    per_group = collections.Counter(c.split(".")[0] for c in cases)
    print(
        "cases per group: "
        + ", ".join(f"{g}.*: {n}" for g, n in sorted(per_group.items(), key=lambda x: int(x[0])))
    )

    failing = sorted(
        (
            c
            for c, e in cases.items()
            if e.get("behavior") not in ACCEPTED or e.get("behaviorClose") not in ACCEPTED
        ),
        key=case_key,
    )
    non_strict = sorted(
        (
            c
            for c, e in cases.items()
            if "NON-STRICT" in (e.get("behavior"), e.get("behaviorClose"))
        ),
        key=case_key,
    )
    if non_strict:
        print("NON-STRICT (accepted): " + " ".join(non_strict))
    for case_id in failing:
        print("\n".join(explain(outdir, case_id, cases[case_id])), file=sys.stderr)
    sys.stderr.flush()
    print(f"autobahn: {len(cases) - len(failing)} passed, {len(failing)} failed", flush=True)
    return failing


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--address", help="test this running server (host:port) instead of starting kythera"
    )
    p.add_argument("--binary", type=Path, default=DEFAULT_BINARY)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--outdir", type=Path, default=DEFAULT_OUTDIR)
    # Two at a time, like the two shards: a case that the server fails mid-send (a
    # message over the size limit) can leave kosoku waiting for its 100 s case timer,
    # and overlapping those waits keeps the run short.
    p.add_argument(
        "--parallelism", type=int, default=2, help="cases run at once by kosoku (default 2)"
    )
    add_server_arg_option(p)
    p.add_argument("--timeout", type=float, default=900, help="seconds for the whole kosoku run")
    p.add_argument(
        "--cases",
        action="append",
        default=None,
        metavar="GLOB",
        help="case ids or globs to run (repeatable; default 1.* to 13.*)",
    )
    p.add_argument(
        "--tls", action="store_true", help="run the cases over wss:// (through a TLS relay)"
    )
    args = p.parse_args()
    kosoku = find_kosoku()
    outdir = args.outdir.resolve()
    cases = args.cases or INCLUDE

    failing: list[str] = []
    try:
        if args.address:
            run_kosoku(kosoku, args.address, outdir, args.parallelism, args.timeout, cases)
            failing = summarize(outdir, cases)
        elif args.tls:
            with tempfile.TemporaryDirectory() as tmp:
                tls_args, context = tls_options(Path(tmp))
                with KytheraServer(
                    args.binary,
                    args.shards,
                    extra_args=[*args.server_arg, *tls_args],
                    name="autobahn_tls",
                ) as srv:
                    host, port = wait_tls_url(srv).removeprefix("wss://").rstrip("/").split(":")
                    with TlsRelay((host, int(port)), context, "localhost") as relay:
                        print(f"kosoku -> {relay.address} (plain) -> {srv.tls_url} (TLS)")
                        run_kosoku(
                            kosoku, relay.address, outdir, args.parallelism, args.timeout, cases
                        )
                    failing = summarize(outdir, cases)
        else:
            with KytheraServer(
                args.binary, args.shards, extra_args=args.server_arg, name="autobahn"
            ) as srv:
                address = srv.url.removeprefix("ws://").rstrip("/")
                run_kosoku(kosoku, address, outdir, args.parallelism, args.timeout, cases)
                failing = summarize(outdir, cases)
    except ServerError as e:
        print(f"autobahn: FAILED: {e}", file=sys.stderr)
        return 1
    print(f"report: {outdir}/index.html")
    if failing:
        print(
            f"autobahn: FAILED: {len(failing)} case(s) not OK/NON-STRICT/INFORMATIONAL: "
            + " ".join(failing),
            file=sys.stderr,
        )
        return 1
    print("autobahn: every case OK or INFORMATIONAL")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
