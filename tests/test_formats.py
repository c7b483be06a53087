"""The formats people have, animations, and a record for every file of a folder, on real files.

Every file is written at test time with Pillow (and pillow-heif for HEIC) in its real format; one
`cgan protect` run over the folder is shared by the tests that read its outputs.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import EPSILON, MAKE_TAG, read_records, smooth_rgb
from PIL import Image
from typer.testing import CliRunner

from cgan_cli.cli import app
from cgan_cli.core.formats import SNIFF_BYTES, decode_image, fidelity, sniff_format

FRAMES = 3
ICO_SIZES = [(16, 16), (32, 32), (48, 48)]
DURATIONS = [40, 70, 100]
LOSSY = {"heic": 30.0, "avif": 30.0, "webp_lossy_anim": 30.0, "no_suffix_jpeg": 30.0}  # minimum PSNR (dB) of each frame vs its source


def _exif_with_make(make: str) -> bytes:
    exif = Image.Exif()
    exif[MAKE_TAG] = make
    return exif.tobytes()


def _frames(height: int = 40, width: int = 56) -> list[Image.Image]:
    return [Image.fromarray(smooth_rgb(height, width, seed)) for seed in range(FRAMES)]


def write_format_folder(root: Path) -> dict[str, Path]:
    """One file per format and animation kind, plus files that are no inputs."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    root.mkdir(parents=True)
    photo = Image.fromarray(smooth_rgb(48, 64, 7))
    files = {
        "heic": root / "iphone.heic", "avif": root / "photo.avif", "jp2": root / "scan.jp2", "j2k": root / "scan.j2k",
        "tga": root / "sprite.tga", "ppm": root / "frame.ppm", "pgm": root / "frame.pgm", "qoi": root / "shot.qoi",
        "apng": root / "anim.png", "webp_anim": root / "anim.webp", "webp_lossy_anim": root / "lossy_anim.webp",
        "tiff_pages": root / "pages.tiff", "fax_tiff": root / "fax.tif", "no_suffix_jpeg": root / "IMG_0001",
    }
    photo.save(files["heic"], "HEIF", quality=90, exif=_exif_with_make("cgan-test-phone"))
    photo.save(files["avif"], "AVIF", quality=90, exif=_exif_with_make("cgan-test-camera"))
    photo.save(files["jp2"], "JPEG2000")
    photo.save(files["j2k"], "JPEG2000", no_jp2=True)
    Image.fromarray(np.dstack([smooth_rgb(30, 40, 8), np.full((30, 40), 180, np.uint8)])).save(files["tga"], "TGA", compression="tga_rle")
    photo.save(files["ppm"], "PPM")
    photo.convert("L").save(files["pgm"], "PPM")
    photo.save(files["qoi"], "QOI")
    files["ico"] = root / "app.ico"
    Image.fromarray(np.dstack([smooth_rgb(48, 48, 10), np.full((48, 48), 200, np.uint8)])).save(files["ico"], "ICO", sizes=ICO_SIZES)
    frames = _frames()
    frames[0].save(files["apng"], "PNG", save_all=True, append_images=frames[1:], duration=DURATIONS, loop=2)
    frames[0].save(files["webp_anim"], "WEBP", save_all=True, append_images=frames[1:], duration=DURATIONS, loop=0, lossless=True)
    frames[0].save(files["webp_lossy_anim"], "WEBP", save_all=True, append_images=frames[1:], duration=DURATIONS, quality=90)
    frames[0].save(files["tiff_pages"], "TIFF", save_all=True, append_images=frames[1:], compression="tiff_deflate")
    Image.fromarray((smooth_rgb(32, 48, 9)[..., 0] > 128).astype(np.uint8) * 255).convert("1").save(
        files["fax_tiff"], "TIFF", compression="group4")
    photo.save(files["no_suffix_jpeg"], "JPEG", quality=90)
    files["text"] = root / "notes.txt"
    files["text"].write_text("not a picture\n")
    files["data"] = root / "blob.dat"
    files["data"].write_bytes(bytes(range(256)) * 4)
    files["hidden"] = root / ".thumb.jpg"
    photo.save(files["hidden"], "JPEG")
    return files


IGNORED = {"text": "not an image", "data": "not an image", "hidden": "hidden file"}
SAME_FORMAT = {"heic": "HEIF", "avif": "AVIF", "jp2": "JPEG2000", "j2k": "JPEG2000", "tga": "TGA", "ppm": "PPM", "pgm": "PPM",
               "qoi": "QOI", "ico": "ICO", "apng": "PNG", "webp_anim": "WEBP", "webp_lossy_anim": "WEBP", "tiff_pages": "TIFF",
               "fax_tiff": "TIFF", "no_suffix_jpeg": "JPEG"}


@dataclass
class FormatRun:
    files: dict[str, Path]
    out: Path
    exit_code: int
    stderr: str
    summary: dict
    records: dict[str, dict]


def _run(*args: str):
    return CliRunner().invoke(app, ["protect", *args])


@pytest.fixture(scope="session")
def format_run(tmp_path_factory, rgb_weights: Path) -> FormatRun:
    base = tmp_path_factory.mktemp("formats")
    files = write_format_folder(base / "in")
    out = base / "out"
    res = _run(str(base / "in"), "--out", str(out), "--weights", str(rgb_weights), "--workers", "0")
    recs = {r["source"]: r for r in read_records(out / "manifest.jsonl")}
    summary = json.loads((out / "summary.json").read_text())
    return FormatRun(files, out, res.exit_code, res.stderr, summary, {k: recs.get(str(p), {}) for k, p in files.items()})


def _all_frames(path: Path) -> tuple[str, list[np.ndarray], list]:
    """The format, every frame as displayed (int64), and the frame durations, as Pillow reads them."""
    with Image.open(path) as img:
        fmt, frames, durations = img.format, [], []
        count = getattr(img, "n_frames", 1) if img.format != "PSD" else 1  # a PSD's "frames" are its layers
        for index in range(count):
            if count > 1:
                img.seek(index)
            mode = "L" if img.mode in ("1", "L") else "RGBA" if "A" in img.mode else "RGB"
            frames.append(np.asarray(img.convert(mode)).astype(np.int64))
            durations.append(img.info.get("duration"))
    return fmt, frames, durations


def test_every_file_in_the_folder_has_a_record_and_non_images_are_ignored(format_run: FormatRun) -> None:
    assert format_run.exit_code == 0, format_run.stderr
    missing = [key for key, rec in format_run.records.items() if not rec]
    assert not missing
    for key, why in IGNORED.items():
        rec = format_run.records[key]
        assert rec["status"] == "ignored" and why in rec["error"] and rec["output"] is None, rec
    assert not (format_run.out / "notes.txt").exists() and not (format_run.out / ".thumb.jpg").exists()
    protected = [key for key in format_run.files if key not in IGNORED]
    assert all(format_run.records[key]["status"] == "protected" for key in protected), format_run.records
    assert format_run.summary["counts"] == {"protected": len(protected), "skipped": 0, "failed": 0, "ignored": len(IGNORED)}
    assert f"ignored {len(IGNORED)} files that are no inputs" in format_run.stderr


@pytest.mark.parametrize("key", sorted(SAME_FORMAT))
def test_each_format_is_protected_in_its_own_format_frame_by_frame(format_run: FormatRun, key: str) -> None:
    """Same format, same frame count and durations; every frame within the budget (lossless) or
    at least LOSSY[key] dB PSNR from its source frame (lossy re-encode)."""
    rec = format_run.records[key]
    written = format_run.out / rec["output"]
    src_format, src_frames, src_durations = _all_frames(format_run.files[key])
    out_format, out_frames, out_durations = _all_frames(written)
    assert out_format == SAME_FORMAT[key] == src_format
    assert len(out_frames) == len(src_frames) and out_durations == src_durations
    assert rec["linf"] > 0  # noise was added
    for src, out in zip(src_frames, out_frames):
        assert src.shape == out.shape
        linf, psnr = fidelity(src, out, 255)
        if key in LOSSY:
            assert psnr is not None and psnr >= LOSSY[key], (key, psnr)
        else:
            assert 0 < linf <= EPSILON, (key, linf)


def test_animation_timing_and_metadata_are_kept(format_run: FormatRun) -> None:
    with Image.open(format_run.out / format_run.records["apng"]["output"]) as apng:
        assert apng.n_frames == FRAMES and apng.info["loop"] == 2
    with Image.open(format_run.out / format_run.records["webp_anim"]["output"]) as webp:
        assert webp.n_frames == FRAMES and webp.info["loop"] == 0
    for key, make in (("heic", "cgan-test-phone"), ("avif", "cgan-test-camera")):
        with Image.open(format_run.out / format_run.records[key]["output"]) as img:
            assert img.getexif()[MAKE_TAG] == make
    with Image.open(format_run.out / format_run.records["fax_tiff"]["output"]) as fax:
        assert fax.mode == "L" and fax.info["compression"] == "tiff_lzw"  # group4 stores 1-bit pixels only
    assert decode_image((format_run.out / format_run.records["j2k"]["output"]).read_bytes()).j2k_codestream
    with Image.open(format_run.out / format_run.records["ico"]["output"]) as ico:
        assert sorted(ico.info["sizes"]) == ICO_SIZES


def _psd_bytes(rgb: np.ndarray) -> bytes:
    """A minimal flattened RGB PSD (Pillow reads PSD but cannot write it): header, three empty
    sections, raw planar image data."""
    height, width, _ = rgb.shape
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    return header + struct.pack(">IIIH", 0, 0, 0, 0) + rgb.transpose(2, 0, 1).tobytes()


def _cur_bytes(rgba: np.ndarray) -> bytes:
    """A cursor: an ICO with BMP entries whose type field says CUR (Pillow cannot write CUR)."""
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, "ICO", sizes=[rgba.shape[1::-1]], bitmap_format="bmp")
    data = bytearray(buf.getvalue())
    data[2] = 2
    return bytes(data)


def test_read_only_psd_and_cur_are_written_as_png(tmp_path: Path, rgb_weights: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    rgb = smooth_rgb(20, 24, 11)
    (src / "layered.psd").write_bytes(_psd_bytes(rgb))
    (src / "pointer.cur").write_bytes(_cur_bytes(np.dstack([smooth_rgb(16, 16, 12), np.full((16, 16), 255, np.uint8)])))
    res = _run(str(src), "--out", str(tmp_path / "out"), "--weights", str(rgb_weights), "--workers", "0")
    assert res.exit_code == 0, res.stderr
    for name, source in (("layered.png", src / "layered.psd"), ("pointer.png", src / "pointer.cur")):
        written = tmp_path / "out" / name
        _, (before,), _ = _all_frames(source)
        fmt, (after,), _ = _all_frames(written)
        assert fmt == "PNG" and before.shape == after.shape
        assert 0 < fidelity(before, after, 255)[0] <= EPSILON


def test_animated_gif_fails_with_a_way_out_and_converts_with_format(tmp_path: Path, rgb_weights: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    frames = [f.quantize(32) for f in _frames()]
    frames[0].save(src / "loop.gif", "GIF", save_all=True, append_images=frames[1:], duration=DURATIONS, loop=0)
    res = _run(str(src), "--out", str(tmp_path / "gif"), "--weights", str(rgb_weights), "--workers", "0")
    assert res.exit_code == 1 and "--format webp" in res.stderr
    res = _run(str(src), "--out", str(tmp_path / "webp"), "--weights", str(rgb_weights), "--workers", "0", "--format", "webp")
    assert res.exit_code == 0, res.stderr
    fmt, out_frames, durations = _all_frames(tmp_path / "webp" / "loop.webp")
    _, src_frames, _ = _all_frames(src / "loop.gif")
    assert fmt == "WEBP" and len(out_frames) == FRAMES and durations == DURATIONS
    for a, b in zip(src_frames, out_frames):
        assert 0 < fidelity(a[..., :3], b[..., :3], 255)[0] <= EPSILON


@pytest.mark.parametrize("fmt,kw", [("JPEG", {}), ("PNG", {}), ("GIF", {}), ("WEBP", {}), ("TIFF", {}), ("BMP", {}), ("AVIF", {}),
                                     ("HEIF", {}), ("JPEG2000", {}), ("JPEG2000", {"no_jp2": True}), ("QOI", {}), ("PPM", {}), ("ICO", {})])
def test_sniff_names_each_format_from_its_first_bytes(fmt: str, kw: dict) -> None:
    import pillow_heif

    pillow_heif.register_heif_opener()
    buf = io.BytesIO()
    Image.fromarray(smooth_rgb(16, 16)).save(buf, fmt, **kw)
    assert sniff_format(buf.getvalue()[:SNIFF_BYTES]) == fmt


@pytest.mark.parametrize("head", [b"", b"hello world, plain text\n", b"{\"json\": true}", bytes(range(32)), b"PK\x03\x04zipfile"])
def test_sniff_never_takes_text_or_data_for_an_image(head: bytes) -> None:
    assert sniff_format(head) is None


def test_frames_take_the_same_path_in_every_engine_placement(format_run: FormatRun, rgb_weights: Path, tmp_path: Path) -> None:
    """Frames share batches with single images; the GPU layout (one engine in the main process, run
    here on the CPU) writes the same files and records as the worker layout."""
    from cgan_cli.core.engine import EngineConfig, ProtectEngine
    from cgan_cli.core.formats import EncodeOptions
    from cgan_cli.protect.pipeline import protect_stream
    from cgan_cli.protect.sinks import FolderSink
    from cgan_cli.protect.sources import folder_samples

    engine = ProtectEngine(EngineConfig(rgb_weights, device="cpu", batch_size=4))
    root = format_run.files["heic"].parent
    seen = {}
    for name, kwargs in {"in workers": dict(workers=0), "main engine": dict(workers=1, engine_in_workers=False)}.items():
        records: list = []
        protect_stream(folder_samples(root), FolderSink(tmp_path / name), engine, EncodeOptions(), records.append, **kwargs)
        seen[name] = [(r.source, r.status, r.output, r.sha256_out, r.linf) for r in records]
    assert seen["in workers"] == seen["main engine"]
    assert sorted(status for _, status, *_ in seen["in workers"]).count("ignored") == len(IGNORED)


def test_dry_run_lists_ignored_files_with_the_reason(tmp_path: Path, rgb_weights: Path) -> None:
    src = tmp_path / "in"
    (src / ".cache").mkdir(parents=True)
    (src / ".cache" / "x.jpg").write_bytes(b"")
    Image.fromarray(smooth_rgb(16, 16)).save(src / "DSC0001", "JPEG")
    (src / "todo.md").write_text("# list\n")
    res = CliRunner().invoke(app, ["protect", str(src), "--out", str(tmp_path / "out"), "--weights", str(rgb_weights), "--dry-run"])
    lines = sorted(line.split("\t")[:2] for line in res.stdout.splitlines())
    assert lines == [["ignore", str(src / ".cache")], ["ignore", str(src / "todo.md")], ["protect", str(src / "DSC0001")]]
    assert "hidden folder" in res.stdout and "not an image" in res.stdout
