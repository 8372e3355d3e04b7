"""The pinned llama.cpp: where its converter comes from, and the llama-cpp-python wheel the tests use.

One pin for both. llama-cpp-python 0.3.36's sdist vendors llama.cpp at ggml-org/llama.cpp@0c1e57098 (its
CHANGELOG: "update llama.cpp to ggml-org/llama.cpp@0c1e57098"), with `convert_hf_to_gguf.py`, `conversion/`
and `gguf-py/` (gguf 0.19.0). From that one sdist (sha256 checked):
- the converter files are extracted to `.cache/llama.cpp/<revision>/` (`graft export gguf` runs them);
- the llama-cpp-python wheel is built with the machine's cmake and gcc into `.cache/wheels/` and installed
  (the tests load the exported files with it, so llama.cpp's own C++ code checks them).

    python -m export.llama_cpp source            # fetch + extract the converter (seconds)
    python -m export.llama_cpp install [--if-cached]  # + build the wheel once (minutes), pip install it

`.cache/` is in .gitignore; delete it to start over. Nothing here edits llama.cpp's files.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from common.errors import GraftError, input_error

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
REVISION = "0c1e57098"  # ggml-org/llama.cpp commit vendored in that sdist
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# What the converter needs from vendor/llama.cpp/ (its chat templates included); the rest is C++.
_SOURCE_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/templates/", "LICENSE")
# Portable build (no -march=native: the wheel is cached and may run on another CPU); mtmd (multimodal)
# is not needed and is a third of the build.
CMAKE_ARGS = "-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("GRAFT_CACHE", ROOT / ".cache"))
SOURCE_ENV = "GRAFT_LLAMA_CPP"


def default_source() -> Path:
    return Path(os.environ[SOURCE_ENV]) if os.environ.get(SOURCE_ENV) else CACHE / "llama.cpp" / REVISION


def source_dir(path: str | Path | None = None) -> Path:
    """The llama.cpp folder to convert with (given, $GRAFT_LLAMA_CPP, or the cache); error with the fix if absent."""
    src = Path(path) if path else default_source()
    if not (src / "convert_hf_to_gguf.py").is_file() or not (src / "gguf-py" / "gguf").is_dir():
        raise input_error(src, "no llama.cpp converter here (convert_hf_to_gguf.py and gguf-py/ expected)",
                          "run `make llama-cpp` (or `.venv/bin/python -m export.llama_cpp source`) to fetch "
                          f"llama.cpp {REVISION} from the {PACKAGE} {VERSION} sdist, or pass --llama-cpp DIR "
                          "(a llama.cpp checkout)")
    return src


def _sha256(path: Path) -> str:
    from common.io import file_sha256

    return file_sha256(path)


def sdist(download: bool = True) -> Path | None:
    """The pinned sdist in the cache (downloaded with pip when missing and `download`), sha256 checked."""
    path = CACHE / "sdist" / SDIST
    if not path.is_file():
        if not download:
            return None
        print(f"downloading {PACKAGE}=={VERSION} (sdist, ~77 MB) into {path.parent}", file=sys.stderr, flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"{PACKAGE}=={VERSION}", "-d", str(path.parent)], check=True)
    if (got := _sha256(path)) != SDIST_SHA256:
        raise input_error(path, f"sha256 {got} is not the pinned {SDIST_SHA256}",
                          "delete the file and run `make llama-cpp` again")
    return path


def extract_source(download: bool = True) -> Path | None:
    """`.cache/llama.cpp/<revision>/`: the converter files of the pinned sdist (None: not cached, no download)."""
    from common.io import atomic_path

    dest = CACHE / "llama.cpp" / REVISION
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    tar_path = sdist(download)
    if tar_path is None:
        return None
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    with tarfile.open(tar_path) as tar, atomic_path(dest) as tmp:
        members = []
        for m in tar.getmembers():
            rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
            if rel and (m.isfile() or m.isdir()) and any(rel == p or rel.startswith(p) for p in _SOURCE_PARTS):
                m.name = rel
                members.append(m)
        tar.extractall(tmp, members=members, filter="data")
        (tmp / "REVISION").write_text(f"ggml-org/llama.cpp@{REVISION} (vendored in {PACKAGE} {VERSION} sdist, "
                                      f"sha256 {SDIST_SHA256})\n")
    return dest


def vocab_file(name: str, download: bool = False) -> Path | None:
    """llama.cpp's vocab-only file `models/ggml-vocab-NAME.gguf` (e.g. "llama-bpe": Llama-3, "qwen2") with its
    `.inp`/`.out` reference cases (ids written by the Hugging Face tokenizer), extracted from the pinned sdist into
    `.cache/llama.cpp/<revision>/models/`; None when the sdist is not cached (and not `download`)."""
    from common.io import atomic_path

    dest = CACHE / "llama.cpp" / REVISION / "models"
    path = dest / f"ggml-vocab-{name}.gguf"
    names = [path.name, f"{path.name}.inp", f"{path.name}.out"]
    if all((dest / n).is_file() for n in names):
        return path
    tar_path = sdist(download)
    if tar_path is None:
        return None
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/models/"
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path) as tar:
        for n in names:
            try:
                member = tar.getmember(prefix + n)
            except KeyError:
                raise input_error(tar_path, f"has no models/{n}", "vocab files it holds: "
                                  + ", ".join(sorted(m.name[len(prefix) + 11:-5] for m in tar.getmembers()
                                                     if m.name.startswith(prefix + "ggml-vocab-")
                                                     and m.name.endswith(".gguf")))) from None
            with tar.extractfile(member) as src, atomic_path(dest / n) as tmp:
                tmp.write_bytes(src.read())
    return path


def wheel(build: bool = True, jobs: int = 2) -> Path | None:
    """The llama-cpp-python wheel in `.cache/wheels/` (built from the pinned sdist when missing and `build`)."""
    wheels = CACHE / "wheels"
    found = sorted(wheels.glob(f"llama_cpp_python-{VERSION}-*.whl"))
    if found:
        return found[-1]
    if not build:
        return None
    tar_path = sdist(download=True)
    print(f"building {PACKAGE} {VERSION} (llama.cpp {REVISION}) with CMAKE_ARGS='{CMAKE_ARGS}', {jobs} jobs; "
          f"this takes minutes (7-9 min at 2 jobs on a busy 2-core machine). Log: {wheels / 'build.log'}",
          file=sys.stderr, flush=True)
    wheels.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(jobs)}
    started = time.time()
    with open(wheels / "build.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", str(tar_path),
                                 "-w", str(wheels)], env=env, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            time.sleep(30)
            print(f"  ... building, {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    if proc.returncode != 0:
        raise input_error(wheels / "build.log", f"building {PACKAGE} failed (exit {proc.returncode})",
                          "read the end of the log; the build needs cmake >= 3.21, gcc/g++ and network for "
                          "pip's build requirements (scikit-build-core)")
    seconds = time.time() - started
    (wheels / "build-time.txt").write_text(f"{seconds:.0f} s, {jobs} jobs, CMAKE_ARGS={CMAKE_ARGS}\n")
    print(f"built in {seconds / 60:.1f} min", file=sys.stderr, flush=True)
    return wheel(build=False)


def installed() -> str | None:
    from importlib import metadata

    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def install(if_cached: bool = False) -> bool:
    """Converter source + wheel (built once) installed into this interpreter's environment."""
    if extract_source(download=not if_cached) is None:
        print(f"llama.cpp: no cached {SDIST}; `make llama-cpp` fetches it (tests that need it are skipped)",
              file=sys.stderr)
        return False
    whl = wheel(build=not if_cached)
    if whl is None:
        print(f"llama.cpp: no cached {PACKAGE} wheel; `make llama-cpp` builds it (tests that need it are skipped)",
              file=sys.stderr)
        return False
    if installed() != VERSION:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", str(whl)], check=True)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.llama_cpp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("source", "wheel", "install"))
    p.add_argument("--if-cached", action="store_true", help="use only what is in .cache/: download and build nothing")
    p.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default: 2)")
    ns = p.parse_args(argv)
    try:
        if ns.what == "source":
            print(extract_source(download=not ns.if_cached) or "not cached")
        elif ns.what == "wheel":
            print(wheel(build=not ns.if_cached, jobs=ns.jobs) or "not cached")
        else:
            install(ns.if_cached)
    except GraftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"error: {' '.join(map(str, e.cmd))} failed with exit {e.returncode}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
