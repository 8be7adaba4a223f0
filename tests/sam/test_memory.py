"""sam.memory.reuse_freed_memory: glibc's malloc keeps freed blocks for reuse, unless the user said otherwise."""

import os
import subprocess
import sys
import textwrap

import pytest

from sam import memory

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None


def _run(env_extra):
    """What reuse_freed_memory() returns in a fresh process with `env_extra` in its environment."""
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {REPO!r})
        from sam.memory import reuse_freed_memory
        print(reuse_freed_memory())
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_sets_malloc_on_glibc_and_leaves_a_users_choice_alone():
    assert _run({}).strip() == "True"
    assert _run({"MALLOC_MMAP_THRESHOLD_": "65536"}).strip() == "False"
    assert _run({"MALLOC_TRIM_THRESHOLD_": "0"}).strip() == "False"
    assert _run({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}).strip() == "False"
    assert _run({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512"}).strip() == "True"


def test_other_systems_are_left_alone(monkeypatch):
    monkeypatch.setattr(memory.sys, "platform", "darwin")
    assert memory.reuse_freed_memory() is False


def test_the_persam_command_sets_it(monkeypatch, capsys):
    from persam.cli import commands as cli

    calls = []
    monkeypatch.setattr(cli, "reuse_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["--help"]) == 0
    assert calls == [1]
