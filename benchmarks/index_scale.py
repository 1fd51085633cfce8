"""The index build at scale: one process vs `--procs N` vs `--ray N`, same factory, one run.

    python benchmarks/index_scale.py [--count 200000] [--dim 768] [--workers 2] [--index-key IVF1024,Flat]
                                     [--on-disk never] [--executors one,procs,ray] [--add-fraction 0.05]
                                     [--keep DIR] [--results results.jsonl]

Writes a clustered synthetic embeddings directory, then builds it with `imgindex index` three
times (each in a fresh process) and prints, for each: wall time, the build's own timings (sample,
train, add, merge, tune), the driver's peak RSS and the largest worker's (ru_maxrss: local
processes), recall@10 as measured, and the ratios to the one-process build. ru_maxrss counts the
pages of files a process maps (faiss maps the sub-indexes and the on-disk lists it merges), which
the kernel drops under pressure, so each process tree is also sampled twice a second for its
anonymous memory (RssAnon: the driver, and the largest worker, Ray's actors included). The merged indexes must agree with the one-process one in count
and recall (same trained quantizer and sample). Then an `--add` of `--add-fraction` more vectors
(new parts in a directory of their own) to the one-process index: its time against the build's,
the bytes it wrote against the index's, and that it read none of the old parts (they are moved
away for it). Also prints the rates the README's scale table is derived from (vectors added a
second per worker, training and merge seconds, the add's rate).

With `--keep DIR` each finished build's figures are kept in DIR/<name>.json and a rerun with the
same DIR and arguments skips it (a 5M build takes most of an hour on 2 cores: the runs can be
spread over several invocations, which the printed table says); the `--procs` and `--ray` indexes
are deleted once compared (disk: each is as large as the vectors), the one-process index is kept
for the `--add`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from synthetic import clustered_vectors, write_embeddings_dir
from results import append_result

RUN = """
import resource, sys
from imgindex.cli import main
code = main(sys.argv[1:])
me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(f"RSS {me} {kids}", file=sys.stderr)
sys.exit(code)
"""


def _status(pid: int) -> dict[str, int]:
    """RssAnon and RssFile of a process, in kB ({} once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in status)
                    if k in ("RssAnon", "RssFile")}
    except (OSError, ValueError):
        return {}


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process under `pid`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        try:
            command = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            command = ""
        found.append((child, command))
        todo += children.get(child, [])
    return found


class Watch:
    """Samples a process tree twice a second: the peak anonymous memory (RssAnon: its own
    allocations, not the pages of files it maps, which ru_maxrss also counts and the kernel can
    drop) of the driver and of its largest worker (Ray: the `ray::` actor processes, not Ray's own
    services), and the driver's peak of mapped file pages."""

    def __init__(self, pid: int):
        self.pid, self.driver_anon, self.driver_file, self.worker_anon = pid, 0, 0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            mine = _status(self.pid)
            self.driver_anon = max(self.driver_anon, mine.get("RssAnon", 0))
            self.driver_file = max(self.driver_file, mine.get("RssFile", 0))
            for child, command in _descendants(self.pid):
                if "ray" in command and not command.startswith("ray::"):
                    continue  # Ray's own services (raylet, GCS, dashboard), not a worker
                self.worker_anon = max(self.worker_anon, _status(child).get("RssAnon", 0))

    def close(self) -> dict:
        self.stop.set()
        self.thread.join()
        return {"driver_anon_mb": self.driver_anon // 1024, "driver_file_mb": self.driver_file // 1024,
                "worker_anon_mb": self.worker_anon // 1024 or None}


def watched(args: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float, dict]:
    """`imgindex ARGS` in a fresh process, watched: (the finished process, seconds, its memory)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", RUN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    watch = Watch(child.pid)
    stdout, stderr = child.communicate()
    memory = watch.close()
    return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr), time.perf_counter() - start, memory


def build(emb: Path, out: Path, key: str, on_disk: str, extra: list[str], env: dict) -> dict:
    done, seconds, memory = watched(["index", str(emb), "--out", str(out), "--index-key", key, "--on-disk", on_disk,
                                     "--no-progress", "--overwrite", *extra], env)
    if done.returncode:
        raise SystemExit(f"build {extra or 'in-process'} failed:\n{done.stderr[-3000:]}")
    me, kids = next(line.split()[1:] for line in done.stderr.splitlines() if line.startswith("RSS "))
    manifest = json.loads((out / "manifest.json").read_text())
    return {"wall_s": round(seconds, 2), "timings": manifest["timings"], "recall_at_10": manifest["recall_at_10"],
            "nprobe": manifest["search_params"].get("nprobe"), "count": manifest["count"],
            "tasks": manifest["build"]["executor"]["tasks"], "driver_rss_mb": int(me) // 1024,
            "worker_rss_mb": int(kids) // 1024 if "--procs" in extra else None,
            **memory,
            "bytes_on_disk": sum(p.stat().st_size for p in out.iterdir() if p.is_file())}


def add(emb: Path, more: Path, idx: Path, env: dict) -> dict:
    """`imgindex index --add MORE --out IDX` with the index's own parts moved away (an --add that
    read one would fail): wall time, RSS, and the bytes of the files it wrote or replaced."""
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in idx.iterdir() if p.is_file()}
    index_bytes = sum(p.stat().st_size for p in idx.iterdir() if p.is_file())
    away = emb.parent / "emb-away"
    (emb / "embeddings").rename(away)
    try:
        done, seconds, memory = watched(["index", "--add", str(more), "--out", str(idx), "--no-progress"], env)
    finally:
        away.rename(emb / "embeddings")
    if done.returncode:
        raise SystemExit(f"--add failed:\n{done.stderr[-3000:]}")
    me, _ = next(line.split()[1:] for line in done.stderr.splitlines() if line.startswith("RSS "))
    manifest = json.loads((idx / "manifest.json").read_text())
    written = sum(p.stat().st_size for p in idx.iterdir() if p.is_file() and p.name != "manifest.json"
                  and before.get(p.name) != (p.stat().st_ino, p.stat().st_mtime_ns))
    last = manifest["adds"][-1]
    return {"wall_s": round(seconds, 2), "vectors": last["vectors"], "driver_rss_mb": int(me) // 1024,
            "driver_anon_mb": memory["driver_anon_mb"], "driver_file_mb": memory["driver_file_mb"],
            "bytes_written": written, "index_bytes_before": index_bytes, "recall_at_10": manifest["recall_at_10"],
            "recall_at_10_of_new": last.get("recall_at_10_of_new"), "count": manifest["count"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--index-key", default=None, help="default: IVF{4 sqrt(N)},Flat")
    parser.add_argument("--on-disk", default="never", choices=("auto", "always", "never"))
    parser.add_argument("--executors", default="one,procs,ray", help="comma list of one, procs, ray (one is "
                        "always built: the others are compared with it)")
    parser.add_argument("--no-ray", action="store_true", help="the same as --executors one,procs")
    parser.add_argument("--one-only", action="store_true", help="the same as --executors one")
    parser.add_argument("--add-fraction", type=float, default=0.05, help="vectors --add appends, as a share of "
                        "--count (0: no --add)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    parser.add_argument("--results", metavar="FILE", help="append the figures as one JSON line")
    args = parser.parse_args()
    from imgindex.indexes.factory import choose_nlist

    key = args.index_key or f"IVF{choose_nlist(args.count)},Flat"
    root = Path(args.keep or tempfile.mkdtemp(prefix="index-scale-"))
    emb = root / "emb"
    if not (emb / "_manifest.json").exists():
        t = time.perf_counter()
        for start in range(0, args.count, 1_000_000):  # bounded memory however large
            n = min(1_000_000, args.count - start)
            write_embeddings_dir(str(emb), clustered_vectors(n, args.dim, seed=start), shard_size=50_000,
                                 first_shard=start // 50_000, prefix=f"b{start // 1_000_000}-")
        print(f"wrote {args.count:,} x {args.dim} in {time.perf_counter() - t:.0f} s -> {emb}")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # a local Ray on loopback only
    wanted = ["one"] + [name for name in args.executors.split(",") if name != "one"]
    if args.one_only:
        wanted = ["one"]
    elif args.no_ray:
        wanted = [name for name in wanted if name != "ray"]
    flags = {"one": [], "procs": ["--procs", str(args.workers)], "ray": ["--ray", str(args.workers)]}
    runs, reused = {}, []
    for name in wanted:
        kept = root / f"{name}.json"
        same = {"key": key, "on_disk": args.on_disk, "count": args.count, "workers": args.workers}
        if kept.exists() and json.loads(kept.read_text()).get("args") == same:
            runs[name] = json.loads(kept.read_text())["run"]
            reused.append(name)
            continue
        runs[name] = build(emb, root / name, key, args.on_disk, flags[name], env)
        if name != "one":
            shutil.rmtree(root / name, ignore_errors=True)
        if args.keep:
            kept.write_text(json.dumps({"args": same, "run": runs[name]}))
    one = runs["one"]
    print(f"\n{args.count:,} x {args.dim}, {key}, lists on disk: {args.on_disk}, {os.cpu_count()} CPUs"
          + (f" (kept from an earlier invocation in {root}: {', '.join(reused)})" if reused else ""))
    print(f"{'build':<8}{'wall s':>8}{'add s':>8}{'merge s':>8}{'driver MB':>11}{'(anon)':>8}{'worker MB':>11}"
          f"{'(anon)':>8}{'recall@10':>11}{'vs one':>8}")
    for name, run in runs.items():
        print(f"{name:<8}{run['wall_s']:>8.1f}{run['timings']['add_s']:>8.1f}{run['timings']['merge_s']:>8.1f}"
              f"{run['driver_rss_mb']:>11}{run.get('driver_anon_mb', '-'):>8}{run['worker_rss_mb'] or '-':>11}"
              f"{run.get('worker_anon_mb') or '-':>8}{run['recall_at_10']:>11.4f}{one['wall_s'] / run['wall_s']:>7.2f}x")
        assert run["count"] == one["count"] and run["recall_at_10"] == one["recall_at_10"], (name, run, one)
    added = None
    if args.add_fraction > 0:
        more = root / "more"
        if json.loads((root / "one" / "manifest.json").read_text()).get("adds"):
            raise SystemExit(f"{root / 'one'} already had an --add (an earlier invocation): delete one.json to rebuild it")
        if not (more / "_manifest.json").exists():
            extra, first = int(args.count * args.add_fraction), min(args.count, 1_000_000)
            # fresh draws around the first block's centres (same seed: same centres; the tail is new)
            fresh = clustered_vectors(first + extra, args.dim, seed=0)[first:]
            write_embeddings_dir(str(more), fresh, shard_size=50_000, prefix="more")
            del fresh
        added = add(emb, more, root / "one", env)
        print(f"--add of {added['vectors']:,} vectors to the one-process index: {added['wall_s']:.1f} s "
              f"({added['wall_s'] / one['wall_s']:.2f}x the build's time for {args.add_fraction:.0%} of its vectors), "
              f"wrote {added['bytes_written'] / 2**20:,.0f} MB ({added['bytes_written'] / added['index_bytes_before']:.2f}x "
              f"the index's bytes; no old part read: they were moved away), driver {added['driver_rss_mb']} MB "
              f"({added['driver_anon_mb']} MB anonymous), "
              f"recall@10 {added['recall_at_10']:.4f}, of the new vectors {added['recall_at_10_of_new']}")
    rates = {"add_vec_per_s_per_worker": round(args.count / one["timings"]["add_s"]),
             "sample_s": one["timings"]["sample_s"], "train_s": one["timings"]["train_s"],
             "merge_vec_per_s": round(args.count / max(one["timings"]["merge_s"], 1e-3)),
             "tune_s": one["timings"]["tune_s"], "index_bytes_per_vector": round(one["bytes_on_disk"] / args.count, 1)}
    if added:
        rates["add_command_vec_per_s"] = round(added["vectors"] / added["wall_s"])
    print("rates:", json.dumps(rates))
    append_result(args.results, {"benchmark": "index_scale", "count": args.count, "dim": args.dim, "key": key,
                                 "on_disk": args.on_disk, "runs": runs, "reused": reused, "add": added, "rates": rates})


if __name__ == "__main__":
    main()
