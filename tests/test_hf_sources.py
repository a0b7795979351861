"""`hf://ORG/REPO[@REVISION]/PATH` as any command's model, read offline from a Hugging Face cache laid out here
by hand (refs, snapshots, blobs as huggingface_hub writes them); outputs stay local."""

from __future__ import annotations

import hashlib
import sys
import typing
from pathlib import Path

import pytest
from conftest import TINY, nonzero_model, one_json, sha256

from sla2cli import save_model
from sla2cli.checkpoints.sources import parse_hub_source
from sla2cli.cli import app
from sla2cli.commands._common import local_path, model_source
from sla2cli.conversion import convert_model
from sla2cli.errors import UsageError
from sla2cli.sla2.attention import SLA2Config

MAIN = "a" * 40  # commit hashes
TAGGED = "b" * 40


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _converted(path: Path, layers: str) -> Path:
    model = nonzero_model(TINY)
    convert_model(model, layer_spec=layers, settings=SLA2Config(block_q=16, block_k=16))
    return save_model(model, path)


def _cache(cache: Path, repo: str, commit: str, refs: tuple[str, ...], files: dict[str, Path]):
    """Files of `repo` at `commit` in the cache: each a blob named by its hash, linked from the snapshot."""
    root = cache / f"models--{repo.replace('/', '--')}"
    for name, source in files.items():
        data = source.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = root / "snapshots" / commit / name
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(Path("../..", *[".."] * name.count("/"), "blobs", blob.name))
    for ref in refs:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An offline cache holding org/repo: main has layers 2-3 converted, tag v1 layer 3 only. Returns the cache.

    huggingface_hub reads HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE once, at import: its constants are set too."""
    constants = pytest.importorskip("huggingface_hub.constants")
    home = tmp_path / "hf-home"
    cache = home / "hub"
    for name, value in (("HF_HOME", str(home)), ("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _cache(cache, "org/repo", MAIN, ("main",), {"model.safetensors": _converted(tmp_path / "m.st", "2-3")})
    _cache(cache, "org/repo", TAGGED, ("v1",), {"sub/model.safetensors": _converted(tmp_path / "t.st", "3")})
    return cache


def test_stats_reads_a_hub_source_offline_from_the_cache(cli, hub):
    code, out, err = cli("stats", "hf://org/repo/model.safetensors", "--json")
    assert code == 0, err
    r = one_json(out)
    assert r["converted_layers"] == [2, 3] and r["layout"] == "sla2cli"
    assert r["model"] == str(hub / "models--org--repo" / "snapshots" / MAIN / "model.safetensors")


@pytest.mark.parametrize("revision", ["v1", TAGGED])
def test_a_revision_reads_that_snapshot(cli, hub, revision):
    code, out, err = cli("stats", f"hf://org/repo@{revision}/sub/model.safetensors", "--json")
    assert code == 0, err
    assert one_json(out)["converted_layers"] == [3]


@pytest.mark.parametrize("source", ["hf://org/repo/missing.safetensors", "hf://org/other/model.safetensors",
                                    "hf://org/repo@v9/model.safetensors"])
def test_what_is_not_cached_offline_is_one_line(cli, hub, source):
    code, out, err = cli("stats", source)
    assert code == 1 and out == ""
    assert _one_line(err) == (f"error: {source} is not in the Hugging Face cache ({hub}) and HF_HUB_OFFLINE is set")


def _hub_error(name: str, message: str) -> Exception:
    """One of huggingface_hub's errors, built without the HTTP response its own constructor wants."""
    cls = getattr(pytest.importorskip("huggingface_hub.utils"), name)
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    return error


@pytest.mark.parametrize("error,line", [
    ("RepositoryNotFoundError", "repository org/repo not found on the Hub, or it is private or gated and your "
                                "token (HF_TOKEN or `hf auth login`) does not grant access"),
    ("GatedRepoError", "repository org/repo not found on the Hub, or it is private or gated and your token"),
    ("RevisionNotFoundError", "revision v2 not found in org/repo"),
    ("EntryNotFoundError", "m.pth not found in org/repo at v2"),
    ("OSError", "cannot fetch hf://org/repo@v2/m.pth (connection reset)"),
])
def test_what_the_hub_refuses_is_one_line(cli, monkeypatch, error, line):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise OSError("connection reset\nretry later") if error == "OSError" else _hub_error(error, "a\nparagraph")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    code, out, err = cli("stats", "hf://org/repo@v2/m.pth")
    assert code == 1 and out == "" and line in _one_line(err)


def test_a_malformed_hub_source_is_a_usage_error(cli):
    code, _, err = cli("stats", "hf://org/model.safetensors")
    assert code == 2 and "not a Hub source; write hf://ORG/REPO/PATH or hf://ORG/REPO@REVISION/PATH" in _one_line(err)


def test_without_huggingface_hub_the_error_says_what_to_install(cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # its import now fails
    code, _, err = cli("stats", "hf://org/repo/model.safetensors")
    assert code == 1 and _one_line(err).endswith('needs huggingface_hub; pip install "sla2cli[hf]"')


@pytest.mark.parametrize("args", [("convert", "-o"), ("stats", "--plot")])
def test_hub_outputs_are_refused(cli, hub, tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    command, flag = args
    code, _, err = cli(command, "hf://org/repo/model.safetensors", flag, "hf://org/repo/out.safetensors")
    assert code == 2 and "hf:// is read only for models, this takes a local path" in _one_line(err)
    assert not (tmp_path / "hf:").exists()


def test_a_hub_source_converts_to_a_local_file_and_its_cached_file_is_never_the_output(cli, hub, tmp_path):
    snapshot = hub / "models--org--repo" / "snapshots" / MAIN / "model.safetensors"
    blob = snapshot.resolve()
    before, files = sha256(blob), sorted(hub.rglob("*"))
    for dst in (snapshot, blob):
        code, _, err = cli("convert", "hf://org/repo/model.safetensors", "-o", dst, "--layers", "none", "--force",
                           "--device", "cpu")
        assert code == 2 and "is the input file" in _one_line(err)
    assert sha256(blob) == before and snapshot.is_symlink() and sorted(hub.rglob("*")) == files
    code, out, err = cli("convert", "hf://org/repo/model.safetensors", "-o", tmp_path / "dense.safetensors",
                         "--layers", "none", "--device", "cpu", "--json")
    assert code == 0, err
    assert one_json(out)["source"] == str(snapshot) and (tmp_path / "dense.safetensors").is_file()


def test_hub_source_parsing():
    assert parse_hub_source("hf://org/repo/a/b.pth") == ("org/repo", "a/b.pth", None)
    assert parse_hub_source("hf://org/repo@refs%2Fpr%2F1/m.safetensors") == ("org/repo", "m.safetensors", "refs/pr/1")
    for bad in ("hf://org", "hf://org/repo", "hf://org/repo/", "hf://org/repo@/m.pth", "hf:///repo/m.pth"):
        with pytest.raises(UsageError):
            parse_hub_source(bad)


def test_every_path_parameter_is_a_model_source_or_local():
    """A Path parameter without a parser would take `hf://org/repo/x` for the local folder `hf:`."""
    found = {}
    for command in app.registered_commands:
        for name, hint in typing.get_type_hints(command.callback, include_extras=True).items():
            if typing.get_origin(hint) is typing.Annotated and Path in (hint.__origin__, *typing.get_args(
                    hint.__origin__)):
                found[(command.name, name)] = next(e for e in hint.__metadata__ if hasattr(e, "parser")).parser
    models = {k for k, parser in found.items() if parser is model_source}
    assert models == {(c, "model_path") for c in ("finetune", "profile", "eval-fid", "stats", "quality")} | {
        ("convert", "src"), ("eval-fid", "compare_to"), ("quality", "dense_path")}
    assert {k: p for k, p in found.items() if k not in models and p is not local_path} == {}
    assert ("convert", "output") in found and ("demo", "out_dir") in found
