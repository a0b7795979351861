"""Every bad input to `sla2 finetune`: one error line, a non-zero exit, nothing written, input untouched."""

import pytest
from conftest import sha256
from finetune_support import converted_file, one_thread, random_model  # noqa: F401
from PIL import Image

RUN = ("--steps", "1", "--batch-size", "2", "--eval-samples", "1", "--data-free-samples", "2", "--device", "cpu")


@pytest.fixture
def setup(cli, tmp_path):
    src = converted_file(cli, tmp_path, model=random_model())
    return src, tmp_path


def _images(folder, names=("a.png", "b.png")):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (30, 20), (200, 10, 10)).save(folder / name)
    return folder


def _data(kind, root):
    """Build a --data folder of the given kind under `root` and return its path."""
    if kind == "missing":
        return root / "nope"
    if kind == "file":
        (root / "file.png").write_bytes(b"x")
        return root / "file.png"
    if kind == "empty":
        (root / "empty").mkdir()
        return root / "empty"
    if kind == "flat":
        return _images(root / "flat")
    if kind == "mixed":
        folder = _images(root / "mixed")
        _images(folder / "cls")
        return folder
    if kind == "too_many_classes":  # the model has 4 classes
        for c in range(5):
            _images(root / "many" / f"c{c}", ("x.png",))
        return root / "many"
    if kind == "class_out_of_range":
        _images(root / "ints" / "0", ("x.png",))
        _images(root / "ints" / "7", ("x.png",))
        return root / "ints"
    if kind == "empty_class":
        _images(root / "ec" / "a", ("x.png",))
        (root / "ec" / "b").mkdir()
        return root / "ec"
    if kind == "corrupt_image":
        folder = _images(root / "bad" / "a", ("x.png",))
        (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
        return root / "bad"
    raise AssertionError(kind)


CASES = [
    # (extra arguments, expected exit code, part of the message)
    (("--steps", "0"), 2, "--steps must be >= 1"),
    (("--batch-size", "0"), 2, "--batch-size must be >= 1"),
    (("--lr", "0"), 2, "--lr must be a positive number"),
    (("--lr", "nan"), 2, "'--lr': nan is not a finite number"),
    (("--tau", "0"), 2, "--tau must be > 0"),
    (("--save-every", "-1"), 2, "--save-every must be >= 0"),
    (("--eval-samples", "0"), 2, "--eval-samples must be >= 1"),
    (("--e2e-weight", "-1"), 2, "--e2e-weight must be >= 0"),
    (("--data-free-samples", "0"), 2, "--data-free-samples must be >= 1"),
    (("--dtype", "fp16"), 2, "use fp32 or bf16"),
    (("--dtype", "int8"), 2, "use fp32 or bf16"),
    (("--topk-schedule", "0.1"), 2, "expected START:END"),
    (("--topk-schedule", "0.1:0.5"), 2, "END <= START"),
    (("--topk-schedule", "a:b"), 2, "expected START:END"),
    (("--topk-schedule", "0.5:0"), 2, "expected START:END"),
    (("--topk-schedule", "1.5:0.1"), 2, "expected START:END"),
    (("--topk-schedule", "nan:0.1"), 2, "expected START:END"),
    (("--class-index", "1"), 2, "no meaning with --data-free"),
    (("--device", "cuda:7"), 2, "--device"),
    (("--steps", "many"), 2, "--steps"),
    (("--backend", "cuda"), 2, "--backend 'cuda' is not one of"),
    (("--data-free-steps", "1"), 2, "--data-free-steps must be >= 2"),
    (("--data-free-cfg", "0"), 2, "--data-free-cfg must be a finite number > 0"),
    (("--data-free-cfg", "inf"), 2, "'--data-free-cfg': inf is not a finite number"),
    (("--data-free-states", "images"), 2, "--data-free-states must be one of noised, trajectory"),
    (("--t-distribution", "normal"), 2,
     "--t-distribution must be jit, uniform, early or logit-normal:MEAN,STD (STD > 0), got 'normal'"),
    (("--t-distribution", "logit-normal:0,nan"), 2, "got 'logit-normal:0,nan'"),
    (("--t-distribution", "logit-normal:0,-1"), 2, "(STD > 0), got 'logit-normal:0,-1'"),
    (("--t-distribution", "uniform", "--data-free-states", "trajectory"), 2,
     "--t-distribution 'uniform' draws t for noised states; the sampler's trajectory states come with their own t"),
    (("--data-free-states", "trajectory", "--full", "--objective", "v"), 2,
     "--objective 'v' needs clean images; the sampler's trajectory --data-free-states has none: use --objective "
     "distill"),
]


@pytest.mark.parametrize("extra,code,message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_options(cli, setup, extra, code, message):
    src, tmp_path = setup
    _check(cli, tmp_path, src, ("--data-free", *RUN, *extra), code, message)


DATA_CASES = [
    ("missing", (), "does not exist"),
    ("file", (), "is a file"),
    ("empty", (), "no images in"),
    ("flat", (), "pass --class-index N"),
    ("flat", ("--class-index", "9"), "--class-index 9 is out of range"),
    ("mixed", (), "mixes images and sub-folders"),
    ("mixed", ("--class-index", "0"), "--class-index is only for a flat folder"),
    ("too_many_classes", (), "the model has 4 classes"),
    ("class_out_of_range", (), "7 -> 7 is out of range"),
    ("empty_class", (), "has no images"),
]


@pytest.mark.parametrize("kind,extra,message", DATA_CASES, ids=[f"{k}{' '.join(e)}" for k, e, _ in DATA_CASES])
def test_bad_data_folders(cli, setup, kind, extra, message):
    src, tmp_path = setup
    data = _data(kind, tmp_path)
    _check(cli, tmp_path, src, ("--data", data, *RUN, *extra), 2, message)


def test_a_corrupt_image_is_one_line_when_it_is_read(cli, setup):
    """Indexing opens no file: a broken image is found when the loader decodes it, and nothing is written."""
    src, tmp_path = setup
    data = _data("corrupt_image", tmp_path)
    code, out, err = cli("finetune", src, "-o", tmp_path / "out.safetensors", "--data", data, *RUN)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: cannot read image") and "broken.jpg" in last, err
    assert "Traceback" not in err and not (tmp_path / "out.safetensors").exists()


def test_data_source_must_be_chosen_once(cli, setup):
    src, tmp_path = setup
    _check(cli, tmp_path, src, RUN, 2, "choose the training images: --data DIR")
    data = _images(tmp_path / "imgs" / "c")
    _check(cli, tmp_path, src, ("--data", data.parent, "--data-free", *RUN), 2, "exclude each other")
    _check(cli, tmp_path, src, ("--data", data.parent, "--data-free-states", "trajectory", *RUN), 2,
           "they need --data-free")


def test_outputs_and_inputs(cli, setup):
    src, tmp_path = setup
    _check(cli, tmp_path, src, ("--data-free", *RUN), 2, "missing -o/--output", output=None)
    _check(cli, tmp_path, src, ("--data-free", *RUN), 2, "is the input file", output=src)
    _check(cli, tmp_path, src, ("--data-free", *RUN), 2, "does not exist; create it first",
           output=tmp_path / "no" / "such" / "dir.safetensors")
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    _check(cli, tmp_path, src, ("--data-free", *RUN), 2, "already exists; pass --force", output=existing)
    assert existing.read_bytes() == b"keep me"
    _check(cli, tmp_path, src, ("--data-free", *RUN, "--resume"), 2, "no saved state")
    _check(cli, tmp_path, tmp_path / "missing.safetensors", ("--data-free", *RUN), 1, "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    _check(cli, tmp_path, garbage, ("--data-free", *RUN), 1, "garbage.safetensors")


def test_a_dense_model_has_nothing_to_finetune(cli, setup):
    _, tmp_path = setup
    dense = tmp_path / "dense.safetensors"
    _check(cli, tmp_path, dense, ("--data-free", *RUN), 2, "has no SLA2 layers to finetune; convert it first")


def _check(cli, tmp_path, src, args, code, message, output="default"):
    dst = tmp_path / "out.safetensors" if output == "default" else output
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    src_hash = sha256(src) if src.exists() and src.is_file() else None
    got, out, err = cli("finetune", src, *(("-o", dst) if dst is not None else ()), *args)
    assert got == code, err
    assert message in err, err
    assert out == "" and err.strip().count("\n") == 0 and err.startswith("error:"), err
    assert "Traceback" not in err
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert after == before, "nothing is written or touched"
    if src_hash is not None:
        assert sha256(src) == src_hash
