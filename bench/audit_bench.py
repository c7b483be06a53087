"""Measure `cgan audit` on Fashion-MNIST: victims trained on protected / mixed / clean data, exported to TorchScript.

Two phases, so the slow one (training) runs once and the audits can be redone:

    nice -n 10 .venv/bin/python bench/audit_bench.py train   # victims -> runs/audit-bench/models/*.pt
    nice -n 10 .venv/bin/python bench/audit_bench.py audit   # every model -> runs/audit-bench/results.json
    .venv/bin/python bench/audit_bench.py table              # the markdown table in docs/audit.md

Other scales go to their own folder (`--out`), with `--only` picking the models, e.g. the 10% mix and
its clean twin on all 60,000 training images for 10 epochs:

    bench/audit_bench.py train --out runs/audit-bench-60k --limit 60000 --epochs 10 --only mix10-cnn clean-cnn-s0
    bench/audit_bench.py audit --out runs/audit-bench-60k

`train` protects a seeded training subset with the shipped weights/cgan-fashion-mnist-v3.safetensors at
8/255 THROUGH THE ENGINE (`ProtectEngine.protect_batch`, what `cgan protect` runs), trains victims
(`learning.victims.fit_victim`) and saves them with torch.jit.script (torch.jit.trace for ResNet-18).
Architectures: the repo's SmallCNN and ResNet-18 and two that are not in this repo (LeNet: 5x5
convs, average pooling, no BatchNorm; an MLP on the flattened pixels). `audit` writes 2,000 clean
test images as PNG files and runs `cgan audit`'s own function on every saved model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cgan_cli.core.choices import AuditControls  # noqa: E402
from cgan_cli.core.engine import EngineConfig, ProtectEngine  # noqa: E402
from cgan_cli.learning.config import VictimConfig  # noqa: E402
from cgan_cli.learning.countermeasures import parse_countermeasure  # noqa: E402
from cgan_cli.learning.data import load_fashion_mnist  # noqa: E402
from cgan_cli.learning.verify import protect_with_engine, subsample  # noqa: E402
from cgan_cli.learning.victims import fit_victim  # noqa: E402

WEIGHTS = ROOT / "weights" / "cgan-fashion-mnist-v3.safetensors"  # the far-apart generator: the audit has controls for its tiles


class LeNet(nn.Module):
    """Not in this repo: 5x5 convolutions, average pooling, ReLU, no normalisation layers."""

    def __init__(self, channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 5, padding=2), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(16, 32, 5), nn.ReLU(), nn.AvgPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """Not in this repo: two hidden layers on the flattened 28 x 28 image."""

    def __init__(self, channels: int = 1, num_classes: int = 10, side: int = 28) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, 256), nn.ReLU(),
                                 nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AllConv(nn.Module):
    """Not in this repo: strided 3x3 convolutions instead of pooling, BatchNorm, GELU, global average pool."""

    def __init__(self, channels: int = 1, num_classes: int = 10, width: int = 24) -> None:
        super().__init__()
        layers, c_in = [], channels
        for c_out, stride in ((width, 1), (2 * width, 2), (2 * width, 1), (4 * width, 2)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.BatchNorm2d(c_out), nn.GELU()]
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def fresh(arch: str) -> nn.Module | None:
    """None = the repo's own victim (fit_victim builds cfg.arch)."""
    return {"lenet": LeNet, "mlp": MLP, "allconv": AllConv}.get(arch, lambda: None)()


def export(model: nn.Module, arch: str, path: Path) -> None:
    model = model.cpu().eval()
    if arch in ("resnet18", "allconv"):  # traced, to show both exporters work
        scripted = torch.jit.trace(model, torch.rand(2, 1, 28, 28))
    else:
        scripted = torch.jit.script(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(scripted, str(path))


def selected(name: str, args: argparse.Namespace) -> bool:
    """`--only`: a model is trained / audited when its name contains one of the given strings."""
    return not args.only or any(s in name for s in args.only)


def train_phase(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    models = args.out / "models"
    train = subsample(load_fashion_mnist("train"), args.limit, 0)
    test = subsample(load_fashion_mnist("test"), 1000, 1)  # per-epoch accuracy only
    engine = ProtectEngine(EngineConfig(WEIGHTS, "cpu", "fp32", args.epsilon, batch_size=256))
    start = time.perf_counter()
    protected = protect_with_engine(engine, train.pixels)
    print(f"protected {len(train)} images through the engine in {time.perf_counter() - start:.1f}s", flush=True)
    mix = train.pixels.clone()
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(7))[: len(train) // 10]
    mix[chosen] = protected[chosen]
    jpeg75 = parse_countermeasure("jpeg:75").apply
    blur1 = parse_countermeasure("blur:1").apply
    test_x, records = test.floats(), {}
    index_path = models / "index.json"
    if index_path.is_file():
        records = json.loads(index_path.read_text())

    def run(name: str, arch: str, pixels: torch.Tensor, seed: int, epochs: int, n: int | None = None,
            start_from: nn.Module | None = None, lr: float | None = None, test_pixels=None) -> nn.Module:
        if not selected(name, args):
            return None
        if name in records and (models / f"{name}.pt").is_file() and not args.redo:
            print(f"{name}: kept", flush=True)
            return None
        n, lr = n or len(pixels), lr or args.lr
        cfg = VictimConfig(arch=arch if arch in ("cnn", "resnet18") else "cnn", epochs=epochs, batch_size=128, lr=lr,
                           seed=seed, device="cpu")
        t0 = time.perf_counter()
        tx = test_x if test_pixels is None else test_pixels
        model, res = fit_victim(pixels[:n].float().div(255), train.labels[:n], tx, test.labels, 10, cfg,
                                model=start_from if start_from is not None else fresh(arch))
        export(model, arch, models / f"{name}.pt")
        records[name] = {"arch": arch, "train_images": n, "epochs": epochs, "seed": seed, "lr": lr,
                         "clean_test_accuracy": res.test_accuracy, "train_accuracy": res.train_accuracy,
                         "seconds": time.perf_counter() - t0}
        index_path.write_text(json.dumps(records, indent=2) + "\n")
        print(f"{name}: clean test acc {res.test_accuracy:.1%}, train acc {res.train_accuracy:.1%}, "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
        return model

    e = args.epochs
    base = run("protected-cnn", "cnn", protected, 0, e)
    for arch in ("lenet", "mlp"):
        run(f"protected-{arch}", arch, protected, 0, e)
    run("mix10-cnn", "cnn", mix, 0, e)
    for arch in ("cnn", "lenet", "mlp"):
        run(f"clean-{arch}-s0", arch, train.pixels, 0, e)
    # countermeasures: the protected-trained CNN fine-tuned on a JPEG-75 / blurred copy of its data (the
    # victim's preprocessing, so its test images pass through it too)
    for cm_name, cm in (("jpeg75", jpeg75), ("blur1", blur1)):
        if not selected(f"protected-cnn-ft-{cm_name}", args):
            continue
        if base is None:
            base = _unscript_cnn(torch.jit.load(str(models / "protected-cnn.pt")))
        run(f"protected-cnn-ft-{cm_name}", "cnn", cm(protected), 1, args.ft_epochs, start_from=_unscript_cnn(base), lr=0.02,
            test_pixels=cm(test.pixels).float().div(255))
    for seed in range(1, args.clean_seeds):  # cheap clean models for the false-positive rate
        run(f"clean-mlp-s{seed}", "mlp", train.pixels, seed, e)
    run("protected-allconv", "allconv", protected, 0, e)
    run("clean-allconv-s0", "allconv", train.pixels, 0, e)
    for seed in range(1, args.clean_seeds_conv):
        for arch in ("lenet", "allconv", "cnn"):
            run(f"clean-{arch}-s{seed}", arch, train.pixels, seed, e)
    if args.resnet_limit:  # a clean twin at the same scale: does the test flag a ResNet that never saw protected images?
        for name, pixels in (("protected", protected), ("clean", train.pixels)):
            run(f"{name}-resnet18-{args.resnet_limit}x{args.resnet_epochs}", "resnet18", pixels, 0, args.resnet_epochs,
                n=args.resnet_limit)


def _unscript_cnn(scripted: nn.Module) -> nn.Module:
    """A plain SmallCNN holding a (scripted or plain) SmallCNN's weights: a fresh copy to fine-tune."""
    from cgan_cli.learning.nets import SmallCNN

    model = SmallCNN(1, 10)
    model.load_state_dict(scripted.state_dict())
    return model


def write_test_pngs(n: int, folder: Path) -> Path:
    from PIL import Image

    test = subsample(load_fashion_mnist("test"), n, 2)
    if folder.is_dir() and len(list(folder.glob("*.png"))) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(test.pixels):
        Image.fromarray(img[0].numpy()).save(folder / f"test{i:05d}.png")
    return folder


def results_file(args: argparse.Namespace) -> Path:
    """results.json for the CLI's defaults; results-csN.json for N sets, -KIND for --controls KIND, -seedS for --seed S."""
    suffix = ("" if args.control_sets is None else f"-cs{args.control_sets}") + ("" if args.controls is None else f"-{args.controls}")
    suffix += f"-seed{args.seed}" if args.seed else ""
    return args.out / f"results{suffix}.json"


def p_with_sets(result: dict, sets: int) -> float:
    """The p-value the same audit gives with only the first `sets` control sets.

    Exact, not an approximation: control j is drawn by the j-th permutation of the seeded sequence and
    contrasted only within its own set, so a run with fewer sets has exactly these first controls
    and statistics.
    """
    from cgan_cli.learning.audit import rank_sum_p_value

    k = len(result["code_stats"])
    return rank_sum_p_value(result["code_stats"], result["control_stats"][: sets * k])


def audit_phase(args: argparse.Namespace) -> None:
    from cgan_cli.learning.audit import audit
    from cgan_cli.learning.config import AuditConfig

    torch.set_num_threads(args.threads)
    images = write_test_pngs(args.images, args.out / "test-png")
    records = json.loads((args.out / "models" / "index.json").read_text())
    results_path = results_file(args)
    results = json.loads(results_path.read_text()) if results_path.is_file() and not args.redo else {}
    for name, rec in records.items():
        if not selected(name, args):
            continue
        if name in results and not args.redo:
            continue
        extra = {} if args.control_sets is None else {"control_sets": args.control_sets}
        if args.controls is not None:
            extra["controls"] = args.controls
        cfg = AuditConfig(model=args.out / "models" / f"{name}.pt", weights=WEIGHTS, images=images, epsilon=args.epsilon,
                          limit=args.images, seed=args.seed, **extra)
        t0 = time.perf_counter()
        report = audit(cfg)
        seconds = time.perf_counter() - t0
        results[name] = {**rec, "p_value": report["p_value"], "flagged": report["flagged"], "effect": report["effect"],
                         "effect_z": report["effect_z"], "audit_seconds": seconds,
                         "code_ranks": [c["controls_below"] for c in report["codes"]], "controls": report["controls"]["count"],
                         "matched_classes": [c["matched_class"] for c in report["codes"]], "images": report["images"],
                         "code_stats": [c["specific_log_shift"] for c in report["codes"]],
                         "control_stats": report["controls"]["specific_log_shifts"]}
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{name:28s} p={report['p_value']:.2e} effect={report['effect']:+.3f} z={report['effect_z']:+.1f} "
              f"{'FLAGGED' if report['flagged'] else 'not flagged'}  ({seconds:.1f}s)", flush=True)


def table_phase(args: argparse.Namespace) -> None:
    """Markdown rows for docs/audit.md from results.json, and the pooled code ranks of the clean models."""
    results = json.loads(results_file(args).read_text())
    other_path = results_file(argparse.Namespace(**{**vars(args), "controls": "shuffled"}))
    other = json.loads(other_path.read_text()) if args.controls != "shuffled" and other_path.is_file() else {}
    print("| model | trained on | arch | clean test acc. | p-value | flagged at 0.01 | effect | codes beating all controls |"
          " p, 2 control sets |" + (" p, shuffled controls |" if other else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if other else ""))
    for name, r in results.items():
        data = name.split("-")[0] if not name.startswith("protected-cnn-ft") else "protected, then fine-tuned on " + name.rsplit("-", 1)[1]
        best = sum(rank == r.get("controls", 2 * len(r["code_ranks"])) for rank in r["code_ranks"])
        print(f"| {name} | {data} ({r['train_images']} img, {r['epochs']} ep) | {r['arch']} | {r['clean_test_accuracy']:.1%} | "
              f"{r['p_value']:.2g} | {'yes' if r['flagged'] else 'no'} | {r['effect']:+.3f} | {best}/{len(r['code_ranks'])} |"
              f" {p_with_sets(r, 2):.2g} |" + (f" {other[name]['p_value']:.2g} |" if name in other else (" - |" if other else "")))
    clean = {n: r for n, r in results.items() if n.startswith("clean-")}
    if clean:
        ps = sorted(r["p_value"] for r in clean.values())
        print(f"\nclean models: {len(ps)}, flagged at 0.01: {sum(p < 0.01 for p in ps)}; p-values: "
              + ", ".join(f"{p:.2f}" for p in ps))
        ranks = [rank for r in clean.values() for rank in r["code_ranks"]]
        print(f"pooled code ranks among controls (uniform on 0..M under the null): mean {np.mean(ranks):.2f}, "
              f"{len(ranks)} codes; histogram {np.bincount(ranks).tolist()}")


def binomial_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided exact (Clopper-Pearson) upper bound on a rate after k events in n trials."""
    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        cdf = sum(math.comb(n, i) * mid**i * (1 - mid) ** (n - i) for i in range(k + 1))
        lo, hi = (mid, hi) if cdf > 1 - confidence else (lo, mid)
    return hi


def mann_whitney_z(result: dict, sets: int) -> float:
    """The codes' Mann-Whitney U against the first `sets` control sets, standardised by its exact null mean and sd."""
    codes = np.asarray(result["code_stats"])
    controls = np.asarray(result["control_stats"][: sets * len(codes)])
    k, m = len(codes), len(controls)
    u = float((controls[None, :] < codes[:, None]).sum() + 0.5 * (controls[None, :] == codes[:, None]).sum())
    return (u - k * m / 2) / math.sqrt(k * m * (k + m + 1) / 12)


def tail_extrapolation(z: list[float], level: float = 0.01) -> str:
    """The false-positive rate at `level` if clean models' z-scores are normal, from a 95% upper bound on their mean and sd.

    A valid test has z ~ N(0, 1) or below; counting flags at 1% needs hundreds of models, while the
    mean and spread of z are pinned down by dozens. The bound assumes the z-scores' normal shape (the
    exact null of U is close to normal at these sizes), which the pool itself can be checked for.
    """
    z = np.asarray(z, dtype=float)
    n, mean, sd = len(z), float(z.mean()), float(z.std(ddof=1))
    mean_upper = mean + 1.645 * sd / math.sqrt(n)
    chi2_low = (n - 1) * (1 - 2 / (9 * (n - 1)) - 1.645 * math.sqrt(2 / (9 * (n - 1)))) ** 3  # Wilson-Hilferty, 5%
    sd_upper = sd * math.sqrt((n - 1) / chi2_low)
    threshold = 2.326  # one-sided z for p = 0.01

    def tail(m: float, s: float) -> float:
        return 0.5 * math.erfc((threshold - m) / (s * math.sqrt(2)))
    return (f"z of the clean models: mean {mean:+.2f}, sd {sd:.2f} (a valid test: mean <= 0, sd ~1; max {z.max():+.2f}); "
            f"normal tail at p < {level}: {tail(mean, sd):.2%}, with both 95% upper bounds (mean {mean_upper:+.2f}, "
            f"sd {sd_upper:.2f}) {tail(mean_upper, sd_upper):.2%}")


def null_phase(args: argparse.Namespace) -> None:
    """The clean models of every --pool folder: how their p-values compare with the uniform a valid test gives."""
    clean = []
    for folder in args.pool:
        results = json.loads(results_file(argparse.Namespace(**{**vars(args), "out": folder})).read_text())
        clean += [(f"{folder.name}/{n}", r) for n, r in results.items() if n.startswith("clean-")]
    most = min(len(r["control_stats"]) // len(r["code_stats"]) for _, r in clean)
    for sets in sorted({2, 4, most}):
        ps = [(n, p_with_sets(r, sets)) for n, r in clean]
        values = np.array([p for _, p in ps])
        print(f"controls {args.controls or 'default'}, {sets} control sets: {len(values)} clean models")
        for level in (0.01, 0.05, 0.1, 0.2, 0.5):
            k = int((values < level).sum())
            print(f"  p < {level:<4}: {k:3d} ({k / len(values):.1%}; a valid test: at most {level:.0%}); 95% upper bound "
                  f"on the rate {binomial_upper(k, len(values)):.1%}")
        print("  smallest: " + ", ".join(f"{n} {p:.3g}" for n, p in sorted(ps, key=lambda t: t[1])[:5]))
        print("  all: " + tail_extrapolation([mann_whitney_z(r, sets) for _, r in clean]))
        for arch in sorted({r["arch"] for _, r in clean}):
            z = [mann_whitney_z(r, sets) for _, r in clean if r["arch"] == arch]
            if len(z) >= 5:  # fewer: no spread to speak of
                print(f"  {arch} ({len(z)}): " + tail_extrapolation(z))


def unrelated_phase(args: argparse.Namespace) -> None:
    """The flagged protected CNN audited with a generator it never saw (fresh init, tiles scaled to the shipped spread)."""
    from dataclasses import replace

    from cgan_cli.core.weights import load_generator, save_generator
    from cgan_cli.learning.audit import audit
    from cgan_cli.learning.config import AuditConfig

    torch.set_num_threads(args.threads)
    shipped, meta = load_generator(WEIGHTS)
    torch.manual_seed(123)
    fresh_gen = type(shipped)(**meta.arch_params)
    with torch.no_grad():
        fresh_gen.tiles.mul_(shipped.tiles.std() / fresh_gen.tiles.std())
    path = args.out / "unrelated-generator.safetensors"
    save_generator(path, fresh_gen.eval(), replace(meta, recipe={"note": "random init: a generator the victims never saw"}))
    report = audit(AuditConfig(model=args.out / "models" / "protected-cnn.pt", weights=path,
                               images=write_test_pngs(args.images, args.out / "test-png"), limit=args.images))
    (args.out / "unrelated-protected-cnn.json").write_text(json.dumps(report) + "\n")
    print(f"protected-cnn vs an unrelated generator: p={report['p_value']:.2g} effect={report['effect']:+.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["train", "audit", "table", "null", "unrelated"])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "audit-bench", help="models/, results and test PNGs")
    ap.add_argument("--limit", type=int, default=10000, help="training images (seeded subset)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.05, help="one-cycle peak lr of the victims trained from scratch")
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--resnet-limit", type=int, default=0, help="0 = no ResNet-18 victim (too slow for the shared 2-core CPU)")
    ap.add_argument("--resnet-epochs", type=int, default=3)
    ap.add_argument("--clean-seeds", type=int, default=10, help="clean MLPs (seeds 0..N-1)")
    ap.add_argument("--clean-seeds-conv", type=int, default=2, help="clean LeNet / AllConv / SmallCNN seeds")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--images", type=int, default=2000, help="clean test images the audit uses")
    ap.add_argument("--control-sets", type=int, default=None, help="control sets (default: the CLI's; other values go to results-csN.json)")
    ap.add_argument("--controls", choices=[kind.value for kind in AuditControls], default=None, help="control kind (default: the CLI's; others go to results-KIND.json)")
    ap.add_argument("--pool", type=Path, nargs="*", default=[], help="null: the --out folders whose clean models are pooled")
    ap.add_argument("--seed", type=int, default=0, help="audit: the control patterns' draw (non-zero seeds go to results-seedS.json)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=None, help="train / audit only models whose name contains one of these")
    ap.add_argument("--redo", action="store_true")
    args = ap.parse_args()
    {"train": train_phase, "audit": audit_phase, "table": table_phase, "null": null_phase, "unrelated": unrelated_phase}[args.phase](args)


if __name__ == "__main__":
    main()
