"""Run a command in a child process under a cgroup v1 memory limit (page cache included), as root.

`run_limited` creates `/sys/fs/cgroup/memory/mixserve-bench-<pid>-<n>`, sets `memory.limit_in_bytes`,
moves the child into it before `exec` (so every page it touches, page cache of its reads included,
is charged there), waits, reads `memory.max_usage_in_bytes`, and removes the group. Without a usable
memory controller it runs the command unlimited and says why in the result.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

MEMORY_ROOT = Path("/sys/fs/cgroup/memory")
_counter = itertools.count()


@dataclass
class LimitedRun:
    returncode: int
    stdout: str
    stderr: str
    limited: bool
    """Whether the memory limit was really applied."""
    note: str
    """Why not, when it was not."""
    max_usage_bytes: int | None
    """Peak memory (anonymous + page cache) of the group, when limited."""


def drop_file_cache(paths: list[Path]) -> None:
    """Ask the kernel to drop cached pages of these files (clean pages go; needs no root)."""
    for path in paths:
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _make_group(limit_bytes: int) -> tuple[Path | None, str]:
    if not (MEMORY_ROOT / "memory.limit_in_bytes").exists():
        return None, f"no cgroup v1 memory controller at {MEMORY_ROOT}"
    group = MEMORY_ROOT / f"mixserve-bench-{os.getpid()}-{next(_counter)}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        swap = group / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limit_bytes))
    except OSError as e:
        if group.exists():
            group.rmdir()
        return None, f"cannot create a memory cgroup ({e})"
    return group, ""


def _remove_group(group: Path) -> None:
    try:
        (group / "memory.force_empty").write_text("0")
    except OSError:
        pass
    try:
        group.rmdir()
    except OSError:
        pass


def run_limited(cmd: list[str], limit_bytes: int | None, timeout_s: float) -> LimitedRun:
    """Run `cmd` (capturing output) under `limit_bytes` of memory (None: no limit)."""
    group, note = (None, "no limit asked") if limit_bytes is None else _make_group(limit_bytes)

    def enter() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, preexec_fn=enter)
        peak = int((group / "memory.max_usage_in_bytes").read_text()) if group is not None else None
        return LimitedRun(proc.returncode, proc.stdout, proc.stderr, group is not None, note, peak)
    except subprocess.TimeoutExpired as e:
        return LimitedRun(124, str(e.stdout or ""), f"timed out after {timeout_s}s", group is not None, note, None)
    finally:
        if group is not None:
            _remove_group(group)
