"""Run many ``lorakit`` command lines, each in its own forked process.

A fresh interpreter spends about 1.5 s importing torch, so a corpus of a hundred command lines
would take minutes as plain subprocesses. This driver imports ``lorakit.cli`` once and forks one
child per command line. Each child is a separate process with its own exit code, working folder,
stdout and stderr files and signal handlers, and runs ``lorakit.cli.main`` exactly as the
``lorakit`` console script does. The parent never runs a torch operation, so no thread pool
exists at fork time.

Tests call ``run_cli_batch``. The driver itself runs as ``python tests/forked_cli.py JOBS.json``,
where JOBS.json lists objects with ``args`` (the command line after ``lorakit``), ``cwd``,
``stdout`` and ``stderr`` (file paths), and prints one JSON list of exit codes in job order.
"""

from __future__ import annotations

import json
import os
import subprocess
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


# Seconds one command line may take before the driver kills it: every corpus case takes well under one.
JOB_TIMEOUT = 60


@dataclass(frozen=True)
class CliResult:
    """Exit code and output of one command line."""

    returncode: int
    stdout: str
    stderr: str


def run_cli_batch(
    commands: Sequence[Sequence[str]], workdir: Path, cwd: Path | None = None, prefix: Sequence[str] = ()
) -> list[CliResult]:
    """Run each command line through the real CLI in its own process; ``workdir`` keeps the logs.

    ``prefix`` is a command that runs the driver, such as ``setpriv`` with its options.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    jobs = [
        {
            "args": list(args),
            "cwd": str(cwd or workdir),
            "stdout": str(workdir / f"{index}.out"),
            "stderr": str(workdir / f"{index}.err"),
        }
        for index, args in enumerate(commands)
    ]
    jobs_path = workdir / "jobs.json"
    jobs_path.write_text(json.dumps(jobs))
    driver = subprocess.run(
        [*prefix, sys.executable, __file__, str(jobs_path)], capture_output=True, text=True, timeout=600, check=False
    )
    if driver.returncode != 0:
        raise RuntimeError(f"the forked CLI driver failed ({driver.returncode}):\n{driver.stderr}")
    codes = json.loads(driver.stdout)
    return [
        CliResult(code, Path(job["stdout"]).read_text(), Path(job["stderr"]).read_text())
        for code, job in zip(codes, jobs)
    ]


def _run_child(job: dict) -> int:
    from lorakit.cli import main

    os.chdir(job["cwd"])
    for fd, name in ((1, job["stdout"]), (2, job["stderr"])):
        target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    try:
        main(job["args"], prog_name="lorakit")
        code = 0
    except SystemExit as exit:
        # sys.exit(None) means success and sys.exit("text") failure, as for the interpreter.
        if exit.code is None:
            code = 0
        elif isinstance(exit.code, int):
            code = exit.code
        else:
            code = 1
    except BaseException:
        # What the interpreter itself does with an uncaught exception: a traceback and exit 1.
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _wait(pid: int, job: dict) -> int:
    """Wait for one child, killing it after ``job["timeout"]`` seconds (exit code -9 then)."""
    deadline = time.monotonic() + job.get("timeout", JOB_TIMEOUT)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            with open(job["stderr"], "a", encoding="utf-8") as handle:
                handle.write(f"\n[forked_cli: killed after {job.get('timeout', JOB_TIMEOUT)} s]\n")
            return -signal.SIGKILL
        time.sleep(0.005)


def main(jobs_path: str) -> None:
    import lorakit.cli  # noqa: F401  (imported once, before forking)

    with open(jobs_path, encoding="utf-8") as handle:
        jobs = json.load(handle)
    codes = []
    for job in jobs:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _run_child(job)
            finally:
                os._exit(code)
        codes.append(_wait(pid, job))
    print(json.dumps(codes))


if __name__ == "__main__":
    main(sys.argv[1])
