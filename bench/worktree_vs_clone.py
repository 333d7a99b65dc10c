"""Benchmark: start a ticket's working copy by `git worktree add` from a shared clone vs a fresh clone.

Builds a synthetic repository (20,000 files, a few commits) in a temporary directory, then times both
ways side by side (interleaved, so both see the same disk and cache conditions) and prints one JSON
object. Run: `uv run python bench/worktree_vs_clone.py [--files N] [--runs N] [--dir PARENT]`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

FILES_PER_DIR = 100


def git_env(home: Path) -> dict[str, str]:
    """An isolated environment: no user or system config, a fixed identity."""
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "LANG": "C",
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@example.com",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@example.com",
    }


def git(cwd: Path, env: dict[str, str], *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def file_text(index: int, revision: int) -> str:
    """Seeded pseudo-random hex lines (0.5-3 KiB): source-like sizes that do not compress to nothing."""
    rng = random.Random(index * 1_000 + revision)
    return "".join(rng.randbytes(32).hex() + "\n" for _ in range(8 + rng.randrange(40)))


def build_origin(root: Path, env: dict[str, str], files: int, commits: int) -> Path:
    """A bare origin with `files` files over `commits` commits (each later commit edits 1%)."""
    source = root / "source"
    git(root, env, "init", "--quiet", "--initial-branch=main", str(source))
    for index in range(files):
        path = source / f"dir{index // FILES_PER_DIR:04d}" / f"file{index:05d}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(file_text(index, 0))
    git(source, env, "add", "--all")
    git(source, env, "commit", "--quiet", "-m", "initial")
    for revision in range(1, commits):
        for index in range(revision, files, 100):
            path = source / f"dir{index // FILES_PER_DIR:04d}" / f"file{index:05d}.txt"
            path.write_text(file_text(index, revision))
        git(source, env, "commit", "--quiet", "-am", f"revision {revision}")
    origin = root / "origin.git"
    git(root, env, "clone", "--quiet", "--bare", "--no-local", str(source), str(origin))
    return origin


def timed(cwd: Path, env: dict[str, str], *args: str) -> float:
    started = time.perf_counter()
    git(cwd, env, *args)
    return time.perf_counter() - started


def size_of(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--commits", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temporary directory")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="worktree-bench-", dir=options.dir) as temp:
        root = Path(temp)
        env = git_env(root / "home")
        (root / "home").mkdir()
        started = time.perf_counter()
        origin = build_origin(root, env, options.files, options.commits)
        build_seconds = time.perf_counter() - started
        shared = root / "shared"
        git(root, env, "clone", "--quiet", "--no-checkout", "--no-local", str(origin), str(shared))

        worktree_times: list[float] = []
        clone_times: list[float] = []
        for run in range(options.runs):
            branch, worktree = f"ticket/bench-{run}", root / "worktrees" / f"ticket-{run}"
            add = ["worktree", "add", "--quiet", "--no-track", "-B", branch, str(worktree), "origin/main"]
            worktree_times.append(timed(shared, env, *add))
            clone = ["clone", "--quiet", "--no-local", str(origin), str(root / "clones" / str(run))]
            clone_times.append(timed(root, env, *clone))
        worktree_median = statistics.median(worktree_times)
        clone_median = statistics.median(clone_times)
        print(
            json.dumps(
                {
                    "files": options.files,
                    "commits": options.commits,
                    "runs": options.runs,
                    "worktree_add_median_s": round(worktree_median, 4),
                    "clone_no_local_median_s": round(clone_median, 4),
                    "speedup": round(clone_median / worktree_median, 2),
                    "worktree_add_s": [round(value, 4) for value in worktree_times],
                    "clone_no_local_s": [round(value, 4) for value in clone_times],
                    "origin_size_mib": round(size_of(origin) / 2**20, 1),
                    "git_data_per_ticket_mib": {
                        "worktree": round(size_of(shared / ".git" / "worktrees" / "ticket-0") / 2**20, 2),
                        "clone": round(size_of(root / "clones" / "0" / ".git") / 2**20, 2),
                    },
                    "build_origin_s": round(build_seconds, 2),
                    "git": git(root, env, "--version").removeprefix("git version "),
                }
            )
        )


if __name__ == "__main__":
    main()
