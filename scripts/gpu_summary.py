"""The closing table of scripts/gpu_check.sh, from the files it wrote into OUT_DIR:

    python scripts/gpu_summary.py OUT_DIR [--exit-code N]

stages.tsv (stage, status, seconds, note), junit.xml (tests passed / failed / skipped; tests.tsv,
the per-test lines of scripts/gpu_check_plugin.py, where pytest was stopped before writing it), the
benchmark JSON gpu-*.json (per kernel the speed-up over dense cuBLAS/cuDNN: dense time / kernel
time, fwd+bwd, same dtype, geometric mean over the shapes; for masked_linear over the issue's
target shapes 8192x3072x768 and 8192x768x3072 where measured) and tune.json. Prints the table and
writes it to OUT_DIR/summary.txt. Needs only the standard library (it must run when nothing else
does).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

TARGET_LINEAR = {(8192, 3072, 768), (8192, 768, 3072)}
COLUMNS = [0.9, 0.95, 0.99]


def read_stages(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            parts = line.split("\t")
            rows.append((parts + ["", "", "", ""])[:4])
    return rows


def read_junit(path: Path) -> dict | None:
    """Counts of passed, failed, errors, skipped, and the failing tests' names."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return dict(passed=0, failed=0, errors=0, skipped=0, failing=[], broken=str(exc))
    counts = dict(passed=0, failed=0, errors=0, skipped=0, failing=[])
    for case in root.iter("testcase"):
        name = "::".join(p for p in (case.get("classname", ""), case.get("name", "")) if p)
        if not name:  # what pytest writes for the test a SIGINT stopped: it did not pass
            continue
        tags = {child.tag for child in case}
        if "failure" in tags:
            counts["failed"] += 1
            counts["failing"].append(name)
        elif "error" in tags:
            counts["errors"] += 1
            counts["failing"].append(name)
        elif "skipped" in tags:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def read_results(path: Path) -> dict | None:
    """The same counts from gpu_check_plugin's per-test lines (when, outcome, node id), written as
    tests end: what is known of a run that was stopped before pytest wrote its JUnit XML."""
    if not path.exists():
        return None
    state: dict = {}
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        when, outcome, nodeid = parts
        if outcome == "failed":
            state[nodeid] = "failed" if when == "call" else "errors"
        elif state.get(nodeid) not in ("failed", "errors"):
            state[nodeid] = {"passed": "passed", "skipped": "skipped", "xfailed": "skipped"}.get(outcome, "errors")
    counts = dict(passed=0, failed=0, errors=0, skipped=0, failing=[])
    for nodeid, status in state.items():
        counts[status] += 1
        if status in ("failed", "errors"):
            counts["failing"].append(nodeid)
    return counts


def selected_count(log: Path) -> int | None:
    """How many tests pytest selected, from its 'collected N items / M deselected / K selected' line."""
    if not log.exists():
        return None
    found = None
    for line in log.read_text(errors="replace").splitlines():
        m = re.search(r"collected (\d+) items?(?: / (\d+) deselected)?(?: / (\d+) selected)?", line)
        if m:
            total, deselected, selected = (int(g) if g else None for g in m.groups())
            found = selected if selected is not None else total - (deselected or 0)
    return found


def _total(counts: dict) -> int:
    return sum(counts[k] for k in ("passed", "failed", "errors", "skipped"))


def _geomean(values):
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def speedups(rows: list[dict]) -> list[tuple]:
    """[(op, provider, dtype, mode, shapes label, {sparsity: dense / provider})]."""
    table: dict = {}
    for r in rows:
        if r.get("op") == "soft_mask" or r.get("ms") is None:
            continue
        key = (r["op"], tuple(r["shape"]), r["dtype"], r.get("sparsity"), r["mode"])
        table.setdefault(key, {})[r["provider"]] = r["ms"]
    out: dict = {}
    for (op, shape, dtype, sp, mode), times in table.items():
        if "dense" not in times:
            continue
        for provider, ms in times.items():
            if provider == "dense" or ms <= 0:
                continue
            if mode != "fwd+bwd" and not (provider == "torch_bsr" and mode == "fwd"):
                continue  # fwd+bwd only; torch's BSR has no autograd, so its forward
            out.setdefault((op, provider, dtype, mode), {}).setdefault(sp, []).append((shape, times["dense"] / ms))
    result = []
    for (op, provider, dtype, mode), by_sp in sorted(out.items(), key=lambda kv: tuple(map(str, kv[0]))):
        shapes = {s for pts in by_sp.values() for s, _ in pts}
        only = TARGET_LINEAR if op == "masked_linear" and shapes & TARGET_LINEAR else None
        cells = {sp: _geomean([x for s, x in pts if only is None or s in only]) for sp, pts in by_sp.items()}
        label = "targets" if only else f"{len(shapes)} shape{'s' * (len(shapes) != 1)}"
        result.append((op, provider, dtype, mode, label, cells))
    return result


def bandwidth(rows: list[dict]) -> list[str]:
    best: dict = {}
    for r in rows:
        if r.get("op") == "soft_mask" and r.get("mode") == "fwd+bwd" and r.get("bandwidth"):
            key = (r["provider"], r["dtype"])
            if key not in best or r["bandwidth"] > best[key]["bandwidth"]:
                best[key] = r
    lines = []
    for (provider, dtype), r in sorted(best.items()):
        peak = f", {r['of_peak']:.0%} of the datasheet peak" if r.get("of_peak") else ""
        lines.append(f"  soft_mask {provider} {dtype} fwd+bwd: {r['bandwidth'] / 1e9:.0f} GB/s at n={r['shape'][0]}"
                     f"{peak}")
    return lines


def _fmt(x):
    return "-" if x is None else f"{x:.2f}x"


def summary(out_dir: Path, exit_code: int | None = None) -> str:
    lines = []
    stages = read_stages(out_dir / "stages.tsv")
    dry = any(s[0] == "mode" and s[1] == "dry-run" for s in stages)
    bench_files = sorted(p for p in out_dir.glob("gpu-*.json"))
    bench = None
    if bench_files:
        try:
            bench = json.loads(bench_files[0].read_text())
        except (OSError, ValueError) as exc:
            bench = dict(meta=dict(error=f"{bench_files[0].name}: {exc}"), rows=[])
    meta = (bench or {}).get("meta", {})
    title = "sparseops GPU check" + (" (DRY RUN: no GPU, nothing measured)" if dry else "")
    if meta.get("device"):
        title += f": {meta['device']}, torch {meta.get('torch')}"
    lines += [f"== {title} ==", f"{'stage':<8} {'status':<10} {'s':>5}  note"]
    for name, status, seconds, note in stages:
        if name != "mode":
            lines.append(f"{name:<8} {status:<10} {seconds:>5}  {note}")
    junit = read_junit(out_dir / "junit.xml")
    source = "junit.xml"
    per_test = read_results(out_dir / "tests.tsv")
    if per_test is not None and (junit is None or _total(per_test) > _total(junit)):
        junit, source = per_test, "tests.tsv: pytest was stopped before it wrote junit.xml"
    if junit is None:
        lines.append("tests: no junit.xml")
    else:
        total = _total(junit)
        selected = selected_count(out_dir / "gpu_check.log")
        of = f" of {selected} selected" if selected is not None and selected != total else ""
        lines.append(f"tests: {junit['passed']} passed, {junit['failed']} failed, {junit['errors']} errors, "
                     f"{junit['skipped']} skipped ({total} run{of}; {source})"
                     + (f"; junit.xml broken: {junit['broken']}" if junit.get("broken") else ""))
        for name in junit["failing"][:12]:
            lines.append(f"  FAILED {name}")
        if len(junit["failing"]) > 12:
            lines.append(f"  ... and {len(junit['failing']) - 12} more (junit.xml)")
    if bench is None:
        lines.append("bench: no gpu-*.json")
    else:
        rows = bench.get("rows", [])
        state = "complete" if meta.get("complete") else f"{meta.get('skipped_count', '?')} groups not measured"
        lines.append(f"bench: {bench_files[0].name}: {len(rows)} rows, {state}, {len(meta.get('errors', []))} errors"
                     + (f" ({meta['error']})" if meta.get("error") else ""))
        for err in meta.get("errors", [])[:5]:
            lines.append(f"  error: {err[:160]}")
        table = speedups(rows)
        if table:
            cols = [c for c in COLUMNS if any(c in cells for *_, cells in table)]
            lines.append("speed-up over dense cuBLAS/cuDNN (dense ms / kernel ms; geomean; columns: sparsity, "
                         "or zero fraction for soft_masked_*):")
            head_cols = cols
            lines.append(f"  {'op':<19} {'provider':<15} {'dtype':<9} {'mode':<8} {'shapes':<9} "
                         + " ".join(f"{c:>6g}" for c in head_cols) + "   others")
            for op, provider, dtype, mode, label, cells in table:
                if op.startswith("soft_masked"):
                    keys = sorted(cells)
                    shown = " ".join(f"{k:g}:{_fmt(cells[k])}" for k in keys)
                    lines.append(f"  {op:<19} {provider:<15} {dtype:<9} {mode:<8} {label:<9} {shown}")
                    continue
                rest = " ".join(f"{k:g}:{_fmt(v)}" for k, v in sorted(cells.items()) if k not in head_cols)
                lines.append(f"  {op:<19} {provider:<15} {dtype:<9} {mode:<8} {label:<9} "
                             + " ".join(f"{_fmt(cells.get(c)):>6}" for c in head_cols) + f"   {rest}")
        lines += bandwidth(rows)
    tune = out_dir / "tune.json"
    if tune.exists():
        try:
            data = json.loads(tune.read_text())
            keys = ", ".join(list(data)[:8]) if isinstance(data, dict) else f"{len(data)} entries"
            lines.append(f"tune: tune.json ({tune.stat().st_size} bytes): {keys}")
        except (OSError, ValueError) as exc:
            lines.append(f"tune: tune.json unreadable: {exc}")
    if exit_code is not None:
        lines.append(f"gpu_check: {'ok' if exit_code == 0 else 'FAILED'} (exit {exit_code}); files in {out_dir}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--exit-code", type=int, help="gpu_check.sh's exit code, for the last line")
    args = parser.parse_args(argv)
    text = summary(args.out_dir, args.exit_code)
    (args.out_dir / "summary.txt").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
