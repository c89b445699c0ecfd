"""audioldm.dataset: a valid zip passes; hostile zips are rejected with the row or path named, and
extraction never writes outside its work dir. All zips are built here from real audio."""

from __future__ import annotations

import csv
import io
import stat
import struct
import time
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audioldm.dataset import (
    ACCEPTED_FORMATS,
    DatasetItem,
    DatasetLimits,
    DatasetReport,
    _Bad,
    _read_member,
    extract_dataset,
    validate_dataset,
)
from audioldm.errors import JobError


# ---------------------------------------------------------------- building zips
def audio_bytes(seconds: float = 1.0, sr: int = 16_000, freq: float = 440.0, channels: int = 1,
                fmt: str = "WAV", subtype: str | None = None, data: np.ndarray | None = None) -> bytes:
    if data is None:
        t = np.arange(int(sr * seconds)) / sr
        tone = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(0).standard_normal(t.size)
        data = np.stack([tone] * channels, axis=1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, data, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def csv_bytes(rows: list[tuple[str, ...]], header: str = "audio,caption") -> bytes:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(header.split(","))
    w.writerows(rows)
    return out.getvalue().encode()


def make_zip(path: Path, files: dict[str, bytes], extra: list[tuple[zipfile.ZipInfo, bytes]] = ()) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for info, data in extra:
            zf.writestr(info, data)
    return path


GOOD = {
    "wavs/a.wav": audio_bytes(2.0),
    "wavs/deep/b.flac": audio_bytes(1.5, sr=44_100, channels=2, fmt="FLAC", freq=660),
    "c.ogg": audio_bytes(1.2, sr=22_050, fmt="OGG", subtype="VORBIS", freq=880),
}


def good_files(**overrides: bytes) -> dict[str, bytes]:
    meta = b'audio,caption,notes\nwavs/a.wav,a calm tone,x\n' \
           b'wavs/deep/b.flac,"a higher tone, in stereo",\n' \
           b'./c.ogg,an ogg tone,y\n'
    return {"metadata.csv": meta, **GOOD, **overrides}


def tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def problems_text(report: DatasetReport) -> list[str]:
    return [str(p) for p in report.problems]


def assert_problem(report: DatasetReport, where: str, message: str) -> None:
    assert not report.ok
    hits = [p for p in report.problems if where in p.where and message in p.message]
    assert hits, f"no problem with where~{where!r} message~{message!r} in:\n" + "\n".join(problems_text(report))


def assert_extraction_contained(zip_path: Path, report: DatasetReport, tmp_path: Path) -> None:
    """A rejected report cannot be extracted; its valid items (partial=True) land only in work/."""
    work = tmp_path / "work"
    before = tree(tmp_path)
    with pytest.raises(ValueError):
        extract_dataset(zip_path, report, work)
    extracted = extract_dataset(zip_path, report, work, partial=True)
    new = tree(tmp_path) - before
    assert all(p.resolve().is_relative_to(work.resolve()) for p in new), new
    assert {p for p, _ in extracted} <= new
    assert len(extracted) == len(report.items)
    for p, _ in extracted:
        assert p.parent == work.resolve() / "audio" and p.suffix in ACCEPTED_FORMATS


# ---------------------------------------------------------------- the valid dataset
def test_valid_dataset_passes_and_extracts(tmp_path):
    z = make_zip(tmp_path / "ds.zip", good_files())
    report = validate_dataset(z)
    assert report.ok, report.error_message()
    assert report.error_message() == ""
    assert [(i.row, i.member, i.caption) for i in report.items] == [
        (2, "wavs/a.wav", "a calm tone"),
        (3, "wavs/deep/b.flac", "a higher tone, in stereo"),
        (4, "c.ogg", "an ogg tone"),
    ]
    a, b, c = report.items
    assert (a.sample_rate, a.channels) == (16_000, 1) and a.duration_s == pytest.approx(2.0)
    assert (b.sample_rate, b.channels) == (44_100, 2) and b.duration_s == pytest.approx(1.5)
    assert c.sample_rate == 22_050 and c.duration_s == pytest.approx(1.2, abs=0.01)
    assert report.rows == 3 and report.audio_files == 3 and report.zip_entries == 4
    assert report.total_seconds == pytest.approx(4.7, abs=0.01)
    assert not report.warnings

    work = tmp_path / "work"
    before = tree(tmp_path)
    pairs = extract_dataset(z, report, work)
    assert all(p.resolve().is_relative_to(work.resolve()) for p in tree(tmp_path) - before)
    assert [cap for _, cap in pairs] == ["a calm tone", "a higher tone, in stereo", "an ogg tone"]
    for (path, _), item in zip(pairs, report.items):
        data, sr = sf.read(path)
        assert sr == item.sample_rate and len(data) / sr == pytest.approx(item.duration_s, abs=0.01)
        assert path.read_bytes() == GOOD[item.member]


def test_same_audio_with_two_captions_is_two_items_one_file(tmp_path):
    files = {"metadata.csv": csv_bytes([("a.wav", "one"), ("a.wav", "two")]), "a.wav": GOOD["wavs/a.wav"]}
    z = make_zip(tmp_path / "ds.zip", files)
    report = validate_dataset(z)
    assert report.ok and len(report.items) == 2 and report.audio_files == 1
    pairs = extract_dataset(z, report, tmp_path / "w")
    assert pairs[0][0] == pairs[1][0] and [c for _, c in pairs] == ["one", "two"]


def test_nfd_names_from_macos_match_nfc_csv_and_bom_is_accepted(tmp_path):
    nfd = unicodedata.normalize("NFD", "café.wav")
    files = {"metadata.csv": b"\xef\xbb\xbf" + csv_bytes([("café.wav", "coffee")]), nfd: GOOD["wavs/a.wav"]}
    report = validate_dataset(make_zip(tmp_path / "ds.zip", files))
    assert report.ok, report.error_message()
    assert report.items[0].member == nfd


def test_short_clip_is_a_warning_and_unlisted_audio_is_noted(tmp_path):
    files = {"metadata.csv": csv_bytes([("s.wav", "short")]), "s.wav": audio_bytes(0.5), "extra.wav": GOOD["wavs/a.wav"]}
    report = validate_dataset(make_zip(tmp_path / "ds.zip", files))
    assert report.ok
    assert any("short" in w.message and "s.wav" in w.where for w in report.warnings)
    assert any("not listed" in w.message for w in report.warnings)


# ---------------------------------------------------------------- hostile zips, one problem each
def _symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


HOSTILE: dict[str, tuple[dict[str, bytes], list, str, str]] = {
    # name: (files, extra entries, where contains, message contains)
    "no_metadata": ({"wavs/a.wav": GOOD["wavs/a.wav"]}, [], "metadata.csv", "no metadata.csv at the root"),
    "metadata_in_subfolder_only": (
        {"mydata/metadata.csv": csv_bytes([("wavs/a.wav", "x")]), "mydata/wavs/a.wav": GOOD["wavs/a.wav"]},
        [], "metadata.csv", "found 'mydata/metadata.csv'"),
    "missing_caption_column": (
        {"metadata.csv": b"audio,text\nwavs/a.wav,hello\n", "wavs/a.wav": GOOD["wavs/a.wav"]},
        [], "metadata.csv row 1 (header)", "no column 'caption'"),
    "semicolon_separated": (
        {"metadata.csv": b"audio;caption\nwavs/a.wav;hello\n", "wavs/a.wav": GOOD["wavs/a.wav"]},
        [], "metadata.csv row 1 (header)", "comma-separated"),
    "empty_caption": (good_files(**{"metadata.csv": csv_bytes([("wavs/a.wav", "ok"), ("c.ogg", "  ")])}),
                      [], "metadata.csv row 3, column 'caption'", "caption is empty"),
    "empty_audio_path": (good_files(**{"metadata.csv": csv_bytes([("wavs/a.wav", "ok"), ("", "a caption")])}),
                         [], "metadata.csv row 3, column 'audio'", "audio path is empty"),
    "missing_file": (good_files(**{"metadata.csv": csv_bytes([("wavs/nope.wav", "x")])}),
                     [], "metadata.csv row 2, column 'audio'", "is not in the zip"),
    "case_mismatch": (good_files(**{"metadata.csv": csv_bytes([("Wavs/A.wav", "x")])}),
                      [], "metadata.csv row 2, column 'audio'", "did you mean 'wavs/a.wav'"),
    "dotdot_in_csv": (good_files(**{"metadata.csv": csv_bytes([("wavs/a.wav", "ok"), ("../escape.wav", "x")])}),
                      [], "metadata.csv row 3, column 'audio'", "contains '..'"),
    "absolute_path_in_csv": (good_files(**{"metadata.csv": csv_bytes([("/etc/passwd", "x")])}),
                             [], "metadata.csv row 2, column 'audio'", "absolute path"),
    "drive_letter_in_csv": (good_files(**{"metadata.csv": csv_bytes([("C:/x.wav", "x")])}),
                            [], "metadata.csv row 2, column 'audio'", "drive letter"),
    "backslash_in_csv": (good_files(**{"metadata.csv": csv_bytes([("wavs\\a.wav", "x")])}),
                         [], "metadata.csv row 2, column 'audio'", "backslash"),
    "zip_slip_entry": (good_files(), [(zipfile.ZipInfo("../../evil.wav"), GOOD["wavs/a.wav"])],
                       "zip entry '../../evil.wav'", "contains '..'"),
    "absolute_zip_entry": (good_files(), [(zipfile.ZipInfo("/tmp/evil.wav"), GOOD["wavs/a.wav"])],
                           "zip entry '/tmp/evil.wav'", "absolute path"),
    "backslash_zip_entry": (good_files(), [(zipfile.ZipInfo("..\\evil.wav"), GOOD["wavs/a.wav"])],
                            "zip entry '..\\evil.wav'", "backslash"),
    "symlink_entry": (good_files(**{"metadata.csv": csv_bytes([("wavs/a.wav", "ok"), ("wavs/link.wav", "x")])}),
                      [(_symlink_info("wavs/link.wav"), b"/etc/passwd")],
                      "zip entry 'wavs/link.wav'", "symbolic link"),
    "renamed_text_file": (good_files(**{"metadata.csv": csv_bytes([("wavs/a.wav", "ok"), ("notes.wav", "x")]),
                                        "notes.wav": b"this is not audio, just notes\n" * 20}),
                          [], "'notes.wav' (metadata.csv row 3)", "text file"),
    "corrupt_wav_truncated_header": (good_files(**{"metadata.csv": csv_bytes([("bad.wav", "x")]),
                                                   "bad.wav": GOOD["wavs/a.wav"][:30]}),
                                     [], "'bad.wav' (metadata.csv row 2)", "cannot be decoded"),
    "empty_wav": (good_files(**{"metadata.csv": csv_bytes([("e.wav", "x")]), "e.wav": b""}),
                  [], "'e.wav' (metadata.csv row 2)", "empty file"),
    "silent_wav": (good_files(**{"metadata.csv": csv_bytes([("s.wav", "x")]),
                                 "s.wav": audio_bytes(data=np.zeros((16_000, 1), np.float32))}),
                   [], "'s.wav' (metadata.csv row 2)", "silent"),
    "nan_float_wav": (good_files(**{"metadata.csv": csv_bytes([("n.wav", "x")]),
                                    "n.wav": audio_bytes(data=np.where(np.arange(16_000)[:, None] == 5000, np.nan, 0.1)
                                                         .astype(np.float32), subtype="FLOAT")}),
                      [], "'n.wav' (metadata.csv row 2)", "NaN or infinite"),
    "unsupported_format": (good_files(**{"metadata.csv": csv_bytes([("v.mp4", "x")]), "v.mp4": b"\x00" * 100}),
                           [], "'v.mp4' (metadata.csv row 2)", "unsupported format"),
    "duplicate_row": (good_files(**{"metadata.csv": csv_bytes([("wavs/a.wav", "x"), ("c.ogg", "y"), ("wavs/a.wav", "x")])}),
                      [], "metadata.csv row 4", "duplicates row 2"),
    "non_utf8_metadata": (good_files(**{"metadata.csv": "audio,caption\nwavs/a.wav,ok\nc.ogg,café\n".encode("latin-1")}),
                          [], "metadata.csv line 3", "not UTF-8"),
    "unquoted_comma_caption": (good_files(**{"metadata.csv": b"audio,caption\nwavs/a.wav,rain, then thunder\n"}),
                               [], "metadata.csv row 2", "quote captions"),
    "folder_as_audio": (good_files(**{"metadata.csv": csv_bytes([("wavs/deep", "x")])}),
                        [(zipfile.ZipInfo("wavs/deep/"), b"")], "metadata.csv row 2, column 'audio'", "is a folder"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_zip_is_rejected_with_location_and_extraction_stays_inside(case, tmp_path):
    files, extra, where, message = HOSTILE[case]
    z = make_zip(tmp_path / "ds.zip", files, extra)
    report = validate_dataset(z)
    assert_problem(report, where, message)
    assert_extraction_contained(z, report, tmp_path)


def test_zip_slip_entry_is_never_written_even_when_other_rows_are_fine(tmp_path):
    z = make_zip(tmp_path / "ds.zip", good_files(), [(zipfile.ZipInfo("../../evil.wav"), GOOD["wavs/a.wav"])])
    report = validate_dataset(z)
    assert len(report.items) == 3 and len(report.problems) == 1
    work = tmp_path / "a" / "b" / "work"
    extract_dataset(z, report, work, partial=True)
    assert not list(tmp_path.rglob("evil.wav"))
    assert sorted(p.name for p in (work / "audio").iterdir()) == ["000000_a.wav", "000001_b.flac", "000002_c.ogg"]


def test_forged_report_item_cannot_escape(tmp_path):
    z = make_zip(tmp_path / "ds.zip", good_files(), [(zipfile.ZipInfo("../../evil.wav"), GOOD["wavs/a.wav"])])
    forged = DatasetReport(items=[DatasetItem(2, "../../evil.wav", "x", 2.0, 16_000, 1, len(GOOD["wavs/a.wav"]), 0)])
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="not validated"):
        extract_dataset(z, forged, tmp_path / "work")
    assert all(p.is_relative_to(tmp_path / "work") for p in tree(tmp_path) - before)
    assert not list(tmp_path.rglob("evil.wav"))


def test_work_dir_audio_symlink_pointing_outside_is_refused(tmp_path):
    z = make_zip(tmp_path / "ds.zip", good_files())
    report = validate_dataset(z)
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "audio").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside"):
        extract_dataset(z, report, tmp_path / "work")
    assert not list(outside.iterdir())


def test_zip_changed_after_validation_is_refused(tmp_path):
    z = make_zip(tmp_path / "ds.zip", good_files())
    report = validate_dataset(z)
    make_zip(z, good_files(**{"wavs/a.wav": audio_bytes(2.0, freq=500)}))
    with pytest.raises(JobError, match="changed"):
        extract_dataset(z, report, tmp_path / "work")


# ---------------------------------------------------------------- size limits
def test_zip_bomb_by_declared_size_is_rejected_without_reading(tmp_path):
    # 272 MiB of zeros -> a ~1.2 MB zip; the default per-file limit is 256 MiB.
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("metadata.csv", csv_bytes([("wavs/a.wav", "ok"), ("bomb.wav", "boom")]))
        zf.writestr("wavs/a.wav", GOOD["wavs/a.wav"])
        with zf.open("bomb.wav", "w", force_zip64=True) as f:
            chunk = bytes(16 << 20)
            for _ in range(17):
                f.write(chunk)
    assert z.stat().st_size < 2 << 20
    t0 = time.perf_counter()
    report = validate_dataset(z)
    assert time.perf_counter() - t0 < 1.0
    assert_problem(report, "zip entry 'bomb.wav'", "over the limit of 268435456 per file")
    assert_problem(report, "metadata.csv row 3, column 'audio'", "'bomb.wav' is a zip entry that was rejected")
    assert_extraction_contained(z, report, tmp_path)


def _patch_sizes(data: bytes, name: bytes, new_size: int) -> bytes:
    """Make local and central headers of ``name`` declare ``new_size`` uncompressed bytes."""
    buf = bytearray(data)
    for sig, size_at, name_len_at, name_at in ((b"PK\x03\x04", 22, 26, 30), (b"PK\x01\x02", 24, 28, 46)):
        i = 0
        while (i := buf.find(sig, i)) >= 0:
            n = struct.unpack_from("<H", buf, i + name_len_at)[0]
            if bytes(buf[i + name_at : i + name_at + n]) == name:
                struct.pack_into("<I", buf, i + size_at, new_size)
            i += 4
    return bytes(buf)


def test_zip_bomb_with_lying_header_is_rejected(tmp_path):
    # The header claims 1000 bytes, the stream inflates to 32 MiB: never more than 1000 bytes are read.
    z = tmp_path / "liar.zip"
    make_zip(z, {"metadata.csv": csv_bytes([("liar.wav", "x")]), "liar.wav": bytes(32 << 20)})
    z.write_bytes(_patch_sizes(z.read_bytes(), b"liar.wav", 1000))
    report = validate_dataset(z, DatasetLimits(max_file_bytes=1 << 20))
    assert_problem(report, "'liar.wav' (metadata.csv row 2)", "cannot be read from the zip")
    assert_extraction_contained(z, report, tmp_path)


def test_streaming_cap_holds_even_if_the_reader_ignores_the_header():
    class EndlessZip:  # A reader that keeps inflating past the declared size.
        def open(self, info):
            return io.BytesIO(bytes(8 << 20))

    info = zipfile.ZipInfo("x.wav")
    info.compress_type, info.file_size = zipfile.ZIP_DEFLATED, 100
    with pytest.raises(_Bad, match="expands beyond 1048576"):
        _read_member(EndlessZip(), info, cap=1 << 20)


def test_total_uncompressed_size_is_capped(tmp_path):
    z = make_zip(tmp_path / "ds.zip", good_files())
    report = validate_dataset(z, DatasetLimits(max_total_bytes=100_000))
    assert_problem(report, "zip", "over the limit of 100000")


def test_bzip2_member_is_not_read(tmp_path):
    z = tmp_path / "bz.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("metadata.csv", csv_bytes([("a.wav", "x")]))
        zf.writestr("a.wav", GOOD["wavs/a.wav"], compress_type=zipfile.ZIP_BZIP2)
    assert_problem(validate_dataset(z), "'a.wav' (metadata.csv row 2)", "bzip2")


def test_csv_with_millions_of_rows_is_rejected_fast(tmp_path):
    big = b"audio,caption\n" + b"wavs/a.wav,a tone\n" * 2_000_000  # 34 MB, compresses to ~100 KB
    z = make_zip(tmp_path / "ds.zip", {"metadata.csv": big, "wavs/a.wav": GOOD["wavs/a.wav"]})
    t0 = time.perf_counter()
    report = validate_dataset(z)
    assert time.perf_counter() - t0 < 1.0  # measured ~1 ms: the declared size alone rejects it
    assert_problem(report, "metadata.csv", "over the limit of 8388608")


def test_csv_with_too_many_rows_under_the_byte_cap_stops_at_the_limit(tmp_path):
    rows = b"audio,caption\n" + b"".join(b"a.wav,take %d\n" % i for i in range(50_000)) + b"\n" * 100_000
    z = make_zip(tmp_path / "ds.zip", {"metadata.csv": rows, "a.wav": GOOD["wavs/a.wav"]})
    t0 = time.perf_counter()
    report = validate_dataset(z)
    assert time.perf_counter() - t0 < 1.0  # measured ~0.1 s: parsing stops at row 10002
    assert_problem(report, "metadata.csv", "more than 10000 rows")
    assert len(report.problems) == 1  # stopped: no per-row noise, no audio decoded


def test_too_many_zip_entries_is_rejected_before_parsing(tmp_path):
    files = {f"f{i}.wav": b"" for i in range(30)}
    report = validate_dataset(make_zip(tmp_path / "ds.zip", files), DatasetLimits(max_files=10))
    assert_problem(report, "zip", "has 30 entries; at most 10")


def test_not_a_zip(tmp_path):
    p = tmp_path / "ds.zip"
    p.write_bytes(b"audio,caption\n")
    assert_problem(validate_dataset(p), "zip", "not a valid zip")


# ---------------------------------------------------------------- everything at once
def test_several_problems_are_all_reported(tmp_path):
    meta = csv_bytes([
        ("wavs/a.wav", "fine"),  # row 2
        ("wavs/a.wav", ""),  # row 3: empty caption
        ("wavs/missing.wav", "x"),  # row 4
        ("../escape.wav", "x"),  # row 5
        ("s.wav", "silent"),  # row 6
        ("t.wav", "text"),  # row 7
        ("wavs/a.wav", "fine"),  # row 8: duplicate of row 2
    ])
    files = good_files(**{"metadata.csv": meta, "s.wav": audio_bytes(data=np.zeros((8000, 1), np.float32)),
                          "t.wav": b"hello\n" * 100})
    z = make_zip(tmp_path / "ds.zip", files, [(zipfile.ZipInfo("../../evil.wav"), b"x"),
                                              (_symlink_info("link.wav"), b"/etc/shadow")])
    report = validate_dataset(z)
    expected = [
        ("zip entry '../../evil.wav'", "'..'"),
        ("zip entry 'link.wav'", "symbolic link"),
        ("metadata.csv row 3, column 'caption'", "empty"),
        ("metadata.csv row 4, column 'audio'", "is not in the zip"),
        ("metadata.csv row 5, column 'audio'", "'..'"),
        ("'s.wav' (metadata.csv row 6)", "silent"),
        ("'t.wav' (metadata.csv row 7)", "text file"),
        ("metadata.csv row 8", "duplicates row 2"),
    ]
    for where, message in expected:
        assert_problem(report, where, message)
    assert len(report.problems) == len(expected), problems_text(report)
    # Zip-level problems first, then rows in order, each row's problems in one place.
    rows = [p.row for p in report.problems]
    assert rows == [None, None, 3, 4, 5, 6, 7, 8]
    assert [i.row for i in report.items] == [2]

    msg = report.error_message(max_items=3)
    lines = msg.splitlines()
    assert lines[0] == f"Dataset rejected: {len(expected)} problems."
    assert len(lines) == 1 + 3 + 1 and lines[-1] == f"... and {len(expected) - 3} more."
    assert lines[1] == f"- {report.problems[0]}"
    assert_extraction_contained(z, report, tmp_path)


def test_limits_must_be_positive():
    with pytest.raises(ValueError):
        DatasetLimits(max_rows=0)


def test_missing_zip_is_misuse(tmp_path):
    with pytest.raises(FileNotFoundError):
        validate_dataset(tmp_path / "nope.zip")


# ---------------------------------------------------------------- fuzzing: never raise, one line each
_FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _validate_bytes(tmp: Path, files: dict[str, bytes]) -> DatasetReport:
    z = make_zip(tmp / "fuzz.zip", files)
    report = validate_dataset(z)
    assert report.ok == (not report.problems)
    for p in report.problems + report.warnings:
        assert p.where and p.message and "\n" not in str(p) and "\r" not in str(p)
    return report


@_FUZZ
@given(meta=st.one_of(st.binary(max_size=300),
                      st.text(alphabet=st.sampled_from('audio,caption"\n\r\x00./\\ab\u00e9;'), max_size=200).map(str.encode)))
def test_arbitrary_metadata_never_raises(tmp_path_factory, meta):
    _validate_bytes(tmp_path_factory.mktemp("m"), {"metadata.csv": meta, "a.wav": GOOD["wavs/a.wav"]})


@_FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 199), st.integers(0, 255)), max_size=8), cut=st.integers(0, 400))
def test_damaged_wav_never_raises(tmp_path_factory, flips, cut):
    wav = bytearray(GOOD["wavs/a.wav"][: 44 + cut * 100])
    for at, value in flips:
        if at < len(wav):
            wav[at] = value
    report = _validate_bytes(tmp_path_factory.mktemp("w"), {"metadata.csv": csv_bytes([("a.wav", "x")]), "a.wav": bytes(wav)})
    assert report.ok == bool(report.items)


@pytest.mark.skipif(".mp3" not in ACCEPTED_FORMATS, reason="this libsndfile has no MP3")
def test_mp3_is_accepted(tmp_path):
    mp3 = audio_bytes(2.0, sr=44_100, fmt="MP3", subtype="MPEG_LAYER_III")
    report = validate_dataset(make_zip(tmp_path / "ds.zip", {"metadata.csv": csv_bytes([("a.mp3", "x")]), "a.mp3": mp3}))
    assert report.ok and report.items[0].duration_s == pytest.approx(2.0, abs=0.05)
