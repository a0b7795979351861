"""Library errors name parameters (`steps`); the CLI shows the same failure with its flag (`--steps`)."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

import sla2cli
from sla2cli.commands._errors import FLAGS, cli_message, flag
from sla2cli.errors import InvalidParameter, Param, ParameterError, UsageError
from sla2cli.finetune import FinetuneConfig
from sla2cli.sampling import sampler_settings
from sla2cli.sla2.attention import SLA2Config

LIBRARY = Path(sla2cli.__file__).parent
COMMAND_LAYER = {LIBRARY / "cli.py", LIBRARY / "commands"}


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("call,parameter,message", [
    (lambda: sampler_settings("jit", steps=0, cfg=1.0, cfg_interval=None, time_shift=None, preset=None),
     "steps", "steps must be >= 1, got 0"),
    (lambda: FinetuneConfig(e2e_weight=-1.0), "e2e_weight", "e2e_weight must be >= 0, got -1.0"),
    (lambda: SLA2Config(block_q=48), "block_q", "block_q must be one of 16, 32, 64, 128, got 48"),
])
def test_library_errors_name_the_parameter(call, parameter, message):
    with pytest.raises(InvalidParameter) as info:
        call()
    exc = info.value
    assert exc.parameter == parameter and str(exc) == message and "--" not in str(exc)
    assert isinstance(exc, ValueError) and isinstance(exc, UsageError) and exc.exit_code == 2
    assert str(pickle.loads(pickle.dumps(exc))) == message  # crosses process boundaries intact


def test_the_cli_renders_the_same_failure_with_the_flag(cli, tmp_path):
    with pytest.raises(InvalidParameter, match=r"^steps must be >= 1, got 0$"):
        FinetuneConfig(steps=0)
    code, out, err = cli("finetune", tmp_path / "model.safetensors", "-o", tmp_path / "out.safetensors",
                         "--data-free", "--steps", "0", "--device", "cpu")
    assert code == 2 and out == ""
    assert _one_line(err) == "error: --steps must be >= 1, got 0"
    assert not list(tmp_path.iterdir())


def test_a_parameter_can_map_to_different_flags_per_command(cli, tmp_path):
    assert flag("dst", "profile") == "--plot" and flag("dst", "convert") == flag("dst", None) == "-o/--output"
    code, _, err = cli("profile", "--arch", "JiT-B/16", "--device", "cpu", "--plot", tmp_path, "--force")
    assert code == 2 and _one_line(err) == f"error: {tmp_path} is a directory; --plot needs a file path"
    code, _, err = cli("profile", "--arch", "JiT-B/16", "--device", "cpu", "--batch-size", "0")
    assert code == 2 and _one_line(err) == "error: --batch-size must be >= 1, got 0"


def test_further_parameters_in_a_message_are_flags_too():
    exc = InvalidParameter("dst", "x.pt", "{value} already exists; pass {force} to overwrite it",
                           force=Param("force=True"))
    assert str(exc) == "x.pt already exists; pass force=True to overwrite it"
    assert cli_message(exc, "convert") == "x.pt already exists; pass --force to overwrite it"
    assert exc.parameters == ["dst", "force=True"]


def _library_trees() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), str(path)) for path in sorted(LIBRARY.rglob("*.py"))
            if not any(path == p or p in path.parents for p in COMMAND_LAYER)}


def _parameter_positions(trees) -> dict[str, int]:
    """Library functions that take the name of the parameter they check as `parameter`: {name: position}."""
    positions = {}
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                args = [a.arg for a in node.args.posonlyargs + node.args.args]
                if "parameter" in args and args[0] != "self":
                    positions[node.name] = args.index("parameter")
    return positions


def _raised_parameters() -> dict[str, list[str]]:
    """Every parameter a library error can name: {name: [where]}; a name that cannot be read fails the test.

    Seen: the first argument of an error or `Param`, `parameter=` keywords and defaults, and string literals
    passed positionally as `parameter` to a library checker called by its bare name.
    """
    families = {"ParameterError", "Param"} | {c.__name__ for c in _subclasses(ParameterError)}
    trees = _library_trees()
    positions = _parameter_positions(trees)
    found: dict[str, list[str]] = {}
    for path, tree in trees.items():
        for node in ast.walk(tree):
            where = f"{path.relative_to(LIBRARY)}:{getattr(node, 'lineno', 0)}"
            names: list[ast.expr] = []
            if isinstance(node, ast.Call):
                func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                if func in families:
                    assert node.args, f"{where}: {func} needs the parameter as its first argument"
                    first = node.args[0]
                    if not (isinstance(first, ast.Name) and first.id == "parameter"):
                        names.append(first)
                names += [k.value for k in node.keywords if k.arg == "parameter"]
                at = positions.get(func) if isinstance(node.func, ast.Name) else None
                if at is not None and len(node.args) > at and isinstance(node.args[at], ast.Constant):
                    names.append(node.args[at])
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.posonlyargs + node.args.args
                defaults = dict(zip([a.arg for a in args][len(args) - len(node.args.defaults):], node.args.defaults))
                defaults.update({a.arg: d for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d})
                names += [d for a, d in defaults.items() if a == "parameter"]
            for name in names:
                assert isinstance(name, ast.Constant) and isinstance(name.value, str), \
                    f"{where}: name the parameter with a string literal (or pass it on as `parameter`)"
                found.setdefault(name.value, []).append(where)
    return found


def _subclasses(cls) -> set[type]:
    return {s for c in cls.__subclasses__() for s in (c, *_subclasses(c))}


def test_every_parameter_the_library_names_has_a_flag_entry():
    raised = _raised_parameters()
    assert {"steps", "ref", "topk", "num_samples", "force=True"} <= set(raised)  # the scan sees them
    missing = {name: where for name, where in raised.items() if name not in FLAGS}
    assert not missing, f"add these to FLAGS in sla2cli/commands/_errors.py (None: no flag sets it): {missing}"
    stale = sorted(set(FLAGS) - set(raised))
    assert not stale, f"FLAGS maps parameters no library error names: {stale}"
    for name, entry in FLAGS.items():
        for value in entry.values() if isinstance(entry, dict) else [entry]:
            assert value is None or value.startswith("-"), (name, value)
