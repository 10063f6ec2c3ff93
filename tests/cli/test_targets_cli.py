"""`obliviate targets` without a gateway: request bodies, files, usage errors, exit codes.

The commands against a real gateway on the real engine are in tests/e2e/test_operator_tools.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.cli_targets import Add, load_target_file
from server.console.views import parse_conversation, parse_examples
from server.entry import main
from server.launch import free_port


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        main(["targets", *args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_flags_and_file_make_one_request_body(tmp_path: Path) -> None:
    path = tmp_path / "target.yaml"
    path.write_text(
        "name: Harry Potter\n"
        "aliases: [Harry Potter]\n"
        "examples:\n  - Who wrote Harry Potter?\n"
        "  - {prompt: 'Where does Harry live?', answer: Privet Drive.}\n"
        "options: {fpr: 0.02}\n"
        "scope: {tenants: [acme]}\n"
    )
    add = Add(
        file=path,
        alias=["Hogwarts"],
        example=["Who is Hermione?"],
        retain=["Who wrote Dune?"],
        mode="eco+delta",
        option=["alpha=0.5", "small_base=/models/small"],
        tenant=["globex"],
        api_key=["key-1"],
    )
    assert add.body() == {
        "name": "Harry Potter",
        "aliases": ["Harry Potter", "Hogwarts"],
        "forget_examples": [
            "Who wrote Harry Potter?",
            {"prompt": "Where does Harry live?", "answer": "Privet Drive."},
            "Who is Hermione?",
        ],
        "retain_examples": ["Who wrote Dune?"],
        "mode": "eco+delta",
        "options": {"fpr": 0.02, "alpha": 0.5, "small_base": "/models/small"},
        "scope": {"tenants": ["acme", "globex"], "api_keys": ["key-1"]},
    }
    # Flags alone, and no scope key at all when no tenant or key is given.
    assert Add(name="X", example=["Who is X?"]).body() == {
        "name": "X",
        "forget_examples": ["Who is X?"],
    }


def test_json_files_are_read_as_json(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"name": "X", "forget_examples": ["Who?"], "mode": "delta"}))
    assert load_target_file(path)["mode"] == "delta"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "--example", "Who?"], "name"),
        (["add", "--name", "X"], "at least one prompt"),
        (["add", "--name", "X", "--example", "Who?", "--option", "novalue"], "KEY=VALUE"),
        (["add", "--file", "/nonexistent/target.yaml"], "cannot read"),
        (["threshold", "X", "high"], "not a number"),
        (["add", "--name", "X", "--example", "Who?", "--mode", "nope"], "--mode"),
        (["add", "--name", "X", "--example", "Who?", "--fpr", "lots"], "--fpr"),
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    # The port is closed, but a bad command line never gets as far as the gateway, except
    # `threshold`, whose value is checked before the target is looked up.
    code, out, err = run(capsys, *args, "--url", f"http://127.0.0.1:{free_port()}")
    assert code == 2 and message in err and out == ""


def test_a_bad_file_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    code, _, err = run(capsys, "add", "--file", str(path))
    assert code == 2 and "expected a mapping" in err


def test_an_unreachable_gateway_exits_3_and_keeps_stdout_clean(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OBLIVIATE_URL", f"http://127.0.0.1:{free_port()}")
    code, out, err = run(capsys, "list", "--json")
    assert code == 3 and out == "" and "cannot reach" in err and "OBLIVIATE_URL" in err


def test_the_token_file_is_read(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "list", "--token-file", str(tmp_path / "missing"))
    assert code == 2 and "--token-file" in err


def test_classify_reads_conversations() -> None:
    assert parse_conversation("Who wrote it?") == [{"role": "user", "content": "Who wrote it?"}]
    assert parse_conversation("system: Be brief.\nUser: Who wrote\nit?\nassistant: Me.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who wrote\nit?"},
        {"role": "assistant", "content": "Me."},
    ]
    messages = [{"role": "user", "content": "Hi"}]
    assert parse_conversation(json.dumps(messages)) == messages
    with pytest.raises(ValueError, match="JSON"):
        parse_conversation('[{"role": "wizard", "content": "x"}]')
    assert parse_examples("Who?\n\nWhere? => Paris.") == [
        "Who?",
        {"prompt": "Where?", "answer": "Paris."},
    ]
