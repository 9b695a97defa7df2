"""Ingest throughput: our ingest vs `aws s3 sync`, into the same local S3 server (not a test).

    .venv/bin/python bench/ingest_bench.py [SOURCE] [--subset N]

SOURCE is a folder-per-class dataset (default: ../shared/data/utkface_crop_part1, about 10k
images). The script starts `moto_server` on 127.0.0.1 as a subprocess (its own process, so it does
not share a GIL with what is measured), warms the page cache, then times, each as a subprocess:

  1. ours:    gender_tasks.data.ingest.ingest_folder into s3://bench-ours/pipeline (scan: read, sha256,
              header check, decode, phash; then parallel uploads; then the manifest);
  2. awscli:  aws s3 sync of the class folders into s3://bench-awscli/sync;
  3. ours again: the same ingest, which must upload nothing.

It prints wall time, images/s and MB/s of each, and ours/awscli (throughput ratio, > 1: ours is
faster). `--subset N` takes the first N images of each class (symlinks in a temporary folder), for
quick profiling. Results are recorded by hand in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "utkface_crop_part1"
CLASSES = ("female", "male")
log = logging.getLogger("ingest_bench")


def class_files(root: Path) -> list[Path]:
    from gender_tasks.data.folders import IMAGE_SUFFIXES, find_class_dirs

    return [p for d in find_class_dirs(root).values() for p in sorted(d.rglob("*"))
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]  # fmt: skip


def make_subset(root: Path, n: int) -> Path:
    """The first n images of each class, as symlinks in a temporary folder (nothing is copied)."""
    from gender_tasks.data.folders import find_class_dirs

    out = Path(tempfile.mkdtemp(prefix="ingest-bench-subset-"))
    for label, folder in find_class_dirs(root).items():
        (out / label).mkdir()
        for p in sorted(folder.iterdir())[:n]:
            (out / label / p.name).symlink_to(p)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(port: int) -> subprocess.Popen:
    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("moto_server did not start within 60 s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(cmd: list[str], env: dict, server_pid: int) -> dict:
    """Run `cmd`; its wall time, its own CPU time and the S3 server's CPU time meanwhile."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    server = cpu_seconds(server_pid)
    started = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {"wall": wall, "cpu": after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime,
            "server_cpu": cpu_seconds(server_pid) - server, "stdout": done.stdout}  # fmt: skip


def run_ours(source: str, storage_uri: str, upload_workers: int) -> None:
    """The measured side of 'ours' (a subprocess of this script): one ingest, its summary as JSON."""
    from gender_tasks.data.ingest import ingest_folder
    from gender_tasks.storage import open_storage

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    print(json.dumps(ingest_folder(Path(source), open_storage(storage_uri), upload_workers=upload_workers)))


def count_objects(endpoint: str, bucket: str) -> int:
    import boto3

    pages = boto3.client("s3", endpoint_url=endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sum(page.get("KeyCount", 0) for page in pages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", default=str(DEFAULT_SOURCE))
    parser.add_argument("--subset", type=int, default=0, help="only the first N images of each class")
    parser.add_argument("--upload-workers", type=int, default=0, help="ingest's upload threads (default: its own)")
    parser.add_argument("--run-ours", nargs=2, metavar=("SOURCE", "STORAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from gender_tasks.data.ingest import UPLOAD_WORKERS

    workers = args.upload_workers or UPLOAD_WORKERS
    if args.run_ours:
        return run_ours(*args.run_ours, workers)

    source = Path(args.source).resolve()
    if not source.is_dir():
        raise SystemExit(f"source folder {source} does not exist; give a folder with female/ and male/")
    if args.subset:
        source = make_subset(source, args.subset)
    load_before = os.getloadavg()
    files = class_files(source)
    nbytes = sum(len(p.read_bytes()) for p in files)  # also warms the page cache for both tools
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench-access-key",
           "AWS_SECRET_ACCESS_KEY": "bench-secret-key", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull}  # fmt: skip
    env.pop("GENDER_S3_CONN_ID", None)
    os.environ.update({k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                           "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")})  # fmt: skip
    server = start_moto(port)
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        for bucket in ("bench-ours", "bench-awscli"):
            client.create_bucket(Bucket=bucket)
        me = [sys.executable, str(Path(__file__).resolve()), "--upload-workers", str(workers), "--run-ours"]
        ours = timed([*me, str(source), "s3://bench-ours/pipeline"], env, server.pid)
        aws_cmd = [str(BIN / "aws"), "s3", "sync", str(source), "s3://bench-awscli/sync", "--exclude", "*",
                   *[a for c in CLASSES for a in ("--include", f"{c}/*")], "--only-show-errors", "--no-progress"]  # fmt: skip
        aws = timed(aws_cmd, env, server.pid)
        again = timed([*me, str(source), "s3://bench-ours/pipeline"], env, server.pid)
        ours_objects, aws_objects = count_objects(endpoint, "bench-ours"), count_objects(endpoint, "bench-awscli")
    finally:
        server.terminate()
        server.wait(timeout=30)
        if args.subset:
            shutil.rmtree(source, ignore_errors=True)

    n, mb = len(files), nbytes / 1e6
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")  # fmt: skip
    print(f"\nmachine: {os.cpu_count()} cores ({cpu}), Python {sys.version.split()[0]}; load average before / after: "
          f"{load_before[0]:.2f} / {os.getloadavg()[0]:.2f} (other work on this machine shares the cores)")  # fmt: skip
    first, second = (json.loads(r["stdout"].strip().splitlines()[-1]) for r in (ours, again))
    print(f"source: {args.source}{f' (first {args.subset} per class)' if args.subset else ''}: "
          f"{n} images, {mb:.1f} MB; server: moto_server on {endpoint} (subprocess); upload threads: {workers}")  # fmt: skip
    print(f"{'':<24}{'wall s':>8}{'images/s':>10}{'MB/s':>7}{'client CPU s':>14}{'server CPU s':>14}")
    for name, r in (("ours (ingest_folder)", ours), ("awscli (aws s3 sync)", aws), ("ours again (no-op)", again)):
        print(f"{name:<24}{r['wall']:>8.2f}{n / r['wall']:>10.0f}{mb / r['wall']:>7.2f}{r['cpu']:>14.2f}"
              f"{r['server_cpu']:>14.2f}")  # fmt: skip
    print(f"ours: scan {first['scan_seconds']:.2f}s + upload {first['upload_seconds']:.2f}s inside the ingest; "
          f"{first['uploaded']} uploaded, {ours_objects} objects (distinct images + manifest); awscli: {aws_objects} "
          f"objects; again: {second['uploaded']} uploaded, same id: {second['dataset_id'] == first['dataset_id']}")  # fmt: skip
    print(f"ratio ours/awscli (throughput): {aws['wall'] / ours['wall']:.2f}")


if __name__ == "__main__":
    main()
