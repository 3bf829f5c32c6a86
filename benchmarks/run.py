"""``make bench``: every workload, side by side with the machine's raw bandwidth.

Prints a table and writes benchmarks/results/latest.json. Each figure is the median of
--repeat runs after a warm-up; ratios are against raw ``write``/``readinto`` of the same
bytes by the same number of processes, measured in the same run.

    python benchmarks/run.py [--quick] [--gib 1.0] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
MPIEXEC = shutil.which("mpiexec", path=BIN) or "mpiexec"


def mpi(n: int, *args: str, script: str = "bench.py") -> dict:
    cmd = [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py", os.path.join(HERE, script), *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def mpi_nodes(nodes: list[tuple[str, int]], script: str, *args: str) -> dict:
    """One job on simulated nodes (MPICH's MPMD syntax, SHARDSAVE_NODE_ID per part)."""
    cmd = [MPIEXEC]
    for i, (node, n) in enumerate(nodes):
        cmd += [":"] * bool(i) + [
            "-n",
            str(n),
            "-env",
            "SHARDSAVE_NODE_ID",
            node,
            sys.executable,
            "-m",
            "mpi4py",
        ]
        cmd += [os.path.join(HERE, script), *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


RANKS = (8, 16, 32, 64)
"""The numbers of ranks of the "ranks" row (oversubscribed on a small machine)."""


def ranks_row(scratch: str, repeat: int) -> dict:
    """ranks_bench.py on each of RANKS: saves and restores on N ranks, then restores on
    N/2 (another launch); per N its brief figures, the full phases under "runs". At 64
    ranks, and for the restores on N/2, 2 timed runs: a 64-rank restore takes ~10 s here."""
    out: dict = {"brief": {}, "runs": {}}
    for n in RANKS:
        where = ["--dir", f"{scratch}/ranks{n}"]
        runs = str(repeat if n < 64 else min(repeat, 2))
        full = mpi(n, "--phase", "save", *where, "--repeat", runs, script="ranks_bench.py")
        half = mpi(
            n // 2, "--phase", "restore", *where, "--repeat", str(min(repeat, 2)), script="ranks_bench.py"
        )
        out["brief"][n] = dict(full["brief"], half_restore_s=half["brief"]["restore_s"])
        out["brief"][n]["index_bytes"] = full["index_bytes"]
        out["runs"][n] = {"save": full, "half_restore": half}
        shutil.rmtree(f"{scratch}/ranks{n}", ignore_errors=True)
    return out


def py(script: str, *args: str) -> dict:
    cmd = [sys.executable, os.path.join(HERE, script), *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=1.0, help="size of workload (a)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small sizes, 2 repeats: a smoke run")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temp dir under /tmp)")
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        help="workloads to skip: a a2 cold restart b first c e e10m bcast ranks files mem tf s3 tiers dcp orbax",
    )
    args = p.parse_args()
    if args.quick:
        args.gib, args.repeat = 0.125, 2
    scratch = args.dir or tempfile.mkdtemp(prefix="shardsave-bench-")
    common = ["--repeat", str(args.repeat), "--gib", str(args.gib)]
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "gib": args.gib,
        "repeat": args.repeat,
    }
    rows = []

    def row(name, r, keys):
        results[name] = r
        rows.append((name, r, keys))
        print(f"done: {name}", file=sys.stderr, flush=True)

    # restores from an empty page cache need root (drop_caches); with fsync only
    can_drop = os.access("/proc/sys/vm/drop_caches", os.W_OK) and "cold" not in args.skip
    for fsync in (1, 0):
        tag = "durable" if fsync else "no-fsync"
        cold = ["--cold", "3"] if fsync and can_drop else []
        if "a" not in args.skip:
            row(
                f"a 1 rank {tag}",
                mpi(1, "--workload", "a", "--dir", f"{scratch}/a1", "--fsync", str(fsync), *cold, *common),
                "save",
            )
        if "a2" not in args.skip:
            row(
                f"a 2 ranks {tag}",
                mpi(2, "--workload", "a", "--dir", f"{scratch}/a2", "--fsync", str(fsync), *cold, *common),
                "save",
            )
    if "restart" not in args.skip:
        mpi(1, "--workload", "restart-save", "--dir", f"{scratch}/r", *common)
        runs = [
            mpi(1, "--workload", "restart", "--dir", f"{scratch}/r", "--in-place", str(i), *common)
            for _ in range(3)
            for i in (1, 0)
        ]
        restart = {}
        for key, i in (("in_place", 1), ("new_arrays", 0)):
            mine = [r for r in runs if r["in_place"] == i]
            restart[key] = {
                k: statistics.median(r[k] for r in mine) for k in ("ss_restore", "raw_read", "peak_rss_bytes")
            }
        restart["state_bytes"] = runs[0]["state_bytes"]
        row("a restart, 1 rank", restart, "restart")
    if "b" not in args.skip:
        row(
            "b 20k x 1 KiB",
            mpi(1, "--workload", "b", "--dir", f"{scratch}/b", "--repeat", str(args.repeat)),
            "small",
        )
    if "first" not in args.skip:
        row(
            "b first save + restore",
            mpi(1, "--workload", "first", "--dir", f"{scratch}/first", "--repeat", str(args.repeat)),
            "first",
        )
    if "c" not in args.skip:
        mpi(4, "--workload", "reshard-save", "--dir", f"{scratch}/c", *common)
        row(
            "c reshard 4->3",
            mpi(3, "--workload", "reshard-restore", "--dir", f"{scratch}/c", *common),
            "reshard",
        )
    if "mem" not in args.skip:
        m = mpi(1, "--workload", "memory", "--dir", f"{scratch}/m", *common)
        m.update(mpi(1, "--workload", "restore-memory", "--dir", f"{scratch}/m", *common))
        m.update(mpi(1, "--workload", "restore-memory-in-place", "--dir", f"{scratch}/m", *common))
        m.update(mpi(1, "--workload", "restore-memory-columns", "--dir", f"{scratch}/m", *common))
        m.update(mpi(1, "--workload", "restore-memory-columns-new", "--dir", f"{scratch}/m", *common))
        row("memory", m, "memory")
    if "e" not in args.skip:
        ranks = 100 if args.quick else 1000
        row(
            "e index 1M entries" if not args.quick else "e index 100k entries",
            py(
                "index_bench.py", "--ranks", str(ranks), "--variables", "1000", "--path", f"{scratch}/e.index"
            ),
            "index",
        )
    if "e10m" not in args.skip and not args.quick:
        row(
            "e index 10M entries",
            py(
                "index_bench.py", "--ranks", "10000", "--variables", "1000", "--path", f"{scratch}/e10m.index"
            ),
            "index",
        )
        share = [("a", 4), ("b", 4)]  # a rank's share of that index: shared per node, or private
        got = {
            mode: mpi_nodes(share, "index_share_bench.py", "--prefix", f"{scratch}/e10m", *flag)
            for mode, flag in (("shared", []), ("private", ["--private"]))
        }
        row("e10m index, 8 ranks, 2 nodes", got, "share")
        os.remove(f"{scratch}/e10m.index")
    if "bcast" not in args.skip:
        mib = "56" if args.quick else "560"  # the 10M-entry index's size
        row(f"bcast {mib} MiB, 4 ranks", mpi(4, "--mib", mib, script="bcast_bench.py"), "bcast")
    if "files" not in args.skip:
        row(
            "files_per_node, 8 ranks, 2 nodes",
            mpi_nodes(
                [("a", 4), ("b", 4)],
                "files_bench.py",
                "--dir",
                f"{scratch}/files",
                "--gib",
                str(args.gib),
                "--repeat",
                str(min(args.repeat, 3)),
            ),
            "files",
        )
    if "ranks" not in args.skip:
        try:
            row(
                f"ranks {'/'.join(map(str, RANKS))}, 3.8 MiB",
                ranks_row(scratch, min(args.repeat, 3)),
                "ranks",
            )
        except subprocess.CalledProcessError as exc:
            print(f"ranks benchmark failed: {' '.join(exc.cmd)}: {exc.stderr[-2000:]}", file=sys.stderr)
    if "s3" not in args.skip:
        for n in (1, 2):
            try:
                row(
                    f"d S3 (moto), {n} rank{'s' if n > 1 else ''}",
                    mpi(n, "--gib", str(min(args.gib, 0.25)), script="s3_bench.py"),
                    "s3",
                )
            except subprocess.CalledProcessError as exc:
                print(f"S3 benchmark on {n} rank(s) failed: {exc.stderr[-300:]}", file=sys.stderr)
    if "tiers" not in args.skip:
        row(
            "tiers 4 ranks, 2 nodes",
            mpi_nodes([("a", 2), ("b", 2)], "tiers_bench.py", "--dir", f"{scratch}/tiers", *common),
            "tiers",
        )
    peers = os.path.join(os.path.dirname(HERE), ".venv-peers", "bin", "python")
    for peer, label, module in (
        ("dcp", "PyTorch DCP", "torch.distributed.checkpoint"),
        ("orbax", "Orbax", "orbax.checkpoint, jax"),
    ):
        if (
            peer in args.skip
            or not os.path.exists(peers)
            or subprocess.run([peers, "-c", f"import {module}"], capture_output=True).returncode != 0
        ):
            continue
        for wl, kind in (("a", "save"), ("b", "small")):
            cmd = [
                peers,
                os.path.join(HERE, f"{peer}_bench.py"),
                "--dir",
                f"{scratch}/{peer}",
                "--workload",
                wl,
                "--gib",
                str(args.gib),
                "--repeat",
                str(min(args.repeat, 3)),
            ]
            try:
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600)
                row(f"{label} ({wl}) 1 rank", json.loads(out.stdout.strip().splitlines()[-1]), kind)
            except subprocess.CalledProcessError as exc:
                print(f"{label} comparison failed: {exc.stderr[-300:]}", file=sys.stderr)
    if "tf" not in args.skip:
        try:
            row("tf Saver 1 rank", py("tf_bench.py", "--dir", f"{scratch}/tf", *common), "save")
        except subprocess.CalledProcessError as exc:
            print(f"TensorFlow comparison skipped: {exc.stderr[-300:]}", file=sys.stderr)

    print()
    print(
        f"{'workload':<26} {'raw':>9} {'shardsave':>10} {'ratio':>7}   {'raw':>9} {'shardsave':>10} {'ratio':>7}"
    )
    print(f"{'':<26} {'save s':>9} {'save s':>10} {'':>7}   {'restore s':>9} {'restore s':>10}")
    for name, r, kind in rows:
        if kind in ("save", "small"):
            print(
                f"{name:<26} {r['raw_write']:9.3f} {r['ss_save']:10.3f} {r['save_ratio']:7.2f}   "
                f"{r['raw_read']:9.3f} {r['ss_restore']:10.3f} {r['restore_ratio']:7.2f}"
                + (
                    f"   new arrays (restore_in_place=False): {r['ss_restore_new']:.3f} s = "
                    f"{r['restore_new_ratio_fresh']:.2f} x raw into fresh buffers ({r['raw_read_fresh']:.3f} s)"
                    if "ss_restore_new" in r
                    else ""
                )
                + (
                    f"   non-blocking call {r['nonblocking_call']:.3f}s = {r['nonblocking_vs_copy']:.2f} x copy"
                    if "nonblocking_call" in r
                    else ""
                )
            )
            if "ss_restore_direct" in r:
                print(
                    f"{'':<26} raw + check {r['raw_read_checked']:.3f} s: in place (atomic) "
                    f"{r['restore_vs_checked']:.2f} x, reading {r['atomic_bytes_read'] / r['bytes_read']:.2f} x "
                    f"the bytes; direct {r['ss_restore_direct']:.3f} s = {r['direct_vs_checked']:.2f} x, reading "
                    f"{r['direct_bytes_read'] / r['direct_bytes_needed']:.4f} x"
                )
            if "cold_ss_restore_direct" in r:
                print(
                    f"{'':<26} cold: raw {r['cold_raw_read']:.3f} s, raw + check {r['cold_raw_read_checked']:.3f} s; "
                    f"direct {r['cold_ss_restore_direct']:.3f} s ({r['cold_direct_vs_checked']:.2f} x), atomic "
                    f"{r['cold_ss_restore']:.3f} s ({r['cold_atomic_vs_checked']:.2f} x), new arrays "
                    f"{r['cold_ss_restore_new']:.3f} s"
                )
            if kind == "small":
                print(f"{'':<26} save + restore: {r['ss_save'] + r['ss_restore']:.3f} s")
            if "note" in r:
                print(f"{'':<26} ({r['note']})")
        elif kind == "reshard":
            print(
                f"{name:<26} {'':>9} {'':>10} {'':>7}   {r['raw_read']:9.3f} {r['ss_restore']:10.3f} "
                f"{r['restore_ratio']:7.2f}   new arrays: {r['ss_restore_new']:.3f} s = "
                f"{r['restore_new_ratio_fresh']:.2f} x raw into fresh buffers ({r['raw_read_fresh']:.3f} s)"
            )
            print(
                f"{'':<26} read {r['read_amplification']:.4f} x the bytes needed (then "
                f"{r['bytes_reread'] / r['bytes_needed']:.2f} x again into the variables' arrays, once checked)"
            )
        elif kind == "first":
            print(
                f"{name:<26} {r['variables']} variables: a new Saver's first save + restore "
                f"{r['fresh_save']:.3f} + {r['fresh_restore']:.3f} = {r['fresh_total']:.3f} s; reused "
                f"{r['reused_save']:.3f} + {r['reused_restore']:.3f} = {r['reused_total']:.3f} s"
            )
        elif kind == "bcast":
            slow = max(r["per_rank"], key=lambda x: x["bcast_s"])
            print(
                f"{name:<26} comm.bcast (pickled) {slow['bcast_s']:.3f} s, Bcast {slow['Bcast_s']:.3f} s "
                f"(slowest rank); peak growth per rank up to "
                f"{max(x['peak_growth_mib'] for x in r['per_rank'])} MiB"
            )
        elif kind == "share":
            for mode, m in r.items():
                med = {k: statistics.median(x[k] for x in m["per_rank"]) for k in m["per_rank"][0]}
                print(
                    f"{name + ', ' + mode:<26} a rank: index {med['index_s']:.3f} s, its lookups "
                    f"{med['lookups_s']:.3f} s ({med['pieces']:.0f} pieces); {med['private_mib']:.0f} MiB "
                    f"private + {med['shared_mib']:.0f} MiB shared with its node (medians over the ranks)"
                )
        elif kind == "files":
            t = r["save_s"]
            print(
                f"{name:<26} durable save, {r['gib']:.2f} GiB: raw + fsync {t['raw']:.3f} s; one file per rank "
                f"{t['per_rank']:.3f} s ({r['data_file_counts']['per_rank']} files); files_per_node 1 "
                f"{t['per_node_1']:.3f} s ({r['data_file_counts']['per_node_1']}), 2 {t['per_node_2']:.3f} s, "
                f"4 {t['per_node_4']:.3f} s"
            )
        elif kind == "restart":
            for key, what in (("in_place", "in place"), ("new_arrays", "new arrays")):
                m = r[key]
                print(
                    f"{name + ', ' + what:<26} {'':>9} {'':>10} {'':>7}   {m['raw_read']:9.3f} "
                    f"{m['ss_restore']:10.3f} {m['raw_read'] / m['ss_restore']:7.2f}   peak RSS "
                    f"{m['peak_rss_bytes'] / r['state_bytes']:.2f} x the variables"
                )
        elif kind == "memory":
            print(
                f"{name:<26} save peak above the variables: {r['save_extra_bytes'] / 2**20:.1f} MiB; "
                f"restore peak above the new arrays: {r['restore_extra_bytes'] / 2**20:.1f} MiB; "
                f"in place, above the variables: {r['in_place_restore_extra_bytes'] / 2**20:.1f} MiB"
            )
            print(
                f"{'':<26} reshard by columns (matrices saved whole, restored as column halves): in place "
                f"{r['columns_in_place_extra_bytes'] / 2**20:.1f} MiB above the variables; into new arrays "
                f"{r['columns_new_arrays_extra_bytes'] / 2**20:.1f} MiB above them"
            )
        elif kind == "s3":
            print(
                f"{name:<26} {r['bytes'] / 2**20:.0f} MiB held by the ranks, {r['variables']} variables per rank: "
                f"save {r['save_s']:.2f} s in {r['save_requests']} requests, "
                f"{r['save_bytes_sent'] / 2**20:.0f} MiB sent; restore {r['restore_s']:.2f} s in "
                f"{r['restore_requests']} requests ({r['restore_ranged_gets']} coalesced ranges), "
                f"{r['restore_bytes_received'] / 2**20:.0f} MiB received"
            )
            line = (
                f"{'':<26} requests per GiB: save {r['save_requests_per_GiB']:.0f} "
                f"({r['part_bytes'] >> 20} MiB parts), restore {r['restore_requests_per_GiB']:.0f}"
            )
            if r.get("part_option"):
                o = r["part_option"]
                line += f"; save with upload_part_size {o['upload_part_size'] >> 20} MiB: "
                line += f"{o['save_requests_per_GiB']:.0f}"
            print(line)
            if r.get("rule"):
                u = r["rule"]
                print(
                    f"{'':<26} a {u['bytes'] / 2**30:.2g} GiB file: {u['no_hint']['requests']} requests "
                    f"({u['no_hint']['part_bytes'] >> 20} MiB parts) without its size, "
                    f"{u['hint']['requests']} ({u['hint']['part_bytes'] >> 20} MiB parts, the rule's) with it"
                )
        elif kind == "tiers":
            print(
                f"{name:<26} raw copy into /dev/shm {r['raw_fast_s']:.3f} s; durable save (local disk, "
                f"fsync) {r['durable_save_s']:.3f} s (raw + fsync {r['raw_durable_fsync_s']:.3f} s)"
            )
            for scheme, m in r["schemes"].items():
                print(
                    f"{'':<26} fast tier, {scheme:<7} blocking save {m['save_s']:.3f} s = "
                    f"{m['save_s'] / r['raw_fast_s']:.2f} x raw, {r['durable_save_s'] / m['save_s']:.1f}x faster "
                    f"than durable; sent {max(m['bytes_sent_per_rank']) / 2**20:.0f} MiB/rank; "
                    f"tier holds {m['tier_bytes'] / 2**20:.0f} MiB"
                )
            rs = r["restart"]
            for scheme in ("partner", "xor"):
                print(
                    f"{'':<26} restart after losing node b, {scheme}: {rs[scheme + '_restore_s']:.3f} s "
                    f"({'+'.join(rs[scheme + '_sources'])}; checks and rebuild {rs[scheme + '_rebuild_s']:.3f} s) "
                    f"vs durable S3 {rs['s3_restore_s']:.3f} s = "
                    f"{rs['s3_vs_' + scheme]:.1f}x faster"
                )
        elif kind == "ranks":
            print(
                f"{name:<26} (ms; cpu: the coordinator's / the median other rank's; own: the "
                "coordinator's work alone; half: restored on N/2 ranks)"
            )
            print(
                f"{'':<4}{'ranks':>6} {'save':>7} {'cpu':>11} {'own':>5} {'merge':>6} {'1st plan':>11}"
                f"   {'restore':>7} {'cpu':>11} {'load':>5} {'parse':>5} {'half':>7} {'index KiB':>9}"
            )
            for n, b in r["brief"].items():
                ms = {k: v * 1e3 for k, v in b.items() if k != "index_bytes"}
                print(
                    f"{'':<4}{n:>6} {ms['save_s']:7.0f} {ms['save_coord_cpu']:5.0f}/{ms['save_other_cpu']:<5.0f} "
                    f"{ms['save_coord_own_cpu']:5.0f} {ms['merge_cpu']:6.1f} {ms['first_plan_cpu']:5.1f}/{ms.get('first_plan_other_cpu', 0):<5.1f}   "
                    f"{ms['restore_s']:7.0f} {ms['restore_coord_cpu']:5.0f}/{ms['restore_other_cpu']:<5.0f} "
                    f"{ms['load_other_cpu']:5.0f} {ms['parse_other_cpu']:5.1f} {ms['half_restore_s']:7.0f} "
                    f"{b['index_bytes'] / 1024:9.0f}"
                )
        elif kind == "index":
            print(
                f"{name:<26} merge {r['merge_s']:.2f} s, write {r['write_s']:.2f} s, read {r['read_s']:.2f} s "
                f"= {r['total_s']:.2f} s; {r['bytes_per_entry']:.1f} bytes/entry; peak "
                f"{r['peak_mib']} MiB above the inputs"
            )
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    out = os.path.join(HERE, "results", "latest.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {out}")
    if not args.dir:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
