"""Surveying a library: the folder walk, closable adapters (no leaked descriptors),
truncated downloads described from their header, and files that are not LoRAs named."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import FIXTURES, ROOT


def _under_fd_limit(code: str, limit: int = 40) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child whose open-file limit is ``limit``."""
    prelude = f"import resource\nresource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit}))\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_load_does_not_leak_descriptors() -> None:
    """200 loads under a 40-descriptor limit: closed explicitly, by ``with``, or dropped."""
    done = _under_fd_limit(f"""
        import os, loratool
        path = {str(FIXTURES / "sd15_kohya_lora.safetensors")!r}
        start = len(os.listdir("/proc/self/fd"))
        for i in range(200):
            if i % 3 == 0:
                with loratool.load(path) as a:
                    assert a.modules
            elif i % 3 == 1:
                a = loratool.load(path)
                next(iter(a.modules.values())).params["lora_down"].load()  # a tensor read
                a.close()
                a.close()  # idempotent
            else:
                assert loratool.load(path).modules  # never closed, dropped
        assert len(os.listdir("/proc/self/fd")) == start, os.listdir("/proc/self/fd")
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
