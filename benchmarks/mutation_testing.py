"""Mutation testing of stfm's core: break one expression at a time and see whether the tests notice.

Run from the repository root (slow: not part of CI)::

    python benchmarks/mutation_testing.py                     # every target, up to 12 mutants each; writes docs/benchmarks/mutation.md
    python benchmarks/mutation_testing.py --targets tiles --max-mutants 40
    python benchmarks/mutation_testing.py --root /path/to/clone   # mutate a separate checkout (safer while editing)

For each target (a module of the core and the tests that cover it) the script parses the module, lists every
mutable expression inside the named functions — a comparison flipped (``<`` ↔ ``<=``, ``==`` ↔ ``!=``, …), an
arithmetic operator swapped (``+`` ↔ ``-``, ``*`` ↔ ``/``, ``//`` ↔ ``/``, ``**`` → ``*``), a ``not`` dropped, a
boolean constant negated, a number changed (``n`` → ``n + 1``, ``0.5`` → ``1.0``; 0 and 1 to each other), a
slice step reversed (``[::-1]`` → ``[:]``) — and draws up to ``--max-mutants`` of them (seed 0). Each mutant is
written over the module (``ast.unparse`` of the whole file), the target's tests run (``pytest -x``; first once on
the unmutated code, which must pass and sets the per-mutant timeout to 4× its time), and the original file is
restored. A mutant is *killed* when the tests fail or time out, *survived* when
they pass. The page lists the kill rate per target and every survivor with its line, so that each is either killed
by a new test or shown to be equivalent.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "benchmarks" / "mutation.md"
RESULTS = REPO / "benchmarks" / "results" / "mutation.json"

#: target name → (module, functions whose bodies are mutated, tests that cover them)
TARGETS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "tiles": ("src/stfm/data/_dataset.py", ("crop_boxes", "read_tile", "crop_mask", "__init__"),
              ("tests/test_tiles.py", "tests/test_cell_tiles.py::test_cell_masks_are_the_cells_outlines_in_image_pixels",
               "tests/test_features.py::test_features_match_independently_cut_tiles")),
    "features": ("src/stfm/pp/_features.py", ("extract_features", "_tile_bins"),
                 ("tests/test_features.py", "tests/test_cell_tiles.py")),
    "likelihoods": ("src/stfm/module/_components.py", ("forward", "info_nce", "zinb_variance", "segment_softmax"),
                    ("tests/test_components.py", "tests/test_expression.py", "tests/test_retrieval_and_smoothing.py",
                     "tests/test_multimodal.py")),
    # the expression tests take minutes: these two targets run the ones that reach the mutated functions
    "folds": ("src/stfm/tl/_evaluate.py", ("cross_validate", "_split_sections", "pearson_per_gene", "evaluate_expression"),
              ("tests/test_expression.py", "tests/test_retrieval_and_smoothing.py", "-k",
               "metrics or cross_validate or split or quality_floor or on_validation")),
    "validation": ("src/stfm/model/_training.py", ("validation_scores", "_pearson_mean", "on_validation_epoch_end"),
                   ("tests/test_expression.py", "tests/test_retrieval_and_smoothing.py", "tests/test_graph_ae.py", "-k",
                    "early_stopping or validation or quality_floor")),
    "thresholds": ("src/stfm/tl/_cancer_fit.py", ("fit_cancer_model", "_train_one"), ("tests/test_cancer.py",)),
    "regions": ("src/stfm/graph/_regions.py", ("call_regions", "tumour_shapes"), ("tests/test_cancer.py", "tests/test_graph.py")),
    "geometry": ("src/stfm/graph/_geometry.py", ("knn_indices", "spot_pitch", "smoothing_matrix", "spatial_blocks", "radius_graph"),
                 ("tests/test_graph.py", "tests/test_retrieval_and_smoothing.py")),
    "readers": ("src/stfm/io/_her2st.py", (), ("tests/test_io_her2st.py",)),
    "checksums": ("src/stfm/datasets/_her2st.py", (), ("tests/test_io_her2st.py",)),
}  # fmt: skip

_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
        ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}  # fmt: skip
_BIN = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
        ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv}  # fmt: skip


#: survivors shown to be equivalent (the mutated code computes the same thing), keyed "target:line:mutation"
EQUIVALENT: dict[str, str] = {
    "tiles:94:2 → 3": "`xy[:, :2]` → `xy[:, :3]`: the same array for (n, 2) coordinates; a third column would be "
    "kept but nothing downstream reads it (`crop_boxes` takes `[:, :2]`). Equivalent.",
    "folds:126:0 → 1": "`members[0]` → `members[1]` of an ensemble, read only when the model itself has no gene "
    "sets: every member is fitted on the same genes and has the same `gene_sets_`. Equivalent.",
    "folds:373:0 → 1": "the default of `getattr(members[0], 'smoothing_', 0)`: every fitted model sets "
    "`smoothing_` (0 when no smoothing was chosen), so the default is never read. Equivalent.",
    "validation:24:Gt → GtE": "`den > 1e-12` → `>=`: differs only for a gene whose variance product is exactly "
    "1e-12 in floating point. Equivalent in practice.",
    "regions:38:2 → 3": "`coords[:, :2]` → `coords[:, :3]`: the same array for (n, 2) coordinates. Equivalent.",
    "regions:51:False → True": "`connected_components(directed=True)` on the tumour adjacency: scipy's default "
    "`connection='weak'` then gives the undirected components. Equivalent.",
    "regions:73:8 → 9": "`quad_segs` of the disks around tumour spots (8 → 9 segments per quarter circle): a finer "
    "outline of the same region, the same spots inside. Equivalent.",
    "checksums:69:20 → 21": "the read block of the SHA-256 loop (1 MiB → 2 MiB): the digest does not depend on it. "
    "Equivalent.",
    "checksums:118:False → True": "pooch's progress bar during a download switched on: display only. Equivalent.",
}

#: survivors neither equivalent nor killed yet, with what would kill them
OPEN: dict[str, str] = {}

#: survivors of the recorded run that a test added afterwards kills (each checked by applying the mutant by hand)
KILLED_LATER: dict[str, str] = {
    "checksums:137:IsNot → Is": "killed by `tests/test_io_her2st.py::test_fetch_section_reads_only_the_parts_asked_"
    "for` (added after this run): unrequested parts were fetched (labels with `labels=False`).",
    "folds:320:In → NotIn": "killed by `tests/test_expression.py::test_cross_validate_every_fold_keeps_the_test_"
    "patient_out` (extended after this run): the leak error must name the leaking section, and a clean explicit "
    "fold must run.",
    "readers:230:`not` dropped": "killed by `tests/test_io_her2st.py::test_a_section_id_given_as_a_path_says_how_to_"
    "fetch_it` (added after this run): the mutant gave a generic message instead of the way to fetch the section.",
    **{f"geometry:{line}:{m}": "killed by `tests/test_graph.py::test_spatial_blocks_partition_the_spots_and_each_"
       "halo_holds_every_neighbour` (added after this run; brute-force halo and partition on a grid whose block "
       "edges fall on spots)" for line, m in ((204, "0 → 1"), (210, "Add → Sub"), (211, "1 → 0"),
                                              (213, "Sub → Add"), (221, "1 → 0"), (222, "GtE → Gt"))},
    "geometry:143:2 → 3": "killed by `tests/test_graph.py::test_radius_graph_links_a_two_spot_section` (added after "
    "this run).",
    "thresholds:208:0 → 1": "killed by `tests/test_cancer.py::test_bad_input_errors` (extended after this run: a "
    "missing `use_rep` on one section lists that section's keys).",
    "thresholds:222:0 → 1": "killed by `tests/test_cancer.py::test_a_threshold_fold_without_positives_in_training_is_"
    "skipped` (added after this run).",
    "validation:42:1 → 0": "killed by `tests/test_expression.py::test_validation_scores_match_an_independent_"
    "computation` (added after this run: the composition metric against scipy, spot by spot).",
    "regions:45:1 → 0": "killed by `tests/test_graph.py::test_call_regions_with_a_one_spot_section` (added after this "
    "run).",
    "validation:71:True → False": "killed by `tests/test_expression.py::test_early_stopping_on_elbo` (extended "
    "after this run: the rows of a method that predicts in every stage carry its Pearson).",
    "validation:89:Sub → Add": "killed by `tests/test_expression.py::test_monitor_stops_patience_epochs_after_the_"
    "best_and_restores_it` (added after this run).",
    "validation:89:IsNot → Is": "killed by the same scripted-curve test (the mutant never stops early).",
    "validation:90:True → False": "killed by the same scripted-curve test (`should_stop` never set).",
    "readers:342:0 → 1": "killed by `tests/test_io_her2st.py::test_microns_per_pixel_from_a_crop_under_one_array_"
    "step_wide` (added after this run: a crop whose array x spans 0.9 steps).",
    "checksums:142:Eq → NotEq": "killed by the same test (it now checks the warning for a section with no published "
    "image, which the mutant drops).",
}


@dataclass
class Mutant:
    index: int  # position of the node in ast.walk order
    line: int
    kind: str
    description: str


def _in_functions(tree: ast.AST, names: tuple[str, ...]) -> set[int]:
    """ids of nodes inside the named functions (all nodes when ``names`` is empty), docstrings excluded."""
    keep: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (not names or node.name in names):
            body = (
                node.body[1:]
                if node.body
                and isinstance(node.body[0], ast.Expr)
                and isinstance(getattr(node.body[0], "value", None), ast.Constant)
                else node.body
            )
            for stmt in body:
                keep.update(id(n) for n in ast.walk(stmt))
    return keep


def _candidates(tree: ast.AST, names: tuple[str, ...]) -> list[Mutant]:
    inside = _in_functions(tree, names)
    out = []
    for i, node in enumerate(ast.walk(tree)):
        if id(node) not in inside:
            continue
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Compare) and type(node.ops[0]) in _CMP:
            out.append(Mutant(i, line, "compare", f"{type(node.ops[0]).__name__} → {_CMP[type(node.ops[0])].__name__}"))
        elif isinstance(node, ast.BinOp) and type(node.op) in _BIN:
            out.append(Mutant(i, line, "arithmetic", f"{type(node.op).__name__} → {_BIN[type(node.op)].__name__}"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            out.append(Mutant(i, line, "not", "`not` dropped"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            out.append(Mutant(i, line, "constant", f"{node.value} → {not node.value}"))
        elif (
            isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool)
        ):
            out.append(Mutant(i, line, "constant", f"{node.value!r} → {_number(node.value)!r}"))
        elif isinstance(node, ast.Slice) and isinstance(node.step, ast.UnaryOp) and isinstance(node.step.op, ast.USub):
            out.append(Mutant(i, line, "slice", "[::-1] → [:]"))
    return out


def _number(v: float) -> float:
    if v == 0:
        return 1
    if v == 1:
        return 0
    return v + 1 if isinstance(v, int) else v * 2


def _apply(tree: ast.AST, m: Mutant) -> ast.AST:
    tree = copy.deepcopy(tree)
    node = list(ast.walk(tree))[m.index]
    if m.kind == "compare":
        node.ops[0] = _CMP[type(node.ops[0])]()
    elif m.kind == "arithmetic":
        node.op = _BIN[type(node.op)]()
    elif m.kind == "not":
        node.op = ast.UAdd()  # `+x` on a bool is the bool as an int: truthiness kept, negation gone
    elif m.kind == "constant":
        node.value = (not node.value) if isinstance(node.value, bool) else _number(node.value)
    elif m.kind == "slice":
        node.step = None
    return ast.fix_missing_locations(tree)


def run_target(name: str, root: Path, max_mutants: int, timeout: int, seed: int) -> dict:
    module, funcs, tests = TARGETS[name]
    path = root / module
    original = path.read_text()
    tree = ast.parse(original)
    cands = _candidates(tree, funcs)
    rng = random.Random(f"{seed}:{name}")
    chosen = sorted(rng.sample(cands, min(max_mutants, len(cands))), key=lambda m: m.line)
    env = {**os.environ, "PYTHONPATH": str(root / "src") + os.pathsep + str(root / "tests"), "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]
    t0 = time.perf_counter()
    base = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    baseline = time.perf_counter() - t0
    if base.returncode != 0:  # a mutant can only be "killed" by tests that pass on the unmutated code
        msg = f"the {name} tests fail on the unmutated code:\n{base.stdout[-3000:]}"
        raise SystemExit(msg)
    timeout = min(timeout, max(120, int(4 * baseline)))  # a mutant that loops is killed by the timeout
    print(f"  baseline {baseline:.0f} s ({len(cands)} mutable expressions, {len(chosen)} drawn)", flush=True)
    rows = []
    try:
        for m in chosen:
            path.write_text(ast.unparse(_apply(tree, m)) + "\n")
            t0 = time.perf_counter()
            try:
                res = subprocess.run(
                    cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout, check=False
                )
                status = "survived" if res.returncode == 0 else "killed"
                failed = next((ln.split(" ")[1] for ln in res.stdout.splitlines() if ln.startswith("FAILED ")), "")
            except subprocess.TimeoutExpired:
                status, failed = "killed", f"timeout ({timeout} s)"
            rows.append({"line": m.line, "kind": m.kind, "mutation": m.description, "status": status,
                         "caught_by": failed, "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
            print(f"  {name}:{m.line} {m.description:<24} {status:<9} {failed}", flush=True)
    finally:
        path.write_text(original)
    killed = sum(r["status"] == "killed" for r in rows)
    return {"target": name, "module": module, "functions": list(funcs), "tests": list(tests), "candidates": len(cands),
            "baseline_s": round(baseline, 1), "mutants": len(rows), "killed": killed, "rows": rows}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--max-mutants", type=int, default=12)
    ap.add_argument("--timeout", type=int, default=600, help="most seconds per mutant (also capped at 4× the unmutated run, at least 120 s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", type=Path, default=REPO, help="checkout to mutate (restored after each mutant)")
    ap.add_argument("--render", action="store_true", help="rewrite the page from the results JSON")
    ap.add_argument("--results", type=Path, default=RESULTS, help="results JSON to read and update")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                    help="combine results files of runs on separate checkouts (per target, later files win) into "
                         "--results and render the page")  # fmt: skip
    args = ap.parse_args()
    results_path = args.results
    if args.merge:
        by_target: dict[str, dict] = {}
        for f in args.merge:
            by_target.update({t["target"]: t for t in json.loads(f.read_text())["targets"]})
        merged = {"targets": [by_target[n] for n in TARGETS if n in by_target]}
        results_path.write_text(json.dumps(merged, indent=1) + "\n")
        render(merged)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds, so the mutated module is restored
    if args.render:
        render(json.loads(results_path.read_text()))
        return
    root = args.root.resolve()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True, text=True
    ).stdout
    if dirty.strip():
        msg = f"{root}/src has uncommitted changes; mutate a clean checkout (`--root`), the script restores files it touches."
        raise SystemExit(msg)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    # results are kept per target: a run of some targets replaces theirs and keeps the others (each row says the
    # commit and mutant budget it ran with); written after every target, so an interrupted run keeps what it did
    results = json.loads(results_path.read_text()) if results_path.exists() else {"targets": []}
    by_name = {t["target"]: t for t in results.get("targets", [])}
    for name in args.targets:
        print(f"{name}:", flush=True)
        t = run_target(name, root, args.max_mutants, args.timeout, args.seed)
        by_name[name] = {**t, "commit": commit, "max_mutants": args.max_mutants, "seed": args.seed}
        results = {"targets": [by_name[n] for n in TARGETS if n in by_name]}
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1) + "\n")
    render(results)
    print(f"wrote {PAGE.relative_to(REPO)} and {results_path}")


def render(results: dict) -> None:
    lines = [
        "# Mutation testing",
        "",
        "Generated by `python benchmarks/mutation_testing.py` (every target, up to 12 mutants each, seed 0; "
        "`--targets` / `--max-mutants` run some targets with another budget and keep the others, and `--merge` "
        "combines runs made on separate checkouts; each row gives the commit and the budget it ran with). Method: "
        "the script's docstring. A mutant is killed when the target's tests fail (or time out) under it.",
        "",
        "| target | module | mutable expressions | mutants run (budget) | killed | kill rate | commit |",
        "|---|---|---|---|---|---|---|",
    ]
    tot_m = tot_k = 0
    for t in results["targets"]:
        rate = t["killed"] / t["mutants"] if t["mutants"] else float("nan")
        tot_m, tot_k = tot_m + t["mutants"], tot_k + t["killed"]
        lines.append(
            f"| {t['target']} | `{t['module']}` | {t['candidates']} | {t['mutants']} ({t.get('max_mutants', '?')}) "
            f"| {t['killed']} | {rate:.0%} "
            f"| `{t.get('commit', '?')}` |"
        )
    if tot_m:
        lines.append(f"| **all** | | | {tot_m} | {tot_k} | **{tot_k / tot_m:.0%}** | |")
        survivors = [f"{t['target']}:{r['line']}:{r['mutation']}" for t in results["targets"] for r in t["rows"]
                     if r["status"] == "survived"]  # fmt: skip
        n_eq = sum(k in EQUIVALENT for k in survivors)
        n_later = sum(k in KILLED_LATER for k in survivors)
        n_open = len(survivors) - n_eq - n_later
        if tot_m > n_eq:
            lines += ["", f"Of the {len(survivors)} survivors, {n_eq} are equivalent mutants (they compute the same "
                      f"thing), {n_later} are killed by tests added after the run and {n_open} remain (listed below with the "
                      "reason): "
                      f"{tot_k + n_later} of the {tot_m - n_eq} non-equivalent mutants "
                      f"(**{(tot_k + n_later) / (tot_m - n_eq):.0%}**) fail the current tests."]  # fmt: skip
    missing = [n for n in TARGETS if n not in {t["target"] for t in results["targets"]}]
    if missing:
        lines += ["", f"Not run (no recorded result): {', '.join(missing)}."]
    lines += ["", "## Tests run per target", "", "| target | functions mutated | tests (`pytest -x` arguments) | unmutated run (s) |",
              "|---|---|---|---|"]  # fmt: skip
    for t in results["targets"]:
        funcs = ", ".join(f"`{f}`" for f in t["functions"]) or "whole module"
        lines.append(f"| {t['target']} | {funcs} | `{' '.join(t['tests'])}` | {t.get('baseline_s', float('nan')):.0f} |")
    lines += ["", "## Survivors", "", "| target | line | mutation | why it survives |", "|---|---|---|---|"]
    notes = EQUIVALENT
    for t in results["targets"]:
        for r in t["rows"]:
            if r["status"] == "survived":
                key = f"{t['target']}:{r['line']}:{r['mutation']}"
                why = notes.get(key) or KILLED_LATER.get(key) or OPEN.get(key, "not yet analysed")
                lines.append(f"| {t['target']} | {r['line']} | {r['mutation']} | {why} |")
    lines += [
        "",
        "## Killed, and by which test",
        "",
        "| target | line | mutation | first failing test |",
        "|---|---|---|---|",
    ]
    for t in results["targets"]:
        for r in t["rows"]:
            if r["status"] == "killed":
                lines.append(f"| {t['target']} | {r['line']} | {r['mutation']} | `{r['caught_by'] or 'error'}` |")
    PAGE.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
