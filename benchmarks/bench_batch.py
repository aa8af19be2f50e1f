"""``stfm batch`` on a 2-worker LocalCluster vs the same work serially in one process, plus worker / driver kills.

Run from the repository root (``STFM_DATA_DIR`` must point at the her2st mirror)::

    python benchmarks/bench_batch.py                  # 2 repeats, writes docs/benchmarks/batch.md
    python benchmarks/bench_batch.py --repeats 1 --no-kill

What is measured (every run is a fresh ``python -m stfm batch`` subprocess with its own empty feature cache,
so nothing is reused between runs; wall time includes interpreter start-up, imports and, for the cluster, starting
the LocalCluster):

1. *serial*: ``stfm batch CONFIG --serial``: the slides one after another in one process (torch with all cores);
2. *LocalCluster*: ``stfm batch CONFIG``: 2 worker processes × 1 thread, one task per slide, 1 torch thread each;
   runs alternate serial / cluster so that load from other programs hits both alike;
3. identical outputs: every cluster output against the first serial one (:func:`stfm.batch.compare_outputs`);
4. worker loss: SIGKILL one worker process while it extracts features; distributed reschedules its slide (the
   nanny restarts the worker) and the run completes;
5. driver loss: SIGKILL the whole run (driver and workers) once the first slide is written; a rerun computes only
   the missing slides, and every output equals the serial one.

Work: her2st B4, C2, C3, C4 (full sections, full-resolution H&E), features with ``efficientnet_lite0``, expression
with a ridge model trained on C5 and C6 (patient C; trained once before timing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks" / "batch.md"
ENCODER = "efficientnet_lite0"


def prepare(work: Path, sections: list[str], train: list[str]) -> dict:
    """h5ad inputs for ``sections``, a ridge model trained on ``train``; returns their sizes."""
    import stfm

    stfm.settings.show_progress_bar = False
    stfm.settings.cache_dir = work / "cache_prepare"
    work.mkdir(parents=True, exist_ok=True)
    sizes = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in sections:
            path = work / "inputs" / f"{s}.h5ad"
            adata = stfm.datasets.her2st(s)
            sizes[s] = int(adata.n_obs)
            if not path.exists():
                stfm.io.write_h5ad(adata, path)
        if not (work / "ridge").exists():
            ref = []
            for s in train:
                a = stfm.datasets.her2st(s)
                stfm.pp.extract_features(a, ENCODER)
                ref.append(a)
            model = stfm.tl.fit_expression(ref, method="ridge", embedding_key=f"X_{ENCODER}", n_top_genes=50)
            model.save(work / "ridge")
    return sizes


def write_config(work: Path, name: str, sections: list[str]) -> Path:
    import yaml

    body = {
        "output": f"runs/{name}",
        "steps": {"features": {"encoder": ENCODER, "cache": False}, "expression": {"model": "ridge"}},
        "engine": {"n_workers": 2, "threads_per_worker": 1, "retries": 2},
        "slides": [{"id": s, "input": f"inputs/{s}.h5ad", "platform": "ST"} for s in sections],
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _env(work: Path, name: str) -> dict:
    return {**os.environ, "STFM_CACHE_DIR": str(work / f"cache_{name}"), "PYTHONWARNINGS": "ignore"}


def start(work: Path, name: str, sections: list[str], *, serial: bool) -> tuple[subprocess.Popen, float]:
    cfg = write_config(work, name, sections)
    cmd = [sys.executable, "-m", "stfm", "batch", str(cfg), "--no-progress"] + (["--serial"] if serial else [])
    log = open(work / f"{name}.stdout", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, env=_env(work, name), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    return proc, t0


def run(work: Path, name: str, sections: list[str], *, serial: bool) -> dict:
    proc, t0 = start(work, name, sections, serial=serial)
    rc = proc.wait()
    wall = time.perf_counter() - t0
    return {"name": name, "mode": "serial" if serial else "LocalCluster", "rc": rc, "wall_s": wall,
            "load_1min": os.getloadavg()[0], "summary": summary(work, name)}  # fmt: skip


def summary(work: Path, name: str) -> list[dict]:
    import pandas as pd

    path = work / "runs" / name / "summary.csv"
    if not path.exists():
        return []
    df = pd.read_csv(path)
    return (
        df[["slide_id", "status", "n_obs", "time_s", "worker", "error"]]
        .astype(object)
        .where(df.notna(), None)
        .to_dict("records")
    )


def identical(work: Path, a: str, b: str, sections: list[str]) -> dict[str, list[str]]:
    from stfm.batch import compare_outputs

    return {s: compare_outputs(work / "runs" / a / f"{s}.zarr", work / "runs" / b / f"{s}.zarr") for s in sections}


def _workers(proc: subprocess.Popen) -> list:
    import psutil

    kids = psutil.Process(proc.pid).children(recursive=True)
    return [
        k for k in kids if "spawn_main" in " ".join(k.cmdline()) and "resource_tracker" not in " ".join(k.cmdline())
    ]


def kill_worker(work: Path, sections: list[str]) -> dict:
    """SIGKILL one worker process once both workers have used 12 s of CPU (imports done, features under way)."""
    proc, t0 = start(work, "kill_worker", sections, serial=False)
    killed = None
    while proc.poll() is None and killed is None:
        time.sleep(0.5)
        try:
            ws = _workers(proc)
            if len(ws) >= 2 and all(w.cpu_times().user > 12 for w in ws):
                killed = {"pid": ws[0].pid, "after_s": round(time.perf_counter() - t0, 1)}
                os.kill(ws[0].pid, signal.SIGKILL)
        except Exception:
            continue
    rc = proc.wait()
    return {"killed": killed, "rc": rc, "wall_s": time.perf_counter() - t0, "summary": summary(work, "kill_worker")}


def kill_driver(work: Path, sections: list[str]) -> dict:
    """SIGKILL the run's process group once the first output exists, then rerun the same config."""
    proc, t0 = start(work, "kill_driver", sections, serial=False)
    out = work / "runs" / "kill_driver"
    while proc.poll() is None and not any(out.glob("*.zarr")):
        time.sleep(0.2)
    written = sorted(p.stem for p in out.glob("*.zarr"))
    after = time.perf_counter() - t0
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = run(work, "kill_driver", sections, serial=False)
    return {"killed_after_s": round(after, 1), "written_before_kill": written, "rerun": rerun}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path(os.environ.get("STFM_BENCH_DIR", "/tmp/stfm_bench_batch")))
    p.add_argument("--sections", nargs="+", default=["B4", "C2", "C3", "C4"])
    p.add_argument("--train", nargs="+", default=["C5", "C6"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-kill", action="store_true", help="skip the worker / driver kill runs")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results to this JSON file")
    args = p.parse_args()
    work = args.work.resolve()
    import shutil

    shutil.rmtree(work / "runs", ignore_errors=True)
    for c in work.glob("cache_*"):
        if c.name != "cache_prepare":
            shutil.rmtree(c, ignore_errors=True)
    t0 = time.perf_counter()
    sizes = prepare(work, args.sections, args.train)
    print(f"prepared inputs and the ridge model in {time.perf_counter() - t0:.0f} s: {sizes}", flush=True)

    runs = []
    for i in range(args.repeats):
        for serial in (True, False):
            r = run(work, f"{'serial' if serial else 'cluster'}_{i}", args.sections, serial=serial)
            runs.append(r)
            print(f"{r['name']:>10}: {r['wall_s']:6.1f} s (rc {r['rc']}, load {r['load_1min']:.1f})", flush=True)
    same = {r["name"]: identical(work, "serial_0", r["name"], args.sections) for r in runs if r["name"] != "serial_0"}
    kills = {}
    if not args.no_kill:
        kills["worker"] = kill_worker(work, args.sections)
        kills["worker"]["identical"] = identical(work, "serial_0", "kill_worker", args.sections)
        print(f"worker kill: {kills['worker']['killed']}, rc {kills['worker']['rc']}", flush=True)
        kills["driver"] = kill_driver(work, args.sections)
        kills["driver"]["identical"] = identical(work, "serial_0", "kill_driver", args.sections)
        print(f"driver kill after {kills['driver']['written_before_kill']}; rerun rc {kills['driver']['rerun']['rc']}")
    import torch

    env = {"python": platform.python_version(), "machine": platform.machine(), "cores": os.cpu_count(),
           "torch": torch.__version__, "load_end": os.getloadavg()}  # fmt: skip
    if args.json is not None:
        raw = {"env": env, "sizes": sizes, "runs": runs, "identical": same, "kills": kills}
        args.json.write_text(json.dumps(raw, indent=1, default=str))
    text = report(env, sizes, runs, same, kills, args)
    DOC.write_text(text)
    print(text)


def report(env, sizes, runs, same, kills, args) -> str:
    ser = [r["wall_s"] for r in runs if r["mode"] == "serial"]
    clu = [r["wall_s"] for r in runs if r["mode"] == "LocalCluster"]
    pairs = [c / s for s, c in zip(ser, clu)]
    ok_same = all(not d for per in same.values() for d in per.values())
    lines = [
        "# Batch runs: LocalCluster vs serial",
        "",
        "Produced by `python benchmarks/bench_batch.py` (this file is overwritten on every run; `--json PATH` also "
        "writes the raw results).",
        "",
        "## Protocol card",
        "",
        f"- Machine: {env['machine']}, {env['cores']} cores, torch {env['torch']}, Python {env['python']}, no GPU; load "
        f"average (1 min) during the runs {min(r['load_1min'] for r in runs):.1f}–{max(r['load_1min'] for r in runs):.1f}, "
        f"at the end {env['load_end'][0]:.1f} / {env['load_end'][1]:.1f} / {env['load_end'][2]:.1f}. The machine was "
        "shared with other programs: compare the columns of one pair, not runs far apart in time.",
        f"- Work: her2st {', '.join(f'{s} ({n} spots)' for s, n in sizes.items())}, each an `.h5ad` whose full-resolution "
        f"JPEG is decoded on the worker; steps `features` (`{ENCODER}`, 112 µm tiles, feature cache off) and "
        f"`expression` (ridge on 50 genes, trained on {', '.join(args.train)}, saved with `model.save`). One SpatialData "
        "zarr per slide (tables `table` and `predicted`, spots, hires image).",
        "- Each run is a fresh `python -m stfm batch CONFIG --no-progress` subprocess with an empty feature cache; wall "
        "time from process start to exit (imports, cluster start-up and shutdown included). *Serial*: `--serial`, "
        "slides one after another in one process, torch with its default threads (2). *LocalCluster*: 2 worker processes "
        "× 1 thread (`engine.n_workers: 2`), 1 torch thread per task, one task per slide. Runs alternate serial / "
        f"cluster, {args.repeats} pair(s).",
        "- Identical = `stfm.batch.compare_outputs` finds no difference in any table (X, layers, obsm, obs, var, uns "
        "except feature-cache bookkeeping), shape or image.",
        "",
        "## 1. Wall time",
        "",
        "| pair | serial (s) | LocalCluster (s) | cluster / serial (target ≤ 1.3) |",
        "|---|---|---|---|",
    ]
    for i, (s, c) in enumerate(zip(ser, clu)):
        lines.append(f"| {i + 1} | {s:.1f} | {c:.1f} | {c / s:.2f} |")
    lines.append(f"| median | {statistics.median(ser):.1f} | {statistics.median(clu):.1f} | "
                 f"**{statistics.median(pairs):.2f}** {'✔' if statistics.median(pairs) <= 1.3 else '✘'} |")  # fmt: skip
    per_slide = {r["slide_id"]: r["time_s"] for r in runs[0]["summary"]}
    per_slide_c = {r["slide_id"]: r["time_s"] for r in runs[1]["summary"]} if len(runs) > 1 else {}
    lines += ["", "Per-slide task time (s), pair 1 (serial / cluster task on a worker, 1 torch thread): "
              + ", ".join(f"{k} {v:.1f} / {per_slide_c.get(k, float('nan')):.1f}" for k, v in per_slide.items()) + ".",
              "", "## 2. Outputs identical to serial", "",
              f"Every LocalCluster run against the first serial run: **{'identical' if ok_same else 'DIFFERENT'}**"
              + ("" if ok_same else f" ({same})") + "."]  # fmt: skip
    if kills:
        w, d = kills["worker"], kills["driver"]
        w_ok = w["rc"] == 0 and all(r["status"] == "done" for r in w["summary"])
        w_same = all(not x for x in w["identical"].values())
        rr = d["rerun"]["summary"]
        d_ok = d["rerun"]["rc"] == 0 and all(r["status"] in ("done", "skipped") for r in rr)
        d_same = all(not x for x in d["identical"].values())
        skipped = [r["slide_id"] for r in rr if r["status"] == "skipped"]
        done = [r["slide_id"] for r in rr if r["status"] == "done"]
        lines += [
            "", "## 3. Killing things mid-run", "",
            "| what | result | outputs identical to serial |", "|---|---|---|",
            f"| SIGKILL one worker process {w['killed']['after_s'] if w['killed'] else '?'} s into the run (features under "
            f"way) | run completes: {', '.join(r['slide_id'] + ' ' + r['status'] for r in w['summary'])} in "
            f"{w['wall_s']:.0f} s {'✔' if w_ok else '✘'} | {'yes ✔' if w_same else 'no ✘'} |",
            f"| SIGKILL the whole run (driver + workers) {d['killed_after_s']} s in, once "
            f"{', '.join(d['written_before_kill']) or 'nothing'} was written; then rerun | rerun skips "
            f"{', '.join(skipped) or 'nothing'}, computes {', '.join(done) or 'nothing'}, {d['rerun']['wall_s']:.0f} s "
            f"{'✔' if d_ok else '✘'} | {'yes ✔' if d_same else 'no ✘'} |",
            "",
            "A killed worker is restarted by its nanny and the scheduler reschedules the slide it was running "
            "(`distributed.scheduler.allowed-failures`, set from `engine.retries`). A killed driver leaves complete "
            "outputs (each written atomically, hash inside) and at most a hidden staging folder, removed by the next "
            "write of that slide.",
        ]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
