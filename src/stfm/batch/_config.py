"""The ``stfm batch`` configuration: a YAML or TOML file holding a slide manifest, the steps and the engine.

Every problem found in a file is collected and reported at once (one line each), so a manifest of hundreds of
rows with three typos is fixed in one pass. Input files are *not* checked here: they may live on a file system
only the workers see, and a missing file fails its own slide, not the batch.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._validation import check_valid_key

__all__ = [
    "IMAGE_SUFFIXES",
    "KINDS",
    "STEPS",
    "BatchConfig",
    "BatchConfigError",
    "Slide",
    "load_config",
    "parse_config",
]

#: Steps run on every slide, in this order.
STEPS = ("features", "expression", "cancer")
#: Input kinds: a her2st/Visium-style AnnData, a SpatialData store, or an H&E image with no spatial data.
KINDS = ("h5ad", "spatialdata", "image")
IMAGE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".jpg", ".jpeg", ".png", ".bmp")

_TOP = {"output", "steps", "tiles", "engine", "slides"}
_SLIDE = {"id", "input", "kind", "mpp", "platform", "image", "table_key", "image_key", "library_id"}
_OUTPUT = {"dir", "images", "summary"}
_STEP_KEYS = {
    "features": {"encoder", "model_path", "revision", "batch_size", "num_workers", "cache", "tile_px", "mpp",
                 "spot_scale", "amp"},
    "expression": {"model", "library_size", "genes", "smooth", "return_std", "table_key"},
    "cancer": {"model", "threshold", "boundary_distance", "min_spots", "shapes"},
}  # fmt: skip
_TILES = {"tile_um", "stride_um", "min_tissue_fraction", "mpp", "tile_px", "max_px"}
_ENGINE = {"scheduler", "n_workers", "threads_per_worker", "torch_threads", "processes", "retries", "device",
           "gpus", "memory_limit", "connect_timeout", "dashboard_address"}  # fmt: skip


class BatchConfigError(ValueError):
    """A batch configuration that cannot run; the message lists every problem found."""


@dataclass(frozen=True)
class Slide:
    """One manifest row: a slide or section and how to read it (paths are absolute)."""

    id: str
    input: str
    kind: str
    mpp: float | None = None
    platform: str | None = None
    image: str | None = None
    table_key: str | None = None
    image_key: str | None = None
    library_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (what travels to a worker: paths and numbers, never slide data)."""
        return asdict(self)


@dataclass(frozen=True)
class BatchConfig:
    """A parsed, checked batch configuration (see ``docs/cluster.md`` for the file format)."""

    output: Path
    slides: tuple[Slide, ...]
    steps: dict[str, dict[str, Any]]
    tiles: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    images: bool = False
    summary: str = "csv"
    source: Path | None = None

    def outputs_config(self) -> dict[str, Any]:
        """Everything that changes what a slide's output holds (hashed; the engine settings are not)."""
        return {"steps": self.steps, "tiles": self.tiles, "images": self.images}


_ENGINE_DEFAULTS: dict[str, Any] = {
    "scheduler": None,
    "n_workers": None,
    "threads_per_worker": 1,
    "torch_threads": None,
    "processes": True,
    "retries": 2,
    "device": "auto",
    "gpus": None,
    "memory_limit": "auto",
    "connect_timeout": 10.0,
    "dashboard_address": None,
}


def load_config(path: str | os.PathLike[str]) -> BatchConfig:
    """Read and check a batch configuration file (``.yaml``/``.yml`` or ``.toml``).

    Relative paths in the file (output folder, inputs, model folders, a CSV manifest) are taken relative to the
    file's own folder.

    Parameters
    ----------
    path
        The configuration file.

    Returns
    -------
    The checked :class:`BatchConfig`.
    """
    path = Path(path)
    if not path.is_file():
        msg = (
            f"Batch configuration {str(path)!r} not found. Pass the path of a YAML or TOML file (see docs/cluster.md)."
        )
        raise FileNotFoundError(msg)
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:
            msg = "Reading a YAML batch configuration needs PyYAML: `pip install pyyaml` (or write the file as TOML)."
            raise ImportError(msg) from err
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            msg = f"{str(path)!r} is not valid YAML: {err}"
            raise BatchConfigError(msg) from err
    elif suffix == ".toml":
        import tomllib

        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            msg = f"{str(path)!r} is not valid TOML: {err}"
            raise BatchConfigError(msg) from err
    else:
        msg = f"Expected a batch configuration ending in .yaml, .yml or .toml, found {path.name!r}."
        raise BatchConfigError(msg)
    return parse_config(raw, base=path.resolve().parent, source=path.resolve())


def parse_config(raw: Any, *, base: str | os.PathLike[str] | None = None, source: Path | None = None) -> BatchConfig:
    """Check a configuration given as a mapping (the parsed file) and return a :class:`BatchConfig`.

    Parameters
    ----------
    raw
        Mapping with ``output``, ``steps``, ``slides`` and optionally ``tiles`` and ``engine``.
    base
        Folder relative paths are resolved against (default: the working directory).
    source
        The file it came from (for messages).
    """
    base = Path(base) if base is not None else Path.cwd()
    problems: list[str] = []
    if not isinstance(raw, Mapping):
        msg = f"Expected the batch configuration to be a mapping (keys {sorted(_TOP)}), found {type(raw).__name__}."
        raise BatchConfigError(msg)
    _unknown(raw, _TOP, "the configuration", problems)
    for key in ("output", "steps", "slides"):
        if key not in raw:
            problems.append(f"`{key}` is missing (required: output, steps, slides)")

    output, images, summary = _parse_output(raw.get("output"), base, problems)
    steps = _parse_steps(raw.get("steps"), base, problems)
    tiles = _parse_section(raw.get("tiles"), _TILES, "tiles", problems)
    engine = {**_ENGINE_DEFAULTS, **_parse_section(raw.get("engine"), _ENGINE, "engine", problems)}
    _check_engine(engine, problems)
    slides = _parse_slides(raw.get("slides"), base, problems)
    if "expression" in steps and steps["expression"].get("library_size") == "observed":
        bad = [s.id for s in slides if s.kind == "image"]
        if bad:
            problems.append(
                f"expression.library_size='observed' needs measured counts, but slides {bad[:5]} are H&E-only images; "
                "use a number (e.g. 1e4) or 'predicted'"
            )
    if "features" not in steps and ("expression" in steps or "cancer" in steps):
        bad = [s.id for s in slides if s.kind == "image"]
        if bad:
            problems.append(
                f"slides {bad[:5]} are H&E-only images, which have no embedding until the features step runs; add "
                "`steps.features`"
            )
    for s in slides:
        if Path(s.input) == output / f"{s.id}.zarr":
            problems.append(f"slide {s.id!r}: its input {s.input!r} is also its output; choose another output folder")
    if problems:
        where = f" in {str(source)!r}" if source is not None else ""
        msg = f"{len(problems)} problem(s) in the batch configuration{where}:\n  - " + "\n  - ".join(problems)
        raise BatchConfigError(msg)
    return BatchConfig(output=output, slides=tuple(slides), steps=steps, tiles=tiles, engine=engine, images=images,
                       summary=summary, source=source)  # fmt: skip


def _unknown(mapping: Mapping[str, Any], allowed: set[str], where: str, problems: list[str]) -> None:
    extra = sorted(str(k) for k in mapping if k not in allowed)
    if extra:
        problems.append(f"unknown key(s) {extra} in {where}; expected keys among {sorted(allowed)}")


def _path(value: Any, base: Path) -> str:
    p = Path(os.path.expandvars(str(value))).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _parse_output(value: Any, base: Path, problems: list[str]) -> tuple[Path, bool, str]:
    if value is None:
        return base, False, "csv"
    if isinstance(value, str | os.PathLike):
        value = {"dir": value}
    if not isinstance(value, Mapping) or "dir" not in value:
        problems.append("`output` must be a folder path or a mapping with `dir` (and optional `images`, `summary`)")
        return base, False, "csv"
    _unknown(value, _OUTPUT, "output", problems)
    images = value.get("images", False)
    if not isinstance(images, bool):
        problems.append(f"output.images must be true or false, found {images!r}")
    summary = str(value.get("summary", "csv"))
    if summary not in ("csv", "parquet"):
        problems.append(f"output.summary must be 'csv' or 'parquet', found {summary!r}")
    return Path(_path(value["dir"], base)), bool(images), summary


def _parse_section(value: Any, allowed: set[str], name: str, problems: list[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.append(f"`{name}` must be a mapping, found {type(value).__name__}")
        return {}
    _unknown(value, allowed, name, problems)
    return {str(k): v for k, v in value.items() if k in allowed}


def _parse_steps(value: Any, base: Path, problems: list[str]) -> dict[str, dict[str, Any]]:
    if value is None:
        return {}
    if isinstance(value, Sequence) and not isinstance(value, str):  # steps: [features, ...] needs their settings
        problems.append(
            "`steps` must be a mapping of step name to settings, e.g. `features: {encoder: efficientnet_lite0}`"
        )
        return {}
    if not isinstance(value, Mapping) or not value:
        problems.append(f"`steps` must name at least one of {list(STEPS)}")
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name, settings in value.items():
        if name not in STEPS:
            from difflib import get_close_matches

            close = get_close_matches(str(name), STEPS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown step {name!r}{hint}; steps are {list(STEPS)}, run in that order")
            continue
        if isinstance(settings, str) and name in ("expression", "cancer"):
            settings = {"model": settings}
        elif isinstance(settings, str) and name == "features":
            settings = {"encoder": settings}
        if not isinstance(settings, Mapping):
            problems.append(f"steps.{name} must be a mapping of settings, found {settings!r}")
            continue
        _unknown(settings, _STEP_KEYS[name], f"steps.{name}", problems)
        s = {str(k): v for k, v in settings.items() if k in _STEP_KEYS[name]}
        if name == "features":
            if not isinstance(s.get("encoder"), str) or not s.get("encoder"):
                problems.append("steps.features.encoder is missing: an encoder key such as 'efficientnet_lite0'")
            if s.get("model_path") is not None:
                s["model_path"] = _path(s["model_path"], base)
            s.setdefault("cache", True)
            for key in ("batch_size", "tile_px"):
                if key in s and (not isinstance(s[key], int) or isinstance(s[key], bool) or s[key] < 1):
                    problems.append(f"steps.features.{key} must be a positive integer, found {s[key]!r}")
            if "num_workers" in s and (not isinstance(s["num_workers"], int) or s["num_workers"] < 0):
                problems.append(f"steps.features.num_workers must be an integer >= 0, found {s['num_workers']!r}")
        else:
            if not s.get("model"):
                problems.append(f"steps.{name}.model is missing: the folder a saved model was written to")
            else:
                s["model"] = _path(s["model"], base)
        if name == "expression":
            lib = s.get("library_size", 1e4)
            if isinstance(lib, str) and lib not in ("observed", "predicted"):
                try:
                    lib = float(lib)
                except ValueError:
                    problems.append(
                        f"steps.expression.library_size must be a number, 'observed' or 'predicted', found {lib!r}"
                    )
            s["library_size"] = float(lib) if isinstance(lib, int | float) and not isinstance(lib, bool) else lib
            if "genes" in s:
                genes = s["genes"]
                if isinstance(genes, str) or not isinstance(genes, Sequence) or not genes:
                    problems.append("steps.expression.genes must be a non-empty list of gene names")
                else:
                    s["genes"] = [str(g) for g in genes]
            s["table_key"] = str(s.get("table_key", "predicted"))
        if name == "cancer":
            s.setdefault("shapes", True)
        out[name] = s
    return {k: out[k] for k in STEPS if k in out}


def _check_engine(engine: dict[str, Any], problems: list[str]) -> None:
    for key in ("n_workers", "threads_per_worker", "torch_threads"):
        v = engine.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            problems.append(f"engine.{key} must be a positive integer, found {v!r}")
    r = engine.get("retries")
    if not isinstance(r, int) or isinstance(r, bool) or r < 0:
        problems.append(f"engine.retries must be an integer >= 0, found {r!r}")
    t = engine.get("connect_timeout")
    if not isinstance(t, int | float) or isinstance(t, bool) or t <= 0:
        problems.append(f"engine.connect_timeout must be a positive number of seconds, found {t!r}")
    dev = engine.get("device")
    if not isinstance(dev, str) or not (dev in ("auto", "cpu", "cuda", "mps") or dev.startswith("cuda:")):
        problems.append(f"engine.device must be 'auto', 'cpu', 'cuda' or 'mps', found {dev!r}")
    g = engine.get("gpus")
    if (
        g is not None
        and not (isinstance(g, int) and not isinstance(g, bool) and g >= 0)
        and not (isinstance(g, Sequence) and not isinstance(g, str) and all(isinstance(i, int) for i in g))
    ):
        problems.append(f"engine.gpus must be a number of GPUs or a list of device ids, found {g!r}")
    if engine.get("scheduler") is not None and not isinstance(engine["scheduler"], str):
        problems.append(f"engine.scheduler must be an address such as 'tcp://host:8786', found {engine['scheduler']!r}")


def _read_manifest(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        problems.append(f"manifest file {str(path)!r} not found")
        return []
    delim = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter=delim))
    return [{k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in r.items() if k and v not in (None, "")}
            for r in rows]  # fmt: skip


def _infer_kind(path: str) -> str | None:
    p = path.lower().rstrip("/")
    if p.endswith(".h5ad"):
        return "h5ad"
    if p.endswith(".zarr"):
        return "spatialdata"
    if p.endswith(IMAGE_SUFFIXES) or p.endswith(".ome.tif"):
        return "image"
    return None


def _parse_slides(value: Any, base: Path, problems: list[str]) -> list[Slide]:
    if value is None:
        return []
    if isinstance(value, str | os.PathLike):
        manifest = Path(_path(value, base))
        rows = _read_manifest(manifest, problems)
        row_base = manifest.parent
    elif isinstance(value, Sequence):
        rows, row_base = list(value), base
    else:
        problems.append("`slides` must be a list of rows or the path of a CSV/TSV manifest")
        return []
    if not rows:
        problems.append("`slides` holds no slide")
    slides: list[Slide] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        where = f"slides[{i}]"
        if not isinstance(row, Mapping):
            problems.append(f"{where} must be a mapping with at least `id` and `input`, found {row!r}")
            continue
        _unknown(row, _SLIDE, where, problems)
        sid = row.get("id")
        if sid is None or sid == "":
            problems.append(f"{where} has no `id`")
            continue
        sid = str(sid)
        where = f"slides[{i}] (id {sid!r})"
        try:
            check_valid_key(sid, what="slide id")
        except ValueError as err:
            problems.append(f"{where}: {err}")
            continue
        if sid.lower() in seen:
            problems.append(
                f"{where}: id also used by slides[{seen[sid.lower()]}] (ids name output folders; they must differ, ignoring case)"
            )
            continue
        seen[sid.lower()] = i
        if not row.get("input"):
            problems.append(f"{where} has no `input` (an .h5ad, a SpatialData .zarr or an H&E image)")
            continue
        inp = _path(row["input"], row_base)
        kind = row.get("kind") or _infer_kind(inp)
        if kind not in KINDS:
            problems.append(
                f"{where}: cannot tell the input kind of {inp!r}"
                + (f" (kind {kind!r})" if kind else "")
                + f"; set `kind` to one of {list(KINDS)}"
            )
            continue
        mpp = row.get("mpp")
        if mpp is not None:
            try:
                mpp = float(mpp)
                if not mpp > 0:
                    raise ValueError
            except (TypeError, ValueError):
                problems.append(f"{where}: mpp (µm per pixel) must be a positive number, found {row.get('mpp')!r}")
                continue
        if kind == "image" and mpp is None:
            problems.append(f"{where}: an H&E-only image needs `mpp` (µm per pixel, e.g. 0.25 for a 40x scan)")
            continue
        for key in ("table_key", "image_key", "library_id"):
            if row.get(key) is not None:
                try:
                    check_valid_key(str(row[key]), what=key)
                except ValueError as err:
                    problems.append(f"{where}: {err}")
        slides.append(Slide(
            id=sid, input=inp, kind=str(kind), mpp=mpp,
            platform=None if row.get("platform") is None else str(row["platform"]),
            image=None if row.get("image") is None else _path(row["image"], row_base),
            table_key=None if row.get("table_key") is None else str(row["table_key"]),
            image_key=None if row.get("image_key") is None else str(row["image_key"]),
            library_id=None if row.get("library_id") is None else str(row["library_id"]),
        ))  # fmt: skip
    return slides
