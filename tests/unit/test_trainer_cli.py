"""``mkctl train``: its arguments and what it prints (pure functions; handlers run in
tests/integration/test_trainer.py against a real daemon)."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from microkernel import cli_train


def parser() -> tuple[argparse.ArgumentParser, dict[str, Any]]:
    root = argparse.ArgumentParser(prog="mkctl")
    sub = root.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, **kwargs)

    return root, cli_train.register(command)


def test_register_adds_train_with_its_actions() -> None:
    root, handlers = parser()
    assert set(handlers) == {"train"}
    args = root.parse_args(["train", "start", "--steps", "50", "--batch-size", "8", "--job", "j1", "--follow",
                            "--config", '{"n_layers": 1}', "--json"])
    assert (args.train_action, args.steps, args.batch_size, args.job, args.follow) == ("start", 50, 8, "j1", True)
    assert args.config == {"n_layers": 1} and args.json is True and args.service == "trainer"
    assert root.parse_args(["train", "status"]).job is None
    assert root.parse_args(["train", "status", "j1"]).job == "j1"
    assert root.parse_args(["train", "stop", "j1"]).train_action == "stop"
    assert root.parse_args(["train", "follow", "j1", "--service", "t2"]).service == "t2"


@pytest.mark.parametrize("argv", [
    ["train"],
    ["train", "start", "--steps", "0"],
    ["train", "start", "--steps", "5", "--epochs", "1"],
    ["train", "start", "--config", "[1]"],
    ["train", "start", "--optimizer", "lion"],
    ["train", "stop"],
])  # fmt: skip
def test_usage_errors(argv: list[str]) -> None:
    root, _ = parser()
    with pytest.raises(SystemExit) as exc:
        root.parse_args(argv)
    assert exc.value.code == 2


def test_progress_bar() -> None:
    assert cli_train.progress_bar(0, 100, None, None, width=10) == "[..........]  0/100    0%"
    line = cli_train.progress_bar(25, 100, 2.13456, 1234.5, width=10)
    assert line == "[##........]  25/100   25%  loss 2.1346  1,234 samples/s"
    assert cli_train.progress_bar(120, 100, 1.0, None, width=4).startswith("[####]  120/100  100%")


def test_status_table_and_detail() -> None:
    assert cli_train.status_table([]) == "no training jobs"
    table = cli_train.status_table([{"job": "j1", "state": "running", "step": 5, "steps": 10, "loss": 2.5,
                                     "model": "charformer", "dataset": "corpus", "weights": None}])
    head, row = table.splitlines()
    assert head.split() == ["JOB", "STATE", "STEP", "LOSS", "MODEL", "DATASET", "WEIGHTS"]
    assert row.split() == ["j1", "running", "5/10", "2.5000", "charformer", "corpus", "-"]
    detail = cli_train.job_detail({"job": "j1", "state": "stopped", "step": 3, "error": None})
    assert "job:" in detail and "stopped" in detail and "error:" in detail


def test_end_lines() -> None:
    assert cli_train.end_line("train.finished", {"step": 9, "loss": 1.5, "weights": "models/x", "version": 2}) == \
        "finished at step 9 (loss 1.5000): weights models/x version 2"
    assert cli_train.end_line("train.stopped", {"step": 3, "loss": None}) == "stopped at step 3 (loss -)"
    assert cli_train.end_line("train.failed", {"step": 0, "error": "boom"}) == "failed at step 0: boom"
