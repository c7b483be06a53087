"""`cgan protect` end to end on real files: formats, failures, manifest, resume, kill-and-resume."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    BAD,
    EPSILON,
    GOOD,
    MAKE_TAG,
    ORIENTATION_TAG,
    read_records,
    smooth_rgb,
)
from PIL import Image, ImageOps
from typer.testing import CliRunner

from cgan_cli.cli import app
from cgan_cli.core.engine import TILE, EngineConfig, ProtectEngine, to_float
from cgan_cli.core.formats import EncodeOptions, decode_image
from cgan_cli.core.noise import NoiseAdder
from cgan_cli.protect.manifest import ManifestRecord
from cgan_cli.protect.pipeline import protect_stream
from cgan_cli.protect.sinks import FolderSink
from cgan_cli.protect.sources import Sample

CGAN = Path(sys.executable).with_name("cgan")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _run(*args: str, stdin: str | None = None):
    return CliRunner().invoke(app, ["protect", *args], input=stdin)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img)).astype(np.int64)


def _records(out: Path) -> dict[str, dict]:
    return {r["source"]: r for r in read_records(out / "manifest.jsonl")}


def test_zoo_protects_good_fails_bad_and_never_touches_inputs(tmp_path: Path, zoo: dict[str, Path], rgb_weights: Path) -> None:
    root, out = zoo["exif_jpeg"].parent, tmp_path / "out"
    before = _tree_hashes(root)
    res = _run(str(root), "--out", str(out), "--weights", str(rgb_weights), "--workers", "0", "--json")
    assert res.exit_code == 1, res.output
    assert _tree_hashes(root) == before
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["counts"] == {"protected": len(GOOD), "skipped": 0, "failed": len(BAD), "ignored": 0}
    recs = _records(out)
    assert set(recs) == {str(p) for p in zoo.values()}
    for key in GOOD:
        rec = recs[str(zoo[key])]
        assert rec["status"] == "protected" and rec["error"] is None, rec
        written = out / rec["output"]
        assert rec["sha256_out"] == _sha(written) and rec["bytes_out"] == written.stat().st_size
        assert rec["sha256_in"] == _sha(zoo[key]) and rec["bytes_in"] == zoo[key].stat().st_size
        assert rec["linf"] > 0 and rec["psnr"] > 25 and 0 < rec["seconds"] <= summary["wall_seconds"]
        with Image.open(zoo[key]) as src, Image.open(written) as dst:
            assert ImageOps.exif_transpose(src).size == dst.size and src.format == dst.format
    errors = {key: recs[str(zoo[key])]["error"] for key in BAD}
    assert "CMYK" in errors["cmyk_jpeg"]
    assert "16-bit-per-channel" in errors["rgb48_png"]
    assert "truncated or corrupt" in errors["truncated_png"]
    assert "empty file" in errors["zero_jpeg"]
    assert "not an image" in errors["text_as_png"]
    assert "megapixel" in errors["bomb_png"]
    assert all(recs[str(zoo[k])]["status"] == "failed" and not (out / recs[str(zoo[k])]["output"]).exists() for k in BAD)
    assert "failed" in res.stderr and "CMYK" in res.stderr


def test_modes_alpha_and_exif(tmp_path: Path, zoo: dict[str, Path], rgb_weights: Path) -> None:
    out = tmp_path / "out"
    _run(str(zoo["exif_jpeg"].parent), "--out", str(out), "--weights", str(rgb_weights), "--workers", "0")
    rgba_in, rgba_out = Image.open(zoo["rgba_png"]), Image.open(out / "cutout.png")
    assert rgba_out.mode == "RGBA"
    assert np.array_equal(np.asarray(rgba_out)[..., 3], np.asarray(rgba_in)[..., 3])
    diff = np.abs(np.asarray(rgba_out)[..., :3].astype(int) - np.asarray(rgba_in)[..., :3].astype(int))
    assert 0 < diff.max() <= EPSILON
    assert Image.open(out / "sub" / "gray.png").mode == "L"
    deep_in, deep_out = Image.open(zoo["gray16_png"]), Image.open(out / "sub" / "depth16.png")
    assert deep_out.mode == "I;16"
    assert 0 < np.abs(np.asarray(deep_out).astype(int) - np.asarray(deep_in).astype(int)).max() <= EPSILON * 257
    assert Image.open(out / "palette.png").mode == "RGB"  # a palette cannot carry the noise
    rotated = Image.open(out / "rotated.jpg")
    assert rotated.getexif()[ORIENTATION_TAG] == 1 and rotated.getexif()[MAKE_TAG] == "cgan-test-camera"
    shown = _pixels(zoo["exif_jpeg"])
    assert rotated.size == (shown.shape[1], shown.shape[0])
    assert np.abs(np.asarray(rotated).astype(int) - shown).mean() < 6  # noise on the displayed image, not a rotated copy
    big = Image.open(out / "sub" / "large.jpg")
    assert big.size == (900, 600) and big.quantization == Image.open(zoo["large_jpeg"]).quantization


def test_linf_within_epsilon_on_written_png(tmp_path: Path, rgb_weights: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for i, (h, w) in enumerate([(30, 30), (70, 45), (120, 200)]):
        Image.fromarray(smooth_rgb(h, w, i)).save(src / f"{i}.png")
    out = tmp_path / "out"
    res = _run(str(src), "--out", str(out), "--weights", str(rgb_weights), "--epsilon", "4", "--workers", "0", "--batch-size", "2")
    assert res.exit_code == 0, res.output
    for i in range(3):
        diff = np.abs(_pixels(out / f"{i}.png") - _pixels(src / f"{i}.png"))
        assert 0 < diff.max() <= 4
        assert _records(out)[str(src / f"{i}.png")]["linf"] == diff.max()


def test_engine_channels_full_res_and_exact_bound(rgb_weights: Path, gray_weights: Path) -> None:
    rgb, gray = smooth_rgb(40, 50), smooth_rgb(40, 50, 1)[..., :1]
    for weights in (rgb_weights, gray_weights):
        engine = ProtectEngine(EngineConfig(weights, device="cpu", epsilon=5.0, batch_size=2))
        for img, out in zip([rgb, gray], engine.protect_batch([rgb, gray])):
            assert out.shape == img.shape and out.dtype == np.uint8
            assert 0 < np.abs(out.astype(int) - img.astype(int)).max() <= 5
    tall = smooth_rgb(TILE + 100, 90, 2)
    tiled = ProtectEngine(EngineConfig(rgb_weights, device="cpu", full_res=True, batch_size=4)).protect_batch([tall])[0]
    assert tiled.shape == tall.shape and 0 < np.abs(tiled.astype(int) - tall.astype(int)).max() <= EPSILON


def test_cpu_fixed_point_path_matches_float_path_within_one_level(rgb_weights: Path) -> None:
    """The 8-bit CPU path rounds the noise before upsampling it; on a real photo with saturated
    pixels it must stay inside the budget and within one level of the full-size float path."""
    with Image.open(Path(__file__).parents[1] / "examples" / "photos" / "coffee.jpg") as img:
        photo = np.asarray(img.convert("RGB")).copy()
    photo[:40] = 255
    photo[-40:] = 0  # clipping at both ends of the range
    engine = ProtectEngine(EngineConfig(rgb_weights, device="cpu", epsilon=6.0))
    add_noise = NoiseAdder(6.0, torch.device("cpu"))
    with torch.inference_mode():
        noise = engine.generate(to_float(photo, engine.device, engine.working_shape(*photo.shape[:2])))
        fixed = add_noise.fixed_point(photo, noise, 6).astype(int)
        floating = add_noise.full_float(photo, noise, 255, 6).astype(int)
    assert np.array_equal(engine.protect_batch([photo])[0], fixed)  # the engine takes the fixed-point path here
    assert fixed.shape == photo.shape
    assert np.abs(fixed - photo).max() == 6 and np.abs(floating - photo).max() == 6
    assert np.abs(fixed - floating).max() <= 1
    assert (fixed == floating).mean() > 0.5
    assert fixed[:40].min() >= 249 and fixed[-40:].max() <= 6  # saturated pixels clip, never wrap around
    big = ProtectEngine(EngineConfig(rgb_weights, device="cpu", epsilon=200.0)).protect_batch([photo])[0]  # > 127 levels: float path
    assert 0 < np.abs(big.astype(int) - photo).max() <= 200


def test_measure_written_records_what_the_lossy_file_holds(tmp_path: Path, rgb_weights: Path) -> None:
    src, out_fast, out_measured = tmp_path / "in", tmp_path / "fast", tmp_path / "measured"
    src.mkdir()
    Image.fromarray(smooth_rgb(90, 120, 3)).save(src / "a.jpg", quality=85)
    Image.fromarray(smooth_rgb(60, 80, 4)).save(src / "b.png")
    common = ("--weights", str(rgb_weights), "--workers", "0")
    assert _run(str(src), "--out", str(out_fast), *common).exit_code == 0
    res = _run(str(src), "--out", str(out_measured), *common, "--measure-written")
    assert res.exit_code == 0, res.output
    fast, measured = _records(out_fast), _records(out_measured)
    for name in ("a.jpg", "b.png"):
        key = str(src / name)
        assert fast[key]["written_linf"] is None and fast[key]["written_psnr"] is None
        assert fast[key]["linf"] == measured[key]["linf"] <= EPSILON
        written = np.abs(_pixels(out_measured / name) - _pixels(src / name)).max()
        assert measured[key]["written_linf"] == written
    png, jpg = measured[str(src / "b.png")], measured[str(src / "a.jpg")]
    assert png["written_linf"] == png["linf"] and png["written_psnr"] == png["psnr"]  # lossless: the same pixels
    assert jpg["written_psnr"] != jpg["psnr"]  # the JPEG re-encode changes the pixels again (it may even smooth noise away)


def test_out_inside_input_and_missing_default_weights_refused(tmp_path: Path, rgb_weights: Path, monkeypatch) -> None:
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(smooth_rgb(8, 8)).save(src / "a.png")
    for out in (src, src / "protected"):
        res = _run(str(src), "--out", str(out), "--weights", str(rgb_weights))
        assert res.exit_code == 2 and "inside input folder" in res.stderr
    res = _run(str(src), "--out", str(tmp_path), "--weights", str(rgb_weights))
    assert res.exit_code == 2 and "lies inside --out" in res.stderr
    assert sorted(p.name for p in src.iterdir()) == ["a.png"]
    monkeypatch.setattr("cgan_cli.protect.config.default_weights", lambda: None)
    res = _run(str(src), "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "--weights" in res.stderr and "cgan train" in res.stderr
    assert not (tmp_path / "o").exists()
    for bad, message in ((["--format", "gif"], "'gif' is not one of"), (["--epsilon", "0.5"], "--epsilon 0.5"),
                         (["--device", "tpu"], "--device tpu"), (["--device", "cpu", "--precision", "bf16"], "needs a CUDA device")):
        res = _run(str(src), "--out", str(tmp_path / "o"), "--weights", str(rgb_weights), *bad)
        assert res.exit_code == 2 and message in res.stderr, res.stderr
    assert not (tmp_path / "o").exists()


def test_stdin_paths_dry_run_and_format(tmp_path: Path, rgb_weights: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.fromarray(smooth_rgb(12, 12)).save(tmp_path / "a" / "b" / "x.png")
    Image.fromarray(smooth_rgb(12, 12, 1)).save(tmp_path / "a" / "y.jpg")
    listing = "./a/b/x.png\n\na/y.jpg\n"
    dry = _run("-", "--out", "out", "--weights", str(rgb_weights), "--dry-run", stdin=listing)
    assert dry.exit_code == 0 and dry.stdout.count("protect\t") == 2
    assert not (tmp_path / "out").exists()
    res = _run("-", "--out", "out", "--weights", str(rgb_weights), "--workers", "0", "--format", "webp", stdin=listing)
    assert res.exit_code == 0, res.output
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.webp")) == ["a/b/x.webp", "a/y.webp"]
    assert decode_image((tmp_path / "out" / "a" / "y.webp").read_bytes()).webp_lossless
    inside = _run("-", "--out", "out", "--weights", str(rgb_weights), "--workers", "0", stdin="out/a/y.webp\n")
    ignored = _records(tmp_path / "out")["out/a/y.webp"]
    assert inside.exit_code == 0 and ignored["status"] == "ignored" and "inside --out" in ignored["error"]


def test_resume_skips_done_and_redoes_changed(tmp_path: Path, rgb_weights: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        Image.fromarray(smooth_rgb(16, 16, i)).save(src / f"{i}.png")
    args = (str(src), "--out", str(out), "--weights", str(rgb_weights), "--workers", "0", "--json")
    assert _run(*args).exit_code == 0
    first = _tree_hashes(out)
    Image.fromarray(smooth_rgb(16, 16, 9)).save(src / "1.png")
    res = _run(*args)
    assert res.exit_code == 0
    assert json.loads(res.stdout)["counts"] == {"protected": 1, "skipped": 2, "failed": 0, "ignored": 0}
    last = _records(out)
    assert last[str(src / "0.png")]["status"] == "skipped" and last[str(src / "1.png")]["status"] == "protected"
    assert _tree_hashes(out)["0.png"] == first["0.png"] and _tree_hashes(out)["1.png"] != first["1.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["weights"]["sha256"] == _sha(rgb_weights) and summary["weights"]["metadata"]["working_size"] == 32
    assert summary["epsilon"] == EPSILON and summary["device"] == "cpu" and summary["precision"] == "fp32"
    assert summary["total"] == 3 and summary["wall_seconds"] > 0 and summary["cgan_version"]
    other = _run(*args, "--epsilon", "4")  # other settings: nothing may be reused
    assert json.loads(other.stdout)["counts"] == {"protected": 3, "skipped": 0, "failed": 0, "ignored": 0}


class ListSink:
    """An ordered in-memory sink, the way a tar-shard sink consumes the pipeline."""

    ordered = True

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []

    def write(self, sample: Sample, payload: bytes) -> str:
        self.items.append((sample.rel_out, payload))
        return sample.rel_out

    def exists(self, rel_out: str) -> bool:
        return False

    def close(self) -> None:
        pass


def test_ordered_sink_gets_input_order_with_mixed_shapes_and_passthrough(rgb_weights: Path) -> None:
    import io

    samples = []
    for i in range(11):
        buf = io.BytesIO()
        Image.fromarray(smooth_rgb(20 + 37 * (i % 3), 40, i)).save(buf, "PNG")
        samples.append(Sample(id=f"s.tar/{i:03d}.png", rel_out=f"{i:03d}.png", data=buf.getvalue()))
        samples.append(Sample(id=f"s.tar/{i:03d}.cls", rel_out=f"{i:03d}.cls", data=str(i).encode(), passthrough=True))
    sink, records = ListSink(), []
    engine = ProtectEngine(EngineConfig(rgb_weights, device="cpu", batch_size=2))
    protect_stream(samples, sink, engine, EncodeOptions(), records.append, workers=2)
    assert [name for name, _ in sink.items] == [s.rel_out for s in samples]
    assert [r.source for r in records] == [s.id for s in samples]
    assert all(isinstance(r, ManifestRecord) for r in records)
    assert {r.status for r in records if r.source.endswith(".cls")} == {"skipped"}
    assert sink.items[1][1] == b"0"


@pytest.mark.slow
def test_sigkill_leaves_no_truncated_output_and_rerun_resumes(tmp_path: Path, rgb_weights: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    n = 240
    for i in range(n):
        Image.fromarray(smooth_rgb(48, 48, i)).save(src / f"{i:04d}.png", compress_level=1)
    cmd = [str(CGAN), "protect", str(src), "--out", str(out), "--weights", str(rgb_weights), "--workers", "1", "--batch-size", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    manifest = out / "manifest.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if manifest.is_file() and manifest.read_bytes().count(b"\n") >= 10:
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(read_records(manifest))
    assert 10 <= done_before < n, "the run should have been killed mid-way"
    for path in out.glob("*.png"):  # every file under a final name is complete
        assert decode_image(path.read_bytes()).pixels.shape == (48, 48, 3)
    rerun = subprocess.run([*cmd[:-2], "--json"], capture_output=True, text=True, timeout=300)  # default batch size
    assert rerun.returncode == 0, rerun.stderr
    counts = json.loads(rerun.stdout)["counts"]
    assert counts["failed"] == 0 and counts["skipped"] >= done_before and counts["protected"] + counts["skipped"] == n
    assert len(list(out.glob("*.png"))) == n and not list(out.glob(".*.cgan.tmp"))


@dataclass(frozen=True)
class CrashingSample(Sample):
    """A sample whose read kills the decode worker, as a native decoder crash on a hostile file would."""

    def read(self) -> bytes:
        os._exit(3)


def test_decoder_crash_fails_one_file_and_the_batch_goes_on(tmp_path: Path, rgb_weights: Path) -> None:
    import io

    def png(seed: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(smooth_rgb(16, 16, seed)).save(buf, "PNG")
        return buf.getvalue()

    samples = [Sample(id=f"{i}.png", rel_out=f"{i}.png", data=png(i)) for i in range(6)]
    samples.insert(3, CrashingSample(id="crash.png", rel_out="crash.png", data=b"x"))
    sink, records = ListSink(), []
    engine = ProtectEngine(EngineConfig(rgb_weights, device="cpu", batch_size=2))
    protect_stream(samples, sink, engine, EncodeOptions(), records.append, workers=1)
    assert [r.source for r in records] == [s.id for s in samples]
    status = {r.source: (r.status, r.error) for r in records}
    assert status["crash.png"][0] == "failed" and "decoder process crashed" in status["crash.png"][1]
    assert all(status[f"{i}.png"][0] == "protected" for i in range(6))


def test_folder_mode_under_torchrun_is_refused(tmp_path: Path, rgb_weights: Path, monkeypatch) -> None:
    """Only shards are split across ranks; a folder under torchrun would be protected once per rank."""
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(smooth_rgb(8, 8)).save(src / "a.png")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = _run(str(src), "--out", str(tmp_path / "o"), "--weights", str(rgb_weights))
    assert res.exit_code == 2 and "torchrun" in res.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_engine_placement_does_not_change_outputs(tmp_path: Path, rgb_weights: Path) -> None:
    """CPU workers that each run the generator, everything in one process, and the GPU layout (decode
    workers -> one engine in the main process -> encode threads, run here on the CPU) must write the
    same files and the same manifest, for a folder sink (written in the workers) and an ordered sink."""
    photos = Path(__file__).resolve().parent.parent / "examples" / "photos"
    samples = [Sample(id=p.name, rel_out=p.name, path=p) for p in sorted(photos.iterdir()) if p.suffix != ".md"]
    engine = ProtectEngine(EngineConfig(rgb_weights, device="cpu", batch_size=2))
    layouts = {"in workers": dict(workers=2), "one process": dict(workers=0), "main engine": dict(workers=2, engine_in_workers=False)}
    folders, ordered = {}, {}
    for name, kwargs in layouts.items():
        records: list[ManifestRecord] = []
        protect_stream(samples, FolderSink(tmp_path / name), engine, EncodeOptions(), records.append, **kwargs)
        assert [r.status for r in records] == ["protected"] * len(samples), [r.error for r in records]
        folders[name] = ([(r.source, r.output, r.sha256_out, r.linf, r.psnr) for r in records], _tree_hashes(tmp_path / name))
        sink = ListSink()
        protect_stream(samples, sink, engine, EncodeOptions(), lambda rec: None, **kwargs)
        ordered[name] = sink.items
    assert len(folders["in workers"][1]) == len(samples)
    assert folders["in workers"] == folders["one process"] == folders["main engine"]
    assert ordered["in workers"] == ordered["one process"] == ordered["main engine"]
    assert {name: hashlib.sha256(payload).hexdigest() for name, payload in ordered["in workers"]} == folders["in workers"][1]


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for children in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
            kids = [int(c) for c in children.read_text().split()]
            found += kids
            todo += kids
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone
    except OSError:
        return False


@pytest.mark.slow
def test_workers_exit_when_the_main_process_is_killed(tmp_path: Path, rgb_weights: Path) -> None:
    """SIGKILL of `cgan protect` alone (no process group kill) must not leave its workers running."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(400):
        Image.fromarray(smooth_rgb(64, 64, i)).save(src / f"{i:04d}.png", compress_level=1)
    out = tmp_path / "out"
    cmd = [str(CGAN), "protect", str(src), "--out", str(out), "--weights", str(rgb_weights), "--workers", "2", "--batch-size", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "manifest.jsonl").is_file() and (out / "manifest.jsonl").read_bytes().count(b"\n") >= 5):
        time.sleep(0.01)
    helpers = _descendants(proc.pid)
    proc.kill()
    proc.wait()
    assert len(helpers) >= 3, helpers  # fork server + 2 workers (+ resource tracker)
    deadline = time.time() + 15
    while time.time() < deadline and any(_running(p) for p in helpers):
        time.sleep(0.1)
    assert not [p for p in helpers if _running(p)], "worker processes outlived the killed main process"


def test_in_memory_inputs_in_flight_are_bounded_by_bytes(rgb_weights: Path, monkeypatch) -> None:
    """Tar members travel as bytes: the pipeline pulls the next one only when those in flight hold
    under HELD_BYTES (here 1 byte: one member at a time), and still emits everything in order."""
    import io

    monkeypatch.setattr("cgan_cli.protect.pipeline.HELD_BYTES", 1)
    emitted: list[str] = []
    ahead: list[int] = []

    def samples():
        for i in range(6):
            ahead.append(i - len(emitted))  # members pulled but not yet emitted, before pulling this one
            buf = io.BytesIO()
            Image.fromarray(smooth_rgb(24, 24, i)).save(buf, "PNG")
            yield Sample(id=f"t.tar/{i}.png", rel_out=f"{i}.png", data=buf.getvalue())

    sink = ListSink()
    engine = ProtectEngine(EngineConfig(rgb_weights, device="cpu", batch_size=4))
    protect_stream(samples(), sink, engine, EncodeOptions(), lambda rec: emitted.append(rec.source), workers=2)
    assert emitted == [f"t.tar/{i}.png" for i in range(6)] and len(sink.items) == 6
    assert max(ahead) == 0, ahead


def test_upscaled_image_keeps_its_noise_after_a_scraper_downsizes_it(tmp_path: Path) -> None:
    """The photo path: a 28 px Fashion-MNIST image upscaled to 112 px and protected there by `cgan
    protect`, then area-downsized to 28 px as a scraper's loader would, must still carry the noise the
    generator gives the 28 px original. The engine makes the noise on the generator's own 28 px grid;
    on any other grid (it used to round 28 to 32) its period-2 patterns average away (correlation 0.08)."""
    from cgan_cli.core.shipped import shipped_weights_dir
    from cgan_cli.learning.data import load_fashion_mnist

    weights = shipped_weights_dir() / "cgan-fashion-mnist.safetensors"
    small_dir, big_dir = tmp_path / "small", tmp_path / "big"
    small_dir.mkdir(), big_dir.mkdir()
    for i, pixels in enumerate(load_fashion_mnist("test").pixels[:64]):
        img = Image.fromarray(pixels[0].numpy(), "L")
        img.save(small_dir / f"{i:03d}.png")
        img.resize((112, 112), Image.Resampling.BICUBIC).save(big_dir / f"{i:03d}.png")
    for src in (small_dir, big_dir):
        assert _run(str(src), "--out", str(tmp_path / f"{src.name}-out"), "--weights", str(weights), "--workers", "0").exit_code == 0

    def pixels(folder: Path, downsize: bool = False) -> np.ndarray:
        out = []
        for f in sorted(folder.glob("*.png")):
            x = torch.from_numpy(np.asarray(Image.open(f), dtype=np.float32))[None, None]
            out.append((torch.nn.functional.interpolate(x, size=(28, 28), mode="area") if downsize else x).round().numpy())
        return np.concatenate(out)

    written = pixels(tmp_path / "small-out") - pixels(small_dir)
    after_path = pixels(tmp_path / "big-out", downsize=True) - pixels(big_dir, downsize=True)
    assert np.abs(written).max() == 8
    correlation = np.corrcoef(written.ravel(), after_path.ravel())[0, 1]
    assert correlation > 0.7, correlation
