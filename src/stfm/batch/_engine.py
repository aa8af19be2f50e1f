"""``run_batch``: one Dask distributed task per slide, on a LocalCluster or an existing scheduler.

The driver reads the configuration and model metadata, hashes the model folders, and submits one small dict per
slide (paths and settings); each worker reads its slide itself, so no slide data crosses the scheduler. Results
come back as summary rows; the driver writes ``summary.csv`` (or ``.parquet``) and ``batch.log`` into the output
folder and shows a progress bar.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._config import BatchConfig, load_config
from ._task import is_transient, output_path, run_slide

__all__ = ["SUMMARY_COLUMNS", "gpu_ids", "local_cluster", "make_payloads", "run_batch"]

SUMMARY_COLUMNS = ["slide_id", "kind", "status", "n_obs", "n_genes_predicted", "n_tumor", "time_s", "worker",
                   "error", "output", "hash", "input"]  # fmt: skip
_LOG = "stfm.batch"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _require_distributed() -> None:
    try:
        import distributed  # noqa: F401
    except ImportError as err:
        msg = "`stfm batch` runs on Dask distributed: `pip install 'dask[distributed]'` (or pass `--serial`)."
        raise ImportError(msg) from err


def gpu_ids(engine: dict[str, Any]) -> list[str]:
    """GPUs for a LocalCluster: ``engine.gpus`` (a count or ids), else ``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``.

    Empty when ``engine.device`` is ``'cpu'`` or ``'mps'``. torch is not imported.
    """
    if str(engine.get("device", "auto")) in ("cpu", "mps"):
        return []
    g = engine.get("gpus")
    if isinstance(g, list | tuple):
        return [str(i) for i in g]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = None if visible is None else [x.strip() for x in visible.split(",") if x.strip() and x.strip() != "-1"]
    if ids is None and g != 0 and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
            ids = [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]
        except (OSError, subprocess.SubprocessError):
            ids = []
    ids = ids or []
    if isinstance(g, int):
        ids = (ids or [str(i) for i in range(g)])[:g]
    return ids


def local_cluster(engine: dict[str, Any], n_workers: int | None = None) -> tuple[Any, int, int | None]:
    """A LocalCluster for ``engine``: one worker per GPU (pinned, ``resources={'GPU': 1}``) or per core.

    Returns the cluster, its number of workers and the torch threads each task should use (``None``: leave torch's
    default, for in-process thread workers).
    """
    _require_distributed()
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    tpw = int(engine.get("threads_per_worker") or 1)
    processes = bool(engine.get("processes", True))
    common = {"memory_limit": engine.get("memory_limit", "auto"), "silence_logs": logging.ERROR}
    gpus = gpu_ids(engine) if processes else []
    if gpus:
        gpus = gpus[: n_workers or engine.get("n_workers") or len(gpus)]
        workers = {
            f"gpu-{gid}": {"cls": Nanny, "options": {"nthreads": tpw, "resources": {"GPU": 1},
                                                     "env": {"CUDA_VISIBLE_DEVICES": gid}, **common}}
            for gid in gpus
        }  # fmt: skip
        scheduler = {"cls": Scheduler, "options": {"dashboard_address": engine.get("dashboard_address")}}
        cluster = SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.ERROR)
        n = len(gpus)
    else:
        n = int(n_workers or engine.get("n_workers") or max(1, _cores() // tpw))
        cluster = LocalCluster(n_workers=n, threads_per_worker=tpw, processes=processes,
                               dashboard_address=engine.get("dashboard_address"), **common)  # fmt: skip
    threads = engine.get("torch_threads") or (max(1, _cores() // (n * tpw)) if processes else None)
    return cluster, n, threads


def _connect(address: str, timeout: float) -> Any:
    from distributed import Client

    t0 = time.perf_counter()
    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as err:
        msg = (
            f"Could not reach a Dask scheduler at {address!r} within {timeout:g} s ({type(err).__name__} after "
            f"{time.perf_counter() - t0:.1f} s). Check the address and that `dask scheduler` (or your dask-jobqueue "
            "cluster) is running and reachable from here; raise `--connect-timeout` for a slow network, or drop "
            "`--scheduler` to run on a LocalCluster."
        )
        raise ConnectionError(msg) from err


@contextlib.contextmanager
def _engine(cfg: BatchConfig, *, client: Any, scheduler: str | None, n_workers: int | None,
            connect_timeout: float, log: logging.Logger) -> Iterator[tuple[Any, dict[str, Any], int | None]]:  # fmt: skip
    """Yield (client, resources per task, torch threads per task)."""
    _require_distributed()
    import dask
    import distributed  # noqa: F401 - registers its config defaults before `dask.config.set` saves the old state

    engine = cfg.engine
    retries = int(engine["retries"])
    overrides = {"distributed.scheduler.allowed-failures": retries, "distributed.worker.daemon": False,
                 "distributed.comm.timeouts.connect": f"{connect_timeout}s"}  # fmt: skip
    with dask.config.set(overrides), contextlib.ExitStack() as stack:
        threads = engine.get("torch_threads")
        if client is not None:
            log.info("using the given client (scheduler %s)", client.scheduler.address)
        elif scheduler is not None:
            client = stack.enter_context(_connect(scheduler, connect_timeout))
            log.info("connected to scheduler %s (dashboard %s)", scheduler, client.dashboard_link)
        else:
            cluster, n, threads = local_cluster(engine, n_workers)
            stack.callback(cluster.close)
            from distributed import Client

            client = stack.enter_context(Client(cluster, set_as_default=False))
            log.info("LocalCluster: %d worker(s) × %d thread(s), %s torch thread(s) per task", n,
                     int(engine.get("threads_per_worker") or 1), threads or "default")  # fmt: skip
        workers = client.scheduler_info(n_workers=-1).get("workers", {}) if hasattr(client, "scheduler_info") else {}
        has_gpu = any((w.get("resources") or {}).get("GPU") for w in workers.values())
        resources = {"GPU": 1} if has_gpu and str(engine.get("device")) not in ("cpu", "mps") else {}
        if not workers:
            log.warning("the scheduler has no workers yet; tasks wait until workers join")
        elif str(engine.get("device", "")).startswith("cuda") and not has_gpu:
            log.warning("engine.device is %r but no worker advertises a GPU resource (start them with "
                        "`--resources GPU=1`); GPU steps are not limited to one per GPU", engine["device"])  # fmt: skip
        yield client, resources, threads


def _open_log(path: Path) -> tuple[logging.Logger, logging.Handler]:
    log = logging.getLogger(_LOG)
    log.setLevel(logging.INFO)
    log.propagate = False
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return log, handler


def _failure_row(payload: dict[str, Any], err: BaseException) -> dict[str, Any]:
    slide = payload["slide"]
    text = f"{type(err).__name__}: {err}"
    if type(err).__name__ == "KilledWorker":
        deaths = int(getattr(err, "allowed_failures", payload.get("retries", 0))) + 1
        text = (f"the worker running this slide died {deaths} time(s) (out of memory? see the worker logs); rerun "
                f"`stfm batch` to retry it. {text}")  # fmt: skip
    return {"slide_id": slide["id"], "kind": slide["kind"], "input": slide["input"], "status": "failed",
            "output": str(output_path(payload)), "error": text, "messages": []}  # fmt: skip


def _settings_snapshot() -> dict[str, Any]:
    from .._settings import settings

    return {"cache_dir": str(settings.cache_dir), "data_dir": None if settings.data_dir is None else str(settings.data_dir),
            "offline": bool(settings.offline), "batch_size": settings._batch_size,
            "tune_malloc": bool(settings.tune_malloc), "show_progress_bar": False}  # fmt: skip


def make_payloads(cfg: BatchConfig, *, force: bool = False, local: bool = True) -> list[dict[str, Any]]:
    """One task argument per slide: the manifest row, the steps and settings, hashes. Paths only, no slide data.

    ``local``: the workers run on this machine and take this process's ``stfm.settings`` (cache folder, offline
    mode, data folder); remote workers keep the settings of their own environment.
    """
    from .. import __version__
    from ._hash import config_digest, fingerprint

    digest = config_digest(cfg.outputs_config())
    model_fps = {name: fingerprint(s["model"]) for name, s in cfg.steps.items() if s.get("model")}
    base = {"output": str(cfg.output), "steps": cfg.steps, "tiles": cfg.tiles, "images": cfg.images,
            "config_digest": digest, "version": __version__, "force": bool(force), "model_fingerprints": model_fps,
            "settings": _settings_snapshot() if local else {"show_progress_bar": False}, "device": str(cfg.engine["device"]),
            "retries": int(cfg.engine["retries"]), "torch_threads": cfg.engine.get("torch_threads")}  # fmt: skip
    return [{**base, "slide": s.to_dict()} for s in cfg.slides]


def run_batch(
    config: BatchConfig | str | os.PathLike[str],
    *,
    scheduler: str | None = None,
    n_workers: int | None = None,
    serial: bool = False,
    client: Any = None,
    force: bool = False,
    connect_timeout: float | None = None,
    show_progress_bar: bool | None = None,
) -> Any:
    """Run the configured steps on every slide of the manifest, one Dask task per slide.

    Parameters
    ----------
    config
        A :class:`BatchConfig` or the path of a YAML/TOML configuration (see ``docs/cluster.md``).
    scheduler
        Address of a running Dask scheduler (e.g. from dask-jobqueue); default ``engine.scheduler``, else a
        LocalCluster with one worker per GPU, or per core.
    n_workers
        LocalCluster workers (default ``engine.n_workers``, else GPUs or cores).
    serial
        Run the slides one after another in this process, without Dask (debugging, benchmarks).
    client
        An existing :class:`distributed.Client` to submit to (it is left open).
    force
        Recompute every slide even when its output is up to date.
    connect_timeout
        Seconds to wait for ``scheduler`` (default ``engine.connect_timeout``, 10 s).
    show_progress_bar
        Progress bar on stderr (default :attr:`stfm.settings.show_progress_bar`).

    Returns
    -------
    The summary as a :class:`pandas.DataFrame`, one row per slide in manifest order (``status`` is ``done``,
    ``skipped`` or ``failed``), also written to ``<output>/summary.csv``; ``attrs`` holds ``wall_s``,
    ``summary_path`` and ``log_path``.
    """
    import pandas as pd

    from .. import __version__
    from .._atomic import atomic_file, check_writable
    from .._settings import settings
    from ._checks import check_config

    t0 = time.perf_counter()
    cfg = config if isinstance(config, BatchConfig) else load_config(config)
    check_config(cfg)
    if cfg.summary == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError as err:
            msg = "output.summary='parquet' needs pyarrow: `pip install pyarrow`, or use summary: csv."
            raise ImportError(msg) from err
    scheduler = scheduler if scheduler is not None else cfg.engine.get("scheduler")
    timeout = float(connect_timeout if connect_timeout is not None else cfg.engine["connect_timeout"])
    check_writable(cfg.output / "summary.csv")
    log, handler = _open_log(cfg.output / "batch.log")
    progress = settings.show_progress_bar if show_progress_bar is None else bool(show_progress_bar)
    mode = "serial" if serial else ("client" if client is not None else (scheduler or "LocalCluster"))
    log.info("stfm %s batch: %d slide(s), steps %s, engine %s, config %s", __version__, len(cfg.slides),
             list(cfg.steps), mode, cfg.source or "<mapping>")  # fmt: skip
    rows: dict[str, dict[str, Any]] = {}
    try:
        payloads = make_payloads(cfg, force=force, local=serial or client is not None or scheduler is None)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(payloads), desc="stfm batch", unit="slide", disable=not progress)
        with bar:
            if serial:
                for p in payloads:
                    bar.set_postfix_str(p["slide"]["id"])
                    rows[p["slide"]["id"]] = _report(_run_local(p, int(cfg.engine["retries"])), log, bar)
            else:
                with _engine(cfg, client=client, scheduler=scheduler, n_workers=n_workers, connect_timeout=timeout,
                             log=log) as (cl, resources, threads):  # fmt: skip
                    rows.update(_submit(cl, payloads, resources, threads, int(cfg.engine["retries"]), log, bar))
    finally:
        wall = time.perf_counter() - t0
        ordered = [rows.get(s.id) or {"slide_id": s.id, "kind": s.kind, "input": s.input, "status": "not run",
                                      "output": str(cfg.output / f"{s.id}.zarr")} for s in cfg.slides]  # fmt: skip
        summary = pd.DataFrame(ordered).reindex(columns=SUMMARY_COLUMNS)
        for col in ("n_obs", "n_genes_predicted", "n_tumor"):
            summary[col] = summary[col].astype("Int64")
        path = cfg.output / f"summary.{cfg.summary}"
        with atomic_file(path) as tmp:
            summary.to_parquet(tmp, index=False) if cfg.summary == "parquet" else summary.to_csv(tmp, index=False)
        counts = summary["status"].value_counts().to_dict()
        log.info("finished in %.1f s: %s; summary %s", wall, ", ".join(f"{v} {k}" for k, v in counts.items()), path)
        log.removeHandler(handler)
        handler.close()
    summary.attrs.update({"wall_s": wall, "summary_path": str(path), "log_path": str(cfg.output / "batch.log")})
    return summary


def _run_local(payload: dict[str, Any], retries: int) -> dict[str, Any]:
    for attempt in range(retries + 1):
        try:
            return run_slide(payload)
        except Exception as err:  # transient errors re-raised by the task: retry like distributed's `retries=`
            if attempt == retries or not is_transient(err):
                return _failure_row(payload, err)
    raise AssertionError  # pragma: no cover


def _report(row: dict[str, Any], log: logging.Logger, bar: Any) -> dict[str, Any]:
    sid, status = row["slide_id"], row["status"]
    if status == "failed":
        log.error("slide %s failed: %s", sid, row.get("error"))
        if row.get("traceback"):
            log.error("slide %s traceback:\n%s", sid, row["traceback"].rstrip())
    else:
        log.info("slide %s %s: %s obs, %.1f s on %s -> %s", sid, status, row.get("n_obs"), row.get("time_s") or 0.0,
                 row.get("worker"), row.get("output"))  # fmt: skip
    for m in row.get("messages") or []:
        log.warning("slide %s: %s", sid, m)
    bar.update(1)
    return row


def _submit(client: Any, payloads: list[dict[str, Any]], resources: dict[str, Any], threads: int | None,
            retries: int, log: logging.Logger, bar: Any) -> dict[str, dict[str, Any]]:  # fmt: skip
    from distributed import as_completed

    token = uuid.uuid4().hex[:8]
    futures = {}
    for p in payloads:
        p = {**p, "torch_threads": threads or p.get("torch_threads")}
        fut = client.submit(run_slide, p, key=f"stfm-batch-{p['slide']['id']}-{token}", pure=False, retries=retries,
                            resources=resources or None)  # fmt: skip
        futures[fut] = p
    rows: dict[str, dict[str, Any]] = {}
    done = {"done": 0, "skipped": 0, "failed": 0}
    try:
        for fut in as_completed(list(futures), loop=client.loop):
            p = futures[fut]
            try:
                row = fut.result()
            except Exception as err:
                row = _failure_row(p, err)
            rows[p["slide"]["id"]] = _report(row, log, bar)
            done[row["status"]] = done.get(row["status"], 0) + 1
            bar.set_postfix(done)
    except BaseException:
        client.cancel(list(futures))
        raise
    return rows
