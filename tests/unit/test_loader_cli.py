"""``mkctl models`` / ``mkctl infer``: argument parsing and output, without a kernel."""

from __future__ import annotations

import argparse

import pytest

from microkernel import cli_models


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mkctl")
    sub = top.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, **kwargs: object) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, **kwargs)

    assert set(cli_models.register(command)) == {"models", "infer"}
    return top


def test_models_actions_parse() -> None:
    p = parser()
    args = p.parse_args(["models", "load", "charformer", "--version", "3", "--weights", "models/x", "--arch", "a:b",
                         "--config", '{"generate": 4}', "--no-wait", "--json"])
    assert (args.models_action, args.name, args.version, args.weights, args.arch) == ("load", "charformer", 3, "models/x", "a:b")
    assert args.config == {"generate": 4} and args.wait is False and args.json and args.service == "loader"
    args = p.parse_args(["models", "default", "m", "2"])
    assert (args.models_action, args.name, args.version) == ("default", "m", 2)
    args = p.parse_args(["models", "unload", "m"])
    assert args.version is None
    for bad in (["models", "default", "m", "0"], ["models", "load", "m", "--config", "[1]"], ["models"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


def test_infer_parses_inputs_and_options() -> None:
    args = parser().parse_args(["infer", "--service", "chat", "hello", "world", "--deadline-ms", "50"])
    assert (args.service, args.inputs, args.deadline_ms, args.json_input) == ("chat", ["hello", "world"], 50.0, False)


def test_output() -> None:
    rows = [{"name": "m", "version": 1, "default": True, "arch": "charformer", "bytes": 2048, "params": 512,
             "device": "cpu", "state": "ready", "source": "store:models/m@1"},
            {"name": "m", "version": 2, "default": False, "arch": "?", "bytes": 0, "params": 0, "device": "cpu",
             "state": "failed", "source": "file:/w.safetensors", "error": "boom"}]
    lines = cli_models.models_table(rows).splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "DEFAULT", "STATE", "ARCH", "SIZE", "PARAMS", "DEVICE", "SOURCE"]
    assert lines[1].split()[:4] == ["m", "1", "*", "ready"] and "store:models/m@1" in lines[1]
    assert "file:/w.safetensors (boom)" in lines[2]
    assert cli_models.models_table([]) == "no models loaded"
    assert cli_models.result_text("a continuation") == "a continuation"
    assert cli_models.result_text([1.5, 2]) == "[1.5, 2]"
    line = cli_models.load_line({"name": "m", "version": 2, "state": "ready", "arch": "a", "bytes": 1024,
                                 "params": 256, "device": "cpu"})
    assert line.startswith("m v2: ready (a, ") and line.endswith("256 params, cpu)")
