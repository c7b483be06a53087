"""Regenerate the unlearnability table in docs/results.md: method x victim x countermeasure.

Runs `cgan verify` (through its Python API, same code path) on Fashion-MNIST at a stated scale,
saves the full JSON report under docs/verify/<tag>.json, then rebuilds the table section of
docs/results.md from *every* docs/verify/*.json, so expensive runs (e.g. ResNet-18) can be recorded
once and kept. Also times protecting the training set with the generator architecture: with the
trained weights when they exist, otherwise with an untrained generator of the same architecture
(speed only, marked as such; its rows are not in the accuracy table).

    .venv/bin/python bench/verify_table.py                      # CNN, all countermeasures, baselines
    .venv/bin/python bench/verify_table.py --tag resnet18 --arch resnet18 --epochs 3 --countermeasure none
    .venv/bin/python bench/verify_table.py --tag generator --baseline none   # once the weights exist
    .venv/bin/python bench/verify_table.py --table-only         # rebuild docs/results.md from the JSONs
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cgan_cli.core.engine import EngineConfig, ProtectEngine  # noqa: E402
from cgan_cli.core.generators import ConfounderGenerator  # noqa: E402
from cgan_cli.core.weights import WeightsMeta, save_generator  # noqa: E402
from cgan_cli.learning.config import (  # noqa: E402
    EMConfig,  # noqa: E402
    VerifyConfig,
    VerifyRequest,
    VictimConfig,  # noqa: E402
)
from cgan_cli.learning.data import load_fashion_mnist  # noqa: E402
from cgan_cli.learning.verify import protect_with_engine, subsample, verify  # noqa: E402

DOCS = ROOT / "docs"
REPORTS = DOCS / "verify"
RESULTS = DOCS / "results.md"
FM_WEIGHTS = ROOT / "weights" / "cgan-fashion-mnist.safetensors"
START, END = "<!-- verify-table:start (bench/verify_table.py writes this section) -->", "<!-- verify-table:end -->"
DEFAULT_CMS = ["none", "jpeg:50", "blur:1", "rescale:2", "strong-aug", "adv:4"]


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    weights = FM_WEIGHTS if FM_WEIGHTS.is_file() and not args.no_weights else None
    victim = VictimConfig(epochs=args.epochs, batch_size=128, lr=0.1, augment=True, seed=args.seed, device="cpu")
    epsilon = args.epsilon if args.epsilon is not None or weights else 16.0  # None: the weights' own budget
    req = VerifyRequest(
        data="fashion-mnist", weights=weights, epsilon=epsilon, baselines=args.baseline, limit=args.limit,
        test_limit=args.test_limit, report=REPORTS / f"{args.tag}.json", em=EMConfig(max_rounds=args.em_max_rounds),
        cfg=VerifyConfig(victim, args.arch, args.countermeasure),
    )
    rows, report, path, plot = verify(req)
    report["command"] = " ".join(["bench/verify_table.py", *sys.argv[1:]])
    report["generator_speed"] = None if weights else time_untrained_generator(args.limit, args.seed, report["config"]["epsilon"])
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path} and {plot} ({len(rows)} rows, {report['seconds'] / 60:.1f} min)")


def time_untrained_generator(limit: int | None, seed: int, epsilon: float) -> dict:
    """Seconds to protect the same training set with the default generator architecture (speed only)."""
    train = subsample(load_fashion_mnist("train"), limit, seed)
    torch.manual_seed(seed)
    gen = ConfounderGenerator(channels=1).eval()
    meta = WeightsMeta(gen.arch, gen.arch_params(), epsilon, 28, 1, 10)
    with tempfile.TemporaryDirectory() as tmp:
        save_generator(Path(tmp) / "untrained.safetensors", gen, meta)
        engine = ProtectEngine(EngineConfig(Path(tmp) / "untrained.safetensors", "cpu", "fp32", epsilon, batch_size=256))
        start = time.perf_counter()
        protect_with_engine(engine, train.pixels)
    return {"images": len(train), "seconds": time.perf_counter() - start, "arch_params": gen.arch_params(),
            "note": "untrained weights of the default architecture: timing only"}


def shown_path(path: str) -> str:
    """A weights path as a reader can rerun it: repo-relative, else its file name under runs/."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else f"runs/{resolved.name}"


def fmt_pct(x: float) -> str:
    return f"{100 * x:.1f}%"


METHOD_ORDER = ["generator", "em", "classwise", "random", "protected"]


def render(reports: list[dict]) -> str:
    """Markdown for every recorded run: accuracies, protection seconds, victim cost, commands."""
    rows = [(rep, r) for rep in reports for r in rep["rows"]]
    cm_order = list(dict.fromkeys(r["countermeasure"] for _, r in rows))
    rows.sort(key=lambda pair: (pair[1]["arch"], cm_order.index(pair[1]["countermeasure"]),
                                -pair[0]["config"]["epsilon"], METHOD_ORDER.index(pair[1]["method"])))
    lines = [START, "", "### Victims trained on protected data, tested on clean data", "",
             "| method | epsilon | victim | countermeasure | clean-trained | protected-trained | drop | chance | train images | epochs | run |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for rep, r in rows:
        lines.append(f"| {r['method']} | {rep['config']['epsilon']:g}/255 | {r['arch']} | {r['countermeasure']} | "
                     f"{fmt_pct(r['clean_trained_accuracy'])} | {fmt_pct(r['protected_trained_accuracy'])} | "
                     f"{100 * r['drop']:+.1f} pt | {fmt_pct(r['chance'])} | {rep['data']['train']['images']} | "
                     f"{rep['config']['victim']['epochs']} | {rep['tag']} |")
    lines += ["", "### Seconds to protect the training set (same images)", "",
              "| method | images | seconds | images / s | notes | run |", "|---|---:|---:|---:|---|---|"]
    trained = any(rep["weights"] for rep in reports)
    for rep in reports:
        for m in rep["methods"]:
            notes = f"L-inf {m['measured_linf']}/255"
            if m["method"] == "em":
                notes += f"; {m['rounds']} rounds, surrogate error {m['surrogate_error']:.3f}" + ("" if m["stopped"] else " (cap hit)")
            lines.append(f"| {m['method']} | {m['images']} | {m['seconds_to_protect']:.1f} | "
                         f"{m['images'] / max(m['seconds_to_protect'], 1e-9):,.0f} | {notes} | {rep['tag']} |")
        speed = rep.get("generator_speed")
        if speed and not trained:
            lines.append(f"| generator architecture (untrained, speed only) | {speed['images']} | {speed['seconds']:.1f} | "
                         f"{speed['images'] / speed['seconds']:,.0f} | no trained weights yet | {rep['tag']} |")
    lines += ["", "### Victim training cost on this CPU (1 torch thread, cores shared with other jobs)", "",
              "| victim | countermeasure | seconds per epoch (measured, incl. test pass) | minutes per epoch, scaled to 60,000 images | run |",
              "|---|---|---:|---:|---|"]
    seen = set()
    for rep, r in rows:
        if (r["arch"], r["countermeasure"]) in seen:
            continue
        seen.add((r["arch"], r["countermeasure"]))
        n, per_epoch = rep["data"]["train"]["images"], r["clean_trained_seconds"] / rep["config"]["victim"]["epochs"]
        lines.append(f"| {r['arch']} | {r['countermeasure']} | {per_epoch:.1f} | {per_epoch * 60000 / n / 60:.1f} | {rep['tag']} |")
    lines += ["", "Runs (exact commands and machines):", ""]
    for rep in reports:
        mach, w = rep["machine"], rep["weights"]
        weights = f"`{shown_path(w['path'])}` sha256 `{w['sha256'][:16]}…`" if w else "none (baselines only)"
        lines.append(f"- `{rep['tag']}`: `{rep['command']}` — cgan {rep['cgan_version']}, torch {rep['torch_version']}, "
                     f"{mach['processor']}, {mach['cpu_count']} cores, {mach['torch_threads']} torch thread(s), "
                     f"{rep['created']}, {rep['seconds'] / 60:.1f} min total; seed {rep['seed']}, epsilon {rep['config']['epsilon']:g}/255, "
                     f"test images {rep['data']['test']['images']}; weights: {weights}")
    return "\n".join(lines + ["", END])


def write_table() -> None:
    reports = []
    for path in sorted(REPORTS.glob("*.json")):
        rep = json.loads(path.read_text())
        rep["tag"] = path.stem
        reports.append(rep)
    text = RESULTS.read_text() if RESULTS.is_file() else "# Results\n\n" + START + "\n" + END + "\n"
    if START not in text:
        text += "\n" + START + "\n" + END + "\n"
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: render(reports), text, flags=re.S)
    RESULTS.write_text(text)
    print(f"updated {RESULTS} from {len(reports)} report(s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", default="cnn", help="name of this run's JSON in docs/verify/")
    p.add_argument("--arch", action="append", help="victim arch(s); default cnn")
    p.add_argument("--countermeasure", action="append", help=f"default: {' '.join(DEFAULT_CMS)}")
    p.add_argument("--baseline", action="append", help="default: random classwise em; 'none' for the generator alone")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--epsilon", type=float, help="/255; default: the weights' own budget, or 16 without weights")
    p.add_argument("--limit", type=int, default=2000, help="training images (seeded subset of the 60k)")
    p.add_argument("--test-limit", type=int, default=2000, help="clean test images (seeded subset of the 10k)")
    p.add_argument("--em-max-rounds", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-weights", action="store_true", help="ignore weights/cgan-fashion-mnist.safetensors")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    args.arch = args.arch or ["cnn"]
    args.countermeasure = args.countermeasure or DEFAULT_CMS
    args.baseline = [b for b in args.baseline or ["random", "classwise", "em"] if b != "none"]
    if not args.table_only:
        run(args)
    write_table()


if __name__ == "__main__":
    main()
