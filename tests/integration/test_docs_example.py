"""The plug-in in docs/writing-a-service.md runs as printed: the doc cannot drift from the SDK."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from microkernel.client import Client
from tests.integration.conftest import start_kernel

DOC = (Path(__file__).resolve().parents[2] / "docs" / "writing-a-service.md").read_text()


def code_block(language: str, after: str) -> str:
    start = DOC.index(after)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(DOC, start)
    assert match, f"no {language} block after {after!r}"
    return match.group(1)


def test_the_documented_plugin_runs_under_the_daemon(short_tmp: str, monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = code_block("python", "## 1. The plug-in")
    assert len(plugin.strip().splitlines()) <= 40
    site = Path(short_tmp) / "site"
    (site / "myplugins").mkdir(parents=True)
    (site / "myplugins" / "__init__.py").write_text("")
    (site / "myplugins" / "counter.py").write_text(plugin)
    monkeypatch.setenv("PYTHONPATH", str(site))
    config = code_block("toml", "## 2. Run it under the daemon")
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        c.wait_ready("counter", timeout=30)
        assert c.call("counter", "count", text="the quick brown fox")["words"] == 4
        (Path(short_tmp) / "words.txt").write_text("a b c")
        assert c.call("counter", "count_file", path=str(Path(short_tmp) / "words.txt"))["words"] == 3
        with c.events("counter.milestone") as stream:
            for _ in range(12):
                c.call("counter", "count", text="many words " * 5)
            event = stream.next_event(timeout=10)
        assert event is not None and event.message.data["total"] >= 50
