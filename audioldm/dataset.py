"""Validate a user's dataset zip without trusting it, before any GPU time is spent.

Format: a zip with ``metadata.csv`` at its root, comma-separated, UTF-8, with a header row naming at
least the columns ``audio`` and ``caption`` (extra columns are ignored). ``audio`` is a path relative
to the zip root using ``/`` (``wavs/a.wav``); files may sit in subfolders.

Rules this module keeps:
- The zip is only read with :mod:`zipfile`, member by member, never ``extractall``. Every read is
  streamed with a byte cap, because size headers can lie; only stored/deflate members are read
  (CPython's bzip2/lzma readers decompress a whole chunk with no output limit).
- Data problems are never raised: :func:`validate_dataset` collects all of them, each with where it
  is, into a :class:`DatasetReport`. Exceptions mean programmer misuse (or a zip that changed between
  validation and extraction).
- :func:`extract_dataset` writes only validated audio members, under names it generates itself, and
  checks each destination resolves inside ``work_dir``.

Row numbers are spreadsheet row numbers: the header is row 1, the first data row is row 2; a blank
line counts as a row, and a quoted caption spanning several lines is one row.
"""

from __future__ import annotations

import csv
import io
import re
import stat
import struct
import unicodedata
import zipfile
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import soundfile as sf

from audioldm.errors import JobError

METADATA_NAME = "metadata.csv"
REQUIRED_COLUMNS = ("audio", "caption")
# Extension -> libsndfile format: what soundfile decodes, limited to what this libsndfile supports.
ACCEPTED_FORMATS: dict[str, str] = {
    ext: fmt
    for ext, fmt in {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".mp3": "MP3"}.items()
    if fmt in sf.available_formats()
}
_READABLE_COMPRESSION = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
_COMPRESSION_NAMES = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma", 9: "deflate64", 93: "zstd"}
_CHUNK = 1 << 20  # Streaming read size (1 MiB).
_AUDIO_BLOCK = 1 << 16  # Frames decoded at a time while scanning audio.
_DRIVE = re.compile(r"^[A-Za-z]:")
MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class DatasetLimits:
    """Bounds on what a dataset may make us read. All sizes are uncompressed bytes."""

    max_files: int = 20_000  # Zip entries of any kind (folders included).
    max_rows: int = 10_000  # Rows after the header in metadata.csv (blank lines count).
    max_metadata_bytes: int = 8 * MiB
    max_file_bytes: int = 256 * MiB  # One member (about 23 min of 48 kHz 16-bit stereo WAV).
    max_total_bytes: int = 8 * GiB  # All members together.
    max_caption_chars: int = 2_000
    max_audio_seconds: float = 1_800.0  # Per file; training only ever uses a 10.24 s crop.
    min_audio_seconds: float = 0.1  # Shorter is rejected: nothing to learn from.
    short_audio_seconds: float = 1.0  # Shorter is a warning: the clip is mostly zero padding.
    silence_peak: float = 1e-4  # Peak |x| below this (about -80 dBFS) counts as silent.
    min_sample_rate: int = 8_000
    max_sample_rate: int = 384_000
    max_channels: int = 8

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"DatasetLimits.{name} must be positive, got {value!r}")


@dataclass(frozen=True)
class Problem:
    where: str  # e.g. "metadata.csv row 3, column 'caption'", "zip entry '../x.wav'".
    message: str
    row: int | None = None  # metadata.csv row (header = 1) when the problem belongs to a row.

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class DatasetItem:
    row: int  # Spreadsheet row in metadata.csv (header = row 1).
    member: str  # Zip member name, validated (relative, no '..', no backslash).
    caption: str
    duration_s: float
    sample_rate: int
    channels: int
    size_bytes: int  # Uncompressed size, as read.
    crc32: int  # From the zip; extraction refuses a member that changed since validation.


@dataclass
class DatasetReport:
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)  # Worth telling; do not block training.
    items: list[DatasetItem] = field(default_factory=list)  # One per valid row.
    zip_entries: int = 0
    rows: int = 0  # Data rows read.
    audio_files: int = 0  # Distinct audio members that passed.
    total_seconds: float = 0.0  # Of distinct audio members that passed.
    total_bytes: int = 0  # Uncompressed bytes of distinct audio members that passed.

    @property
    def ok(self) -> bool:
        return not self.problems

    def error_message(self, max_items: int = 50) -> str:
        """Problems one per line (at most ``max_items``), then how many more; "" when ok."""
        if self.ok:
            return ""
        n = len(self.problems)
        lines = [f"Dataset rejected: {n} problem{'' if n == 1 else 's'}."]
        lines += [f"- {p}" for p in self.problems[:max_items]]
        if n > max_items:
            lines.append(f"... and {n - max_items} more.")
        return "\n".join(lines)

    def summary(self) -> str:
        return (
            f"{self.rows} rows, {self.audio_files} audio files, {self.total_seconds:.1f} s, "
            f"{self.total_bytes / MiB:.1f} MiB; {len(self.problems)} problems, "
            f"{len(self.warnings)} warnings"
        )

    def _add(self, where: str, message: str, row: int | None = None) -> None:
        self.problems.append(Problem(where, message, row))

    def _warn(self, where: str, message: str, row: int | None = None) -> None:
        self.warnings.append(Problem(where, message, row))


class _Bad(Exception):
    """Internal: one member failed; the message goes into the report."""


def _show(name: str, limit: int = 120) -> str:
    """A user-supplied name, quoted, control characters escaped, truncated: safe in one line."""
    s = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in name[: limit + 1])
    return f"'{s[:limit]}…'" if len(s) > limit else f"'{s}'"


def _row(row: int, column: str | None = None) -> str:
    return f"{METADATA_NAME} row {row}" + (f", column '{column}'" if column else "")


def _path_problem(name: str) -> str | None:
    """Why a zip name or CSV path could escape the dataset folder, or None if it cannot."""
    if not name:
        return "has an empty name"
    if "\\" in name:
        return "contains a backslash; use '/' between folders"
    if any(not ch.isprintable() for ch in name):
        return "contains control characters"
    if name.startswith("/"):
        return "is an absolute path; paths must be relative to the zip root"
    if _DRIVE.match(name):
        return "starts with a drive letter; paths must be relative to the zip root"
    if ".." in name.split("/"):
        return "contains '..'; paths must stay inside the dataset"
    return None


def _declared_entry_count(zip_path: Path) -> int | None:
    """Entry count from the end-of-central-directory record (zip64 aware), before zipfile parses
    the whole directory. None when not found: zipfile then decides whether it is a zip."""
    with open(zip_path, "rb") as f:
        size = f.seek(0, io.SEEK_END)
        tail_len = min(size, 22 + 0xFFFF)  # EOCD is 22 bytes plus a comment of up to 64 KiB.
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        i = tail.rfind(b"PK\x05\x06")
        if i < 0 or len(tail) - i < 22:
            return None
        total = struct.unpack_from("<H", tail, i + 10)[0]
        if total != 0xFFFF or i < 20 or tail[i - 20 : i - 16] != b"PK\x06\x07":
            return total
        # Zip64: the locator (20 bytes before EOCD) points at the zip64 EOCD record.
        offset = struct.unpack_from("<Q", tail, i - 20 + 8)[0]
        if offset > size - 56:
            return None
        f.seek(offset)
        rec = f.read(56)
        if rec[:4] != b"PK\x06\x06":
            return None
        return struct.unpack_from("<Q", rec, 32)[0]


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int) -> io.BytesIO:
    """Stream one member into memory, refusing more than ``cap`` bytes whatever the header says."""
    if info.compress_type not in _READABLE_COMPRESSION:
        method = _COMPRESSION_NAMES.get(info.compress_type, f"method {info.compress_type}")
        raise _Bad(f"is compressed with {method}, which is not accepted; zip it with standard (deflate) compression")
    if info.file_size > cap:
        raise _Bad(f"is {info.file_size} bytes uncompressed, over the limit of {cap}")
    buf = io.BytesIO()
    try:
        with zf.open(info) as src:
            while chunk := src.read(_CHUNK):
                if buf.tell() + len(chunk) > cap:
                    raise _Bad(f"expands beyond {cap} bytes although its header says {info.file_size} (zip bomb?)")
                buf.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as e:
        raise _Bad(f"cannot be read from the zip ({e})") from None
    if buf.tell() != info.file_size:
        raise _Bad(f"holds {buf.tell()} bytes but its header says {info.file_size}")
    buf.seek(0)
    return buf


def _looks_like_text(head: bytes) -> bool:
    """True for UTF-8 (so ASCII) text: audio headers hold NULs or invalid UTF-8 early on."""
    if not head or b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # Not just a character cut at the end of the sample.
            return False
        text = head[: e.start].decode("utf-8")
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return bool(text) and printable >= 0.95 * len(text)


@dataclass(frozen=True)
class _Audio:
    duration_s: float
    sample_rate: int
    channels: int


def _check_audio(buf: io.BytesIO, limits: DatasetLimits) -> tuple[_Audio, list[str]]:
    """Decode fully in blocks; returns facts and warnings, raises _Bad with the reason."""
    head = buf.read(1024)
    buf.seek(0)
    if not head:
        raise _Bad("is an empty file (0 bytes)")
    if _looks_like_text(head):
        raise _Bad("is a text file, not audio (renamed?)")
    try:
        with sf.SoundFile(buf) as f:
            sr, channels = int(f.samplerate), int(f.channels)
            if not limits.min_sample_rate <= sr <= limits.max_sample_rate:
                raise _Bad(f"has sample rate {sr} Hz; accepted {limits.min_sample_rate} to {limits.max_sample_rate} Hz")
            if channels > limits.max_channels:
                raise _Bad(f"has {channels} channels; at most {limits.max_channels} accepted")
            max_frames = int(limits.max_audio_seconds * sr)
            if f.frames > max_frames:
                raise _Bad(f"is {f.frames / sr:.1f} s long; at most {limits.max_audio_seconds:g} s per file")
            frames, peak = 0, 0.0
            for block in f.blocks(blocksize=_AUDIO_BLOCK, dtype="float32", always_2d=True):
                if not np.isfinite(block).all():
                    raise _Bad("contains NaN or infinite samples")
                frames += len(block)
                if frames > max_frames:  # Some headers (mp3, ogg) only estimate the length.
                    raise _Bad(f"is longer than {limits.max_audio_seconds:g} s")
                if len(block):
                    peak = max(peak, float(np.abs(block).max()))
    except _Bad:
        raise
    except sf.LibsndfileError as e:  # Its str() embeds the BytesIO repr; error_string is the reason.
        raise _Bad(f"cannot be decoded as audio ({e.error_string})") from None
    except (RuntimeError, ValueError, TypeError, EOFError) as e:
        raise _Bad(f"cannot be decoded as audio ({e})") from None
    if frames == 0:
        raise _Bad("contains no audio samples")
    duration = frames / sr
    if peak < limits.silence_peak:
        raise _Bad(f"is silent (peak {peak:.1e}, below {limits.silence_peak:g})")
    if duration < limits.min_audio_seconds:
        raise _Bad(f"is too short ({duration:.3f} s; at least {limits.min_audio_seconds:g} s)")
    notes = []
    if duration < limits.short_audio_seconds:
        notes.append(f"is short ({duration:.2f} s); it will be padded with silence to 10.24 s")
    return _Audio(duration, sr, channels), notes


@dataclass(frozen=True)
class _Row:
    row: int
    member: str
    caption: str
    usable: bool  # False when the caption was rejected: the audio is still checked, no item made.


def _check_entries(
    infos: list[zipfile.ZipInfo], limits: DatasetLimits, report: DatasetReport
) -> tuple[dict[str, zipfile.ZipInfo], set[str], set[str]]:
    """Check every zip entry's name, type and declared size; return (safe files, folders, rejected)."""
    files: dict[str, zipfile.ZipInfo] = {}
    dirs: set[str] = set()
    rejected: set[str] = set()
    counts: dict[str, int] = defaultdict(int)
    for info in infos:
        counts[info.filename] += 1
    declared_total = 0
    for info in infos:
        name = info.filename
        is_dir = name.endswith("/")  # ZipInfo.is_dir() fails on an empty name.
        where = f"zip entry {_show(name)}"
        bad = []
        if why := _path_problem(name):
            bad.append(why)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            bad.append("is a symbolic link; links are not allowed, store the file itself")
        elif stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            bad.append("is a special file (device, pipe or socket)")
        if info.flag_bits & 0x1:
            bad.append("is encrypted; encrypted zips are not accepted")
        if counts[name] > 1:
            bad.append(f"appears {counts[name]} times in the zip")
        if not is_dir and info.file_size > limits.max_file_bytes:
            bad.append(f"is {info.file_size} bytes uncompressed, over the limit of {limits.max_file_bytes} per file")
        declared_total += info.file_size
        if bad:
            if counts[name] == 1 or name not in rejected:
                for why in bad:
                    report._add(where, why)
            rejected.add(name)
        elif is_dir:
            dirs.add(name.rstrip("/"))
        else:
            files[name] = info
    if declared_total > limits.max_total_bytes:
        report._add("zip", f"holds {declared_total} bytes uncompressed, over the limit of {limits.max_total_bytes}")
    return files, dirs, rejected


def _read_rows(text: str, limits: DatasetLimits, report: DatasetReport) -> list[_Row] | None:
    """Parse metadata.csv; row problems go to the report. None when rows could not be checked."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as e:
        report._add(_row(1) + " (header)", f"is not valid CSV ({e})")
        return None
    if not header or not any(h.strip() for h in header):
        report._add(_row(1) + " (header)", "is empty; the first row must name the columns 'audio' and 'caption'")
        return None
    names = [h.strip().lower() for h in header]
    index: dict[str, int] = {}
    for col in REQUIRED_COLUMNS:
        if names.count(col) > 1:
            report._add(_row(1) + " (header)", f"names column '{col}' {names.count(col)} times")
        elif col in names:
            index[col] = names.index(col)
        else:
            found = ", ".join(_show(h, 40) for h in header[:10])
            hint = ""
            if len(header) == 1 and (";" in header[0] or "\t" in header[0]):
                hint = "; the file must be comma-separated (this one looks like ';' or tab)"
            report._add(_row(1) + " (header)", f"has no column '{col}' (found {found}){hint}")
    if len(index) < len(REQUIRED_COLUMNS):
        return None

    rows: list[_Row] = []
    seen: dict[tuple[str, str], int] = {}
    row_no = 1
    while True:
        try:
            rec = next(reader, None)
        except csv.Error as e:
            report._add(f"{METADATA_NAME} line {reader.line_num}", f"is not valid CSV ({e})")
            return None
        if rec is None:
            break
        row_no += 1
        if row_no - 1 > limits.max_rows:  # Blank lines count too: millions of them cost time as well.
            report._add(METADATA_NAME, f"has more than {limits.max_rows} rows after the header "
                        f"(stopped reading at row {row_no})")
            return None
        if not any(f.strip() for f in rec):
            continue  # Blank line: counted as a row number, otherwise ignored.
        report.rows += 1
        if len(rec) > len(header) and any(f.strip() for f in rec[len(header) :]):
            report._add(_row(row_no), f"has {len(rec)} fields but the header has {len(header)}; "
                        "quote captions that contain commas", row_no)
        audio = rec[index["audio"]].strip() if index["audio"] < len(rec) else ""
        caption = rec[index["caption"]].strip() if index["caption"] < len(rec) else ""
        row_ok = True
        if not caption:
            report._add(_row(row_no, "caption"), "caption is empty", row_no)
            row_ok = False
        elif len(caption) > limits.max_caption_chars:
            report._add(_row(row_no, "caption"),
                        f"caption is {len(caption)} characters; at most {limits.max_caption_chars}", row_no)
            row_ok = False
        if not audio:
            report._add(_row(row_no, "audio"), "audio path is empty", row_no)
            continue
        if why := _path_problem(audio):
            report._add(_row(row_no, "audio"), f"path {_show(audio)} {why}", row_no)
            continue
        member = "/".join(p for p in audio.split("/") if p not in ("", "."))  # './a//b.wav' -> 'a/b.wav'
        if not member:
            report._add(_row(row_no, "audio"), f"path {_show(audio)} names no file", row_no)
            continue
        if row_ok:
            key = (unicodedata.normalize("NFC", member), caption)
            if key in seen:
                report._add(_row(row_no), f"duplicates row {seen[key]} (same audio and caption)", row_no)
                continue
            seen[key] = row_no
        rows.append(_Row(row_no, member, caption, usable=row_ok))
    return rows


def _resolve_member(
    member: str, files: dict[str, zipfile.ZipInfo], nfc: dict[str, str], dirs: set[str],
    rejected: set[str], by_lower: dict[str, str], by_base: dict[str, list[str]],
) -> tuple[str | None, str | None]:
    """Zip member name for a CSV path, or (None, why not)."""
    if member in files:
        return member, None
    if (m := nfc.get(unicodedata.normalize("NFC", member))) is not None:
        return m, None  # Same name, different Unicode normalisation (macOS zips use NFD).
    if member in rejected:
        return None, "is a zip entry that was rejected (see its problem)"
    if member in dirs:
        return None, "is a folder, not a file"
    hint = ""
    if (m := by_lower.get(member.lower())) is not None:
        hint = f"; did you mean {_show(m)}? (names are case-sensitive)"
    elif cands := by_base.get(PurePosixPath(member).name):
        hint = f"; found {_show(cands[0])}: paths are relative to the zip root"
    return None, f"is not in the zip{hint}"


def validate_dataset(zip_path: Path, limits: DatasetLimits = DatasetLimits()) -> DatasetReport:
    """Check a dataset zip completely and report every problem found; never raises on bad data.

    Problems come zip-level first, then by metadata.csv row. Raises only for misuse:
    ``FileNotFoundError`` when ``zip_path`` is not a file.
    """
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise FileNotFoundError(f"dataset zip not found: {zip_path}")
    report = DatasetReport()
    _validate(zip_path, limits, report)
    for found in (report.problems, report.warnings):
        found.sort(key=lambda p: (p.row is not None, p.row or 0))  # stable: discovery order otherwise
    return report


def _validate(zip_path: Path, limits: DatasetLimits, report: DatasetReport) -> None:
    count = _declared_entry_count(zip_path)
    if count is not None and count > limits.max_files:
        report.zip_entries = count
        report._add("zip", f"has {count} entries; at most {limits.max_files} accepted")
        return
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError,
            struct.error) as e:
        report._add("zip", f"is not a valid zip file ({e})")
        return
    with zf:
        infos = zf.infolist()
        report.zip_entries = len(infos)
        if len(infos) > limits.max_files:
            report._add("zip", f"has {len(infos)} entries; at most {limits.max_files} accepted")
            return
        files, dirs, rejected = _check_entries(infos, limits, report)

        # metadata.csv, at the root only.
        meta = files.get(METADATA_NAME)
        if meta is None:
            if METADATA_NAME not in rejected:
                elsewhere = [n for n in list(files) + list(rejected) if PurePosixPath(n).name.lower() == METADATA_NAME]
                hint = ""
                if elsewhere and "/" not in elsewhere[0]:
                    hint = f"; found {_show(elsewhere[0])}: the name must be exactly {METADATA_NAME}"
                elif elsewhere:
                    hint = (f"; found {_show(elsewhere[0])}: put metadata.csv at the top of the zip "
                            "(zip the folder's contents, not the folder)")
                report._add(METADATA_NAME, f"no {METADATA_NAME} at the root of the zip{hint}")
            return
        try:
            raw = _read_member(zf, meta, limits.max_metadata_bytes).getvalue()
        except _Bad as e:
            report._add(METADATA_NAME, str(e))
            return
        try:
            text = raw.decode("utf-8-sig")  # Accept the BOM that Excel's "CSV UTF-8" writes.
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            report._add(f"{METADATA_NAME} line {line}",
                        f"is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save it as 'CSV UTF-8'")
            return
        rows = _read_rows(text, limits, report)
        if rows is None:
            return

        # Map each row to a member and check every distinct audio member once.
        nfc = {unicodedata.normalize("NFC", n): n for n in files}
        by_lower = {n.lower(): n for n in files}
        by_base: dict[str, list[str]] = defaultdict(list)
        for n in files:
            by_base[PurePosixPath(n).name].append(n)
        checked: dict[str, _Audio | None] = {}
        bytes_read = 0
        for r in rows:
            member, why = _resolve_member(r.member, files, nfc, dirs, rejected, by_lower, by_base)
            if member is None:
                report._add(_row(r.row, "audio"), f"{_show(r.member)} {why}", r.row)
                continue
            if member not in checked:
                checked[member] = None
                where = f"{_show(member)} ({_row(r.row)})"
                suffix = PurePosixPath(member).suffix.lower()
                if suffix not in ACCEPTED_FORMATS:
                    accepted = ", ".join(ACCEPTED_FORMATS)
                    report._add(where, f"has unsupported format {_show(suffix or '(no extension)')}; "
                                f"accepted: {accepted}", r.row)
                    continue
                remaining = limits.max_total_bytes - bytes_read
                try:
                    info = files[member]
                    if info.file_size > remaining:
                        raise _Bad(f"would take the dataset over its limit of {limits.max_total_bytes} bytes")
                    buf = _read_member(zf, info, min(limits.max_file_bytes, remaining))
                    bytes_read += info.file_size
                    audio, notes = _check_audio(buf, limits)
                except _Bad as e:
                    report._add(where, str(e), r.row)
                    continue
                for note in notes:
                    report._warn(where, note, r.row)
                checked[member] = audio
                report.audio_files += 1
                report.total_seconds += audio.duration_s
                report.total_bytes += info.file_size
            audio = checked[member]
            if audio is not None and r.usable:
                info = files[member]
                report.items.append(DatasetItem(
                    r.row, member, r.caption, audio.duration_s, audio.sample_rate, audio.channels,
                    info.file_size, info.CRC,
                ))

        unlisted = [n for n in files if n not in checked and PurePosixPath(n).suffix.lower() in ACCEPTED_FORMATS
                    and not n.startswith("__MACOSX/") and not PurePosixPath(n).name.startswith("._")]
        if unlisted:
            report._warn("zip", f"{len(unlisted)} audio file(s) are not listed in {METADATA_NAME}, "
                         f"e.g. {_show(unlisted[0])}; they are ignored")
        if not report.items and report.ok:
            report._add(METADATA_NAME, "lists no audio files")


def _safe_stem(member: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", PurePosixPath(member).stem)[:60] or "audio"


def extract_dataset(
    zip_path: Path, report: DatasetReport, work_dir: Path, *, partial: bool = False
) -> list[tuple[Path, str]]:
    """Write the report's validated audio members under ``work_dir/audio``; return (path, caption)
    per item, in row order.

    File names are generated (``000000_<stem>.wav``): nothing a user wrote becomes a path. Every
    destination is checked to resolve inside ``work_dir``, files are created exclusively (an existing
    file or symlink there is an error) and each member is streamed with a byte cap equal to the size
    validated. ``partial=True`` extracts the valid items of a report that has problems; otherwise such
    a report is refused. Raises ValueError for misuse, JobError if the zip changed since validation.
    """
    if not report.ok and not partial:
        raise ValueError("refusing to extract a dataset whose report has problems:\n" + report.error_message(10))
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    root = work_dir.resolve(strict=True)
    out_dir = root / "audio"
    out_dir.mkdir(exist_ok=True)
    if not out_dir.resolve(strict=True).is_relative_to(root):
        raise ValueError(f"{out_dir} resolves outside {root}")

    written: dict[str, Path] = {}
    result: list[tuple[Path, str]] = []
    with zipfile.ZipFile(zip_path) as zf:
        infos: dict[str, list[zipfile.ZipInfo]] = defaultdict(list)
        for info in zf.infolist():
            infos[info.filename].append(info)
        for item in report.items:
            if item.member not in written:
                suffix = PurePosixPath(item.member).suffix.lower()
                if _path_problem(item.member) or suffix not in ACCEPTED_FORMATS:
                    raise ValueError(f"item {_show(item.member)} was not validated by validate_dataset")
                found = infos.get(item.member, [])
                if len(found) != 1 or found[0].CRC != item.crc32 or found[0].file_size != item.size_bytes:
                    raise JobError(f"the dataset zip changed after validation ({_show(item.member)})")
                dest = out_dir / f"{len(written):06d}_{_safe_stem(item.member)}{suffix}"
                if not dest.resolve().is_relative_to(root):
                    raise ValueError(f"{dest} resolves outside {root}")
                _copy_capped(zf, found[0], dest, cap=item.size_bytes)
                written[item.member] = dest
            result.append((written[item.member], item.caption))
    return result


def _copy_capped(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, cap: int) -> None:
    copied = 0
    try:
        with zf.open(info) as src, open(dest, "xb") as out:  # "x": never follow or overwrite.
            while chunk := src.read(_CHUNK):
                copied += len(chunk)
                if copied > cap:
                    raise JobError(f"{_show(info.filename)} expands beyond the {cap} bytes validated")
                out.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        dest.unlink(missing_ok=True)
        raise JobError(f"{_show(info.filename)} cannot be read from the zip ({e})") from None
    except JobError:
        dest.unlink(missing_ok=True)
        raise
    if copied != cap:
        dest.unlink(missing_ok=True)
        raise JobError(f"{_show(info.filename)} holds {copied} bytes, {cap} were validated")
