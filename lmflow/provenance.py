"""Which version of a spec a run ran: the repository's commit (and whether the spec file had
local changes), and always a hash of its content, so a run can be traced to the exact spec and
repeated."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any


def spec_version(path: Path) -> dict[str, Any]:
    """`{"sha256", "commit", "dirty", "repo_path"}`; commit and repo_path are None outside git."""
    path = path.resolve()
    version: dict[str, Any] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                               "commit": None, "dirty": None, "repo_path": None}
    try:
        root = _git(path.parent, "rev-parse", "--show-toplevel")
        if root is None:
            return version
        relative = path.relative_to(Path(root).resolve()).as_posix()
        tracked = _git(path.parent, "ls-files", "--error-unmatch", "--", relative, cwd=root)
        # the repository's commit, not the file's last one: it also pins the prompts, schemas
        # and helper modules next to the spec, which a re-run checks out with it
        commit = _git(path.parent, "rev-parse", "HEAD", cwd=root)
        if tracked is None or not commit:
            return version
        changed = _git(path.parent, "status", "--porcelain", "--", relative, cwd=root)
        version.update(commit=commit, dirty=bool(changed), repo_path=relative)
    except (OSError, ValueError):
        pass  # no git, or the file is outside the repository: the hash says enough
    return version


def unpublished(path: Path) -> list[str]:
    """What a machine checking out the spec's commit would not see, as sentences: files of the
    spec's folder (the spec, its prompts, schemas, modules) changed or new in the working copy,
    and a commit on no remote branch of a repository that has remotes. Empty outside git."""
    path = path.resolve()
    root = _git(path.parent, "rev-parse", "--show-toplevel")
    commit = _git(path.parent, "rev-parse", "HEAD")
    if root is None or not commit:
        return []
    said = []
    folder = path.parent.relative_to(Path(root).resolve()).as_posix()
    where = folder or "."
    changed = "\n".join(filter(None, [
        _git(path.parent, "diff", "--name-only", "HEAD", "--", where, cwd=root),
        _git(path.parent, "ls-files", "--others", "--exclude-standard", "--", where, cwd=root)]))
    if changed:
        names = sorted(set(changed.splitlines()))
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        said.append(f"the working copy differs from commit {commit[:12]} ({shown}): workers run the "
                    "committed version; commit the changes to deploy them")
    if _git(path.parent, "remote", cwd=root) and not _git(path.parent, "branch", "-r", "--contains",
                                                          commit, cwd=root):
        said.append(f"commit {commit[:12]} is on no remote branch: workers on other machines cannot "
                    "check it out; push it")
    return said


def _git(where: Path, *args: str, cwd: str | None = None) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd or where, capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def version_tags(name: str, version: dict[str, Any]) -> list[str]:
    """Prefect tags of a run: `lmflow`, `spec:NAME`, `commit:SHA12` (+ `dirty`) or `sha256:HASH12`."""
    tags = ["lmflow", f"spec:{name}"]
    if version.get("commit"):
        tags.append(f"commit:{version['commit'][:12]}")
        if version.get("dirty"):
            tags.append("dirty")
    tags.append(f"sha256:{version['sha256'][:12]}")
    return tags
