"""What checking a shard's content costs: hashing a ~100 MB Parquet shard (whole-file digests) against reading it,
and Parquet's own page checksums (written, then verified while reading) against a plain read.

    python bench/shard_checksum.py [--mb 100] [--repeats 3]

A shard like label's: ids, texts, lists of sampled texts and log-probabilities; pyarrow's default compression.
Prints seconds per pass (best of the repeats) and each check's cost as a fraction of one read of the shard."""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import random
import tempfile
import time
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def label_like_table(target_mb: int, seed: int = 0) -> pa.Table:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(5000)]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    rows = []
    size = 0
    while size < target_mb * 2**20:
        samples = [text(12) for _ in range(8)]
        row = {"query_id": f"q{len(rows)}", "task": "qa", "key_id": f"k{rng.randrange(10**6)}",
               "query_text": text(12), "key_text": text(90), "target": text(4), "samples": samples,
               "sample_logprobs": [rng.uniform(-5, 0) for _ in samples],
               "target_logprob": rng.uniform(-5, 0)}  # fmt: skip
        size += sum(len(v) for v in (row["query_text"], row["key_text"], row["target"], *samples)) + 120
        rows.append(row)
    return pa.Table.from_pylist(rows)


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def file_digest(path: Path, algorithm: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, algorithm).hexdigest()


def crc32(path: Path) -> int:
    value = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            value = zlib.crc32(block, value)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    table = label_like_table(args.mb)
    with tempfile.TemporaryDirectory() as tmp:
        plain, checked = Path(tmp) / "plain.parquet", Path(tmp) / "checked.parquet"
        pq.write_table(table, plain)
        pq.write_table(table, checked, write_page_checksum=True)
        write_plain = best(lambda: pq.write_table(table, plain), args.repeats)
        write_checked = best(lambda: pq.write_table(table, checked, write_page_checksum=True), args.repeats)
        read = best(lambda: pq.read_table(plain), args.repeats)
        read_verified = best(lambda: pq.read_table(checked, page_checksum_verification=True), args.repeats)
        digests = {name: best(lambda n=name: file_digest(plain, n), args.repeats) for name in ("sha256", "blake2b")}
        digests["crc32"] = best(lambda: crc32(plain), args.repeats)
        result = {
            "machine": f"{platform.processor() or platform.machine()}, {platform.node()}",
            "rows": table.num_rows,
            "file_mb": round(plain.stat().st_size / 2**20, 1),
            "read_s": round(read, 3),
            "write_s": round(write_plain, 3),
            "page_checksums": {
                "write_s": round(write_checked, 3),
                "verified_read_s": round(read_verified, 3),
                "read_overhead": round(read_verified / read - 1, 3),
                "write_overhead": round(write_checked / write_plain - 1, 3),
            },  # fmt: skip
            "whole_file": {name: {"s": round(t, 3), "of_a_read": round(t / read, 3)} for name, t in digests.items()},
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
