"""A full disk or a read-only run folder is one line naming the file, and leaves nothing half-written.

The faults are real: a tmpfs mounted read-only or too small for what is written (the tests skip where mounting is
not allowed), and /dev/full, which refuses every write with ENOSPC."""

import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from lemb.cli import app


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(size: str, read_only_copy_of=None):
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
        mounted.append(point)
        if read_only_copy_of is not None:
            shutil.copytree(read_only_copy_of, point / "run")
            subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _fails_in_one_line(args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: "), result.stderr
    return result.stderr


def test_every_stage_on_a_read_only_run_folder_is_one_line(labelled_run, tiny_data, tmpfs):
    run = tmpfs("64m", read_only_copy_of=labelled_run) / "run"
    data = ["--queries", str(tiny_data["queries"]), "--corpus", str(tiny_data["corpus"]), "--executor", "local"]
    for args in (["retrieve", "--run", str(run), "--restart", *data],
                 ["label", "--run", str(run), "--restart", "--n-samples", "2", "--executor", "local"],
                 ["train", "--run", str(run), "--steps", "2"],
                 ["rescore", str(run)],
                 ["eval", "--run", str(run), "--embedder", "base=all-minilm-l6-v2", *data]):  # fmt: skip
        err = _fails_in_one_line(args)
        assert "cannot take the stage lock (Read-only file system)" in err, err


def test_a_full_disk_at_the_lock_write_is_one_line(labelled_run, tmpfs):
    run = tmpfs("16m") / "run"
    shutil.copytree(labelled_run, run)
    with open(run / "filler", "wb") as fh:  # the rest of the disk
        try:
            while True:
                fh.write(b"\0" * (1 << 16))
                fh.flush()
        except OSError:
            pass
    err = _fails_in_one_line(["rescore", str(run)])
    assert "rescore/.rank.lock: cannot take the stage lock (No space left on device)" in err, err
    assert not (run / "rescore").exists()


def test_a_full_disk_at_the_checkpoint_is_one_line_and_leaves_no_partial_file(labelled_run, tmpfs):
    """The default embedder's checkpoint (weights and AdamW moments, ~270 MB) cannot fit in 48 MiB."""
    run = tmpfs("48m") / "run"
    for stage in ("retrieve", "label"):
        shutil.copytree(labelled_run / stage, run / stage)
    err = _fails_in_one_line(["train", "--run", str(run), "--quiet", "--steps", "2", "--batch-size", "2",
                              "--save-every", "1"])  # fmt: skip
    assert "checkpoint.pt: cannot write (" in err and "MiB free there)" in err, err
    assert sorted(p.name for p in (run / "train").iterdir() if p.name != "log.jsonl") == []
