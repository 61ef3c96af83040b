"""Plug-ins are found by ``module:Class`` or through the ``microkernel.services`` entry-point group."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from microkernel.client import Client
from tests.integration.conftest import start_kernel

PLUGIN = '''
from services.base import Service, rpc


class Shouter(Service):
    """An installed third-party plug-in."""

    @rpc
    def shout(self, text: str) -> str:
        return text.upper() + self.config.get("suffix", "!")
'''


def install_fake_distribution(site: Path) -> None:
    """A real (if minimal) installed distribution: package + dist-info with an entry point."""
    (site / "acme_plugins").mkdir(parents=True)
    (site / "acme_plugins" / "__init__.py").write_text(PLUGIN)
    info = site / "acme_plugins-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent(
            """
            [microkernel.services]
            shouter = acme_plugins:Shouter
            """
        )
    )


@pytest.mark.parametrize("entry", ["shouter", "acme_plugins:Shouter"])
def test_plugin_by_entry_point_or_import_path(short_tmp: str, monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    site = Path(short_tmp) / "site"
    install_fake_distribution(site)
    monkeypatch.setenv("PYTHONPATH", str(site))
    config = f"""
[services.loud]
entry = "{entry}"
[services.loud.config]
suffix = "!!"
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        c.wait_ready("loud", timeout=30)
        assert c.call("loud", "shout", text="hi") == "HI!!"
        assert c.lookup("loud")["methods"] == ["shout"]


def test_unknown_entry_point_fails_with_a_clear_exit(short_tmp: str) -> None:
    config = """
[services.ghost]
entry = "no-such-plugin"
restart = "temporary"
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        with c.events("service.exited", since_seq=0) as stream:
            env = stream.next_event(timeout=30)
        assert env is not None and env.message.reason["text"] == "exit(2)"
