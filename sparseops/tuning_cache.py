"""The machine a measurement belongs to, and the file that keeps measurements (sparseops.tuning):
one JSON file per machine in the user's cache directory, written atomically, ignored with a warning
where it cannot be read."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import tempfile
import warnings
from pathlib import Path

import torch

from ._library import cpu_isa

FORMAT = 1


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def _fixed_machine() -> tuple:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("sparseops")
    except PackageNotFoundError:
        ours = "source"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return (("cpu", _cpu_model()), ("gpu", gpu), ("torch", torch.__version__), ("sparseops", ours))


def _varying() -> tuple:
    return cpu_isa(), torch.get_num_threads()


def machine() -> dict:
    """What a measurement depends on besides the call: CPU model and ISA in use, threads, GPU,
    torch and sparseops versions."""
    isa, threads = _varying()
    return {**dict(_fixed_machine()), "isa": isa, "threads": threads}


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def cache_dir() -> Path:
    if os.environ.get("SPARSEOPS_CACHE_DIR"):
        return Path(os.environ["SPARSEOPS_CACHE_DIR"])
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("sparseops"))
    except ImportError:  # platformdirs is a dependency; a bare environment still gets XDG's rule
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparseops"


def cache_file(info: dict | None = None) -> Path:
    info = info or machine()
    digest = hashlib.sha1(json.dumps(info, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"tuning-{digest}.json"


class _Cache:
    """Winners per key: in memory, loaded from and saved to the machine's file."""

    def __init__(self):
        self.entries: dict[str, dict] | None = None
        self.path: Path | None = None
        self.machine_key: str | None = None
        self.varying: tuple | None = None
        self.guarded: set[tuple[str, str]] = set()  # (layer, impl) checked against dense in this process
        self.warm: set[tuple[str, str]] = set()  # (layer, impl) run once in this process: no warm-up needed
        self.excluded: dict[str, set[str]] = {}  # layer -> implementations the guard caught
        self.pinned: dict[str, str] = {}  # key -> what runs under saved-tensor hooks (checkpointing)
        self.warned: set[tuple[str, str]] = set()
        self.measured_s = 0.0  # time spent measuring in this process
        self.touched: list[str] = []  # keys measured, in order
        self.exploring: dict = {}  # key -> tuning_sample.Measuring, for keys being measured now

    def load(self) -> dict[str, dict]:
        varying = _varying()  # cheap; the rest of the machine does not change in a process
        if self.entries is not None and varying == self.varying:
            return self.entries
        info = machine()
        self.varying, self.machine_key, self.path, self.entries = varying, json.dumps(info, sort_keys=True), \
            cache_file(info), {}
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
                raise ValueError("unknown format")
            self.entries = {k: v for k, v in data["entries"].items() if isinstance(v, dict) and "winner" in v}
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            warnings.warn(f"sparseops: ignoring the tuning cache {self.path}: it cannot be read ({exc})",
                          stacklevel=4)
        return self.entries

    def save(self) -> None:
        if self.path is None or self.entries is None:
            return
        data = {"format": FORMAT, "machine": json.loads(self.machine_key), "entries": self.entries}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tuning-", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)  # atomic: a reader sees the old file or the new one
        except OSError as exc:
            warnings.warn(f"sparseops: cannot write the tuning cache {self.path}: {exc}", stacklevel=4)
