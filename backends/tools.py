"""Running a backend's external tool: one line when it is missing or fails."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from crystalc.errors import CrystalError


def run_tool(cmd: list[str], needs: tuple[str, ...], what: str, cwd: Path | None = None,
             timeout: float | None = None) -> str:
    """Run cmd and return its stdout; a CrystalError naming `what` when a needed tool is missing, the run
    fails (with the start of its error output) or outlasts `timeout` seconds."""
    for tool in needs:
        if shutil.which(tool) is None:
            raise CrystalError(f"{what} needs '{tool}', which is not on PATH")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise CrystalError(f"{what} did not finish within {timeout:g} s") from e
    if proc.returncode != 0:
        detail = " ".join((proc.stderr or proc.stdout).split())[:2000]
        raise CrystalError(f"{what} failed ({shlex.join(cmd)}): {detail}")
    return proc.stdout
