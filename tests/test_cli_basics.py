"""CLI basics a user expects: --version, `python -m sla2cli`, real argument names in usage lines, and help text
that rich renders as written (no emoji out of "START:END:")."""

import os
import subprocess
import sys

from sla2cli import __version__


def test_version(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"sla2cli {__version__}"


def test_python_m_sla2cli_is_the_cli():
    proc = subprocess.run([sys.executable, "-m", "sla2cli", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"sla2cli {__version__}"


def test_usage_names_the_model_argument_and_help_has_no_emoji(cli):
    env = {"COLUMNS": "200"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        code, out, _ = cli("finetune", "--help")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert code == 0 and "MODEL" in out and "{src}" not in out and "{model_path}" not in out
    assert "START:END" in out and "\N{END WITH LEFTWARDS ARROW ABOVE}" not in out


def test_bracketed_text_in_an_error_is_shown_not_eaten_as_markup(tmp_path):
    """Messages are plain text: a path like `[object]` or `x[1]` must reach the user intact."""
    from sla2cli.cli import run

    missing = tmp_path / "[object]" / "m.safetensors"
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run(["stats", str(missing)])
    assert code != 0
    assert "[object]" in err.getvalue()
