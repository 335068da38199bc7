"""onnxruntime-web for the demo page's in-browser mask decoder, fetched from the npm registry.

``blvit-demo --install-web-runtime`` runs ``npm pack onnxruntime-web@VERSION`` (npm checks the
package's integrity hash) and keeps the three files the page needs: ``ort.wasm.min.js`` (the
WebAssembly-only build of the JavaScript API), ``ort-wasm-simd-threaded.mjs`` and its ``.wasm``.
They go to a per-user cache folder (``$BLVIT_WEB_RUNTIME_DIR``, default
``~/.cache/blvit/onnxruntime-web-VERSION``), not into the package or the repository (15 MB of
binaries), and the demo server serves them under ``/vendor/onnxruntime-web/``.
"""
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

VERSION = "1.31.1"
FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")


class WebRuntimeError(RuntimeError):
    """onnxruntime-web could not be installed (no npm, no registry, a broken package)."""


def runtime_dir(version: str = VERSION) -> Path:
    """Where the runtime's files live."""
    configured = os.environ.get("BLVIT_WEB_RUNTIME_DIR")
    if configured:
        return Path(configured)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "blvit" / f"onnxruntime-web-{version}"


def is_installed(folder: Optional[Path] = None) -> bool:
    folder = folder or runtime_dir()
    return all((folder / name).is_file() and (folder / name).stat().st_size > 0 for name in FILES)


def install(version: str = VERSION, folder: Optional[Path] = None, timeout: float = 600.0) -> Path:
    """Fetch onnxruntime-web ``version`` with npm and keep the page's files in ``folder``."""
    folder = folder or runtime_dir(version)
    if is_installed(folder):
        return folder
    npm = shutil.which("npm")
    if npm is None:
        raise WebRuntimeError("npm is not on PATH: install Node.js (it brings npm), then run "
                              "blvit-demo --install-web-runtime again")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run([npm, "pack", f"onnxruntime-web@{version}", "--silent"], cwd=tmp, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise WebRuntimeError(f"npm pack onnxruntime-web@{version} took over {timeout:.0f} s") from err
        tarballs = list(Path(tmp).glob("onnxruntime-web-*.tgz"))
        if done.returncode != 0 or not tarballs:
            raise WebRuntimeError(f"npm pack onnxruntime-web@{version} failed (exit {done.returncode}): "
                                  f"{(done.stderr or done.stdout).strip()[-400:]}")
        staging = Path(tmp) / "files"
        staging.mkdir()
        with tarfile.open(tarballs[0]) as archive:
            members = {m.name: m for m in archive.getmembers()}
            for name in FILES:
                member = members.get(f"package/dist/{name}")
                if member is None or not member.isfile():
                    raise WebRuntimeError(f"{tarballs[0].name}: has no dist/{name}")
                with archive.extractfile(member) as src, open(staging / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        folder.mkdir(parents=True, exist_ok=True)
        for name in FILES:  # each file appears whole or not at all
            shutil.move(str(staging / name), str(folder / f".{name}.part"))
            os.replace(folder / f".{name}.part", folder / name)
    return folder
