"""The dispatcher turns user errors into messages, never tracebacks."""

from __future__ import annotations

from foundation.errors import UserError
from foundation.guarded_cli import run_guarded
from pipelines.cli import main


def test_help_lists_every_stage(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("quantize", "abliterate", "export", "evaluate", "run", "inspect", "verify"):
        assert command in out


def test_unknown_command_is_rejected(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_user_error_becomes_a_message_with_the_fix(capsys):
    def failing(argv):
        raise UserError("--model [x]", "no such directory", "pass a local folder or a Hub id")

    assert run_guarded(failing, []) == 2
    err = capsys.readouterr().err
    assert "--model [x]: no such directory" in err
    assert "fix: pass a local folder or a Hub id" in err
    assert "Traceback" not in err
