"""Compare the stored data of two `make run`s (e.g. before and after a refactor, same seed, same data).

    .venv/bin/python bench/compare_runs.py BEFORE/.data/store AFTER/.data/store

Each folder is a local storage holding one run (runs/<run key>/ and the datasets/ it used). Prints:
- how many files are byte-identical (the run folder's name, `manual__<time>`, normalised), and which differ;
- Table 1 (results.json "table") equal or not, with its test accuracies;
- for each differing JSON file, the paths of the fields that differ (timings, ids, code hashes are expected);
- for each differing .pt2 archive, the members that differ (weights are the `data/` members).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import zipfile
from pathlib import Path

RUN = re.compile(r"manual__[^/]+|scheduled__[^/]+|local[^/]*")


def _files(root: Path) -> dict[str, str]:
    return {RUN.sub("<run>", str(p.relative_to(root))): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "leases" not in p.relative_to(root).parts}  # fmt: skip


def _leaves(x, path: str = ""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, x


def json_differences(a: Path, b: Path) -> list[str]:
    left, right = dict(_leaves(json.loads(a.read_text()))), dict(_leaves(json.loads(b.read_text())))
    return sorted({re.sub(r"\[\d+\]", "[]", k) for k in left.keys() | right.keys() if left.get(k) != right.get(k)})


def archive_differences(a: Path, b: Path) -> list[str]:
    def members(path: Path) -> dict[str, str]:
        with zipfile.ZipFile(path) as z:  # members are under the archive's own top folder: drop it
            return {n.split("/", 1)[-1]: hashlib.sha256(z.read(n)).hexdigest() for n in z.namelist()}

    left, right = members(a), members(b)
    return sorted(k for k in left.keys() | right.keys() if left.get(k) != right.get(k))


def _real(root: Path, rel: str) -> Path:
    run = next(p.name for p in (root / "runs").iterdir() if p.is_dir())
    return root / rel.replace("<run>", run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    before, after = _files(args.before), _files(args.after)
    common = before.keys() & after.keys()
    same = [k for k in common if before[k] == after[k]]
    differ = sorted(k for k in common if before[k] != after[k])
    print(f"files: before {len(before)}, after {len(after)}; byte-identical {len(same)}, differing {len(differ)}")
    print(f"only before: {len(before.keys() - after.keys())}; only after: {len(after.keys() - before.keys())} "
          "(keyed folders are named by a hash of the training code)")  # fmt: skip
    results = [k for k in common if k.endswith("results.json")]
    for key in results:
        a = json.loads(_real(args.before, key).read_text())["table"]
        b = json.loads(_real(args.after, key).read_text())["table"]
        print(f"Table 1 equal: {a == b} ({key})")
        for row in a:
            print(f"  {row['model']}: test accuracy {row['ours']['test_accuracy']:.3f}")
    for key in differ:
        a, b = _real(args.before, key), _real(args.after, key)
        if key.endswith(".json"):
            print(f"{key}: fields {json_differences(a, b)}")
        elif key.endswith(".pt2"):
            print(f"{key}: members {archive_differences(a, b)}")
        else:
            print(f"{key}: bytes differ")


if __name__ == "__main__":
    main()
