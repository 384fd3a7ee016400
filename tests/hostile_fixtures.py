"""Helpers for the hostile-input suite: run the CLI in-process, check the one-line rule, tmpfs mounts.

    code, err = run_cli(capsys, "plan", "14b", "--format", "int8", "--vram", "nan")
    assert_one_line(code, err, "must be a finite number")
    with small_tmpfs(tmp_path / "disk", "256k") as disk: ...     # skips without root / mount
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from media_fixtures import write_photo, write_speech

from liveavatar_lite.cli import main


def use_backend(monkeypatch: pytest.MonkeyPatch, backend: object) -> None:
    """`generate` (the command and `pipeline.generate`) renders with `backend` instead of loading an artifact."""
    from liveavatar_lite.pipeline.pipeline import Pipeline

    monkeypatch.setattr(Pipeline, "from_options",
                        classmethod(lambda cls, options, size=None: cls(backend, options.progress)))


FAKE_BACKEND_CHILD = """
import sys
sys.path.insert(0, {tests!r})
from liveavatar_lite.pipeline.pipeline import Pipeline
from test_generate import FakeBackend
Pipeline.from_options = classmethod(lambda cls, o, size=None: cls(FakeBackend(delay={delay}), o.progress))
from liveavatar_lite.cli import main
sys.exit(main({argv!r}))
"""  # a `liveavatar-lite ARGV` process whose renders use test_generate's FakeBackend


def write_media(root: Path) -> Path:
    """The good inputs the hostile suites start from, in `root`: photo.png and a 2-clip speech.wav; `root`."""
    write_photo(root / "photo.png")
    write_speech(root / "speech.wav", 2.0)  # 2 clips
    return root


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """(exit code, stderr) of `liveavatar-lite ARGV`, in this process (argparse exits become codes)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse refuses a flag
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, match: str = "", exit_code: int | None = None) -> None:
    """The rule for every bad input: non-zero exit, exactly one line on stderr, no traceback."""
    lines = [line for line in err.splitlines() if not line.startswith(("INFO ", "WARNING "))]
    assert code != 0, f"exit 0; stderr: {err}"
    if exit_code is not None:
        assert code == exit_code, (code, err)
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert "Traceback" not in err and lines[0].startswith("liveavatar-lite"), err
    assert match in lines[0], f"{match!r} not in {lines[0]!r}"


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` (unmounted after); skips the test without root or mount."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (full-disk cases)")
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, options: str) -> None:
    """Change a tmpfs mounted by small_tmpfs, e.g. remount(disk, "size=64m") to 'free space'."""
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True)


def fill_disk(where: Path, leave: int) -> Path:
    """Fill the file system at `where` until about `leave` bytes are free; the filler file's path."""
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    filler = where / ".filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


# ------------------------------------------------------------------------------------------ .pth files

def write_pth(path: Path, tensors: dict[str, tuple[str, int, int, tuple, tuple, bytes]],
              evil: tuple[str, str, str] | None = None, compress: bool = False) -> Path:
    """A torch.save-style zip: {key: (storage class, numel, offset, size, stride, raw bytes)}.

    The pickle is written opcode by opcode (protocol 2), so any field can be made hostile;
    `evil=(module, name, arg)` adds an entry whose value calls module.name(arg) when unpickled.
    """
    out = bytearray(b"\x80\x02")  # PROTO 2

    def glob(module: str, name: str) -> None:
        out.extend(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def pyint(v: int) -> None:
        if -(2**31) <= v < 2**31:
            out.extend(b"J" + int(v).to_bytes(4, "little", signed=True))  # BININT
        else:
            raw = int(v).to_bytes((int(v).bit_length() + 8) // 8, "little", signed=True)
            out.extend(b"\x8a" + bytes([len(raw)]) + raw)  # LONG1

    def pystr(v: str) -> None:
        out.extend(b"X" + len(v.encode()).to_bytes(4, "little") + v.encode())

    glob("collections", "OrderedDict")
    out.extend(b")R")  # EMPTY_TUPLE, REDUCE -> OrderedDict()
    out.extend(b"(")  # MARK for SETITEMS
    for i, (key, (cls, numel, offset, size, stride, _raw)) in enumerate(tensors.items()):
        pystr(key)
        glob("torch._utils", "_rebuild_tensor_v2")
        out.extend(b"(")  # MARK: args tuple
        out.extend(b"(")  # MARK: persistent id tuple
        pystr("storage")
        glob("torch", cls)
        pystr(str(i))
        pystr("cpu")
        pyint(numel)
        out.extend(b"tQ")  # TUPLE, BINPERSID
        pyint(offset)
        out.extend(b"(")
        for s in size:
            pyint(s)
        out.extend(b"t(")
        for s in stride:
            pyint(s)
        out.extend(b"t")
        out.extend(b"\x89")  # NEWFALSE
        glob("collections", "OrderedDict")
        out.extend(b")R")
        out.extend(b"tR")  # TUPLE (args), REDUCE
    if evil is not None:
        pystr("evil")
        glob(evil[0], evil[1])
        out.extend(b"(")
        pystr(evil[2])
        out.extend(b"tR")
    out.extend(b"u.")  # SETITEMS, STOP
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", bytes(out))
        zf.writestr("archive/version", "3\n")
        for i, (_key, entry) in enumerate(tensors.items()):
            zf.writestr(zipfile.ZipInfo(f"archive/data/{i}"), entry[5], compress_type=mode)
    return path
