"""Start-up: each command imports only what it uses.

``tess fetch --help`` must answer without numpy, boto3, torch, tqdm or the mirror's event
loop; ``import cache`` must import no submodule (and so no numpy) while every name of ``cache.__all__``
stays importable; a re-fetch of a prefix the cache already holds (LIST only, no GET) must import neither
boto3 nor torch nor PIL. Each check runs a fresh interpreter (this test process has imported everything) and
reads its ``sys.modules``; a failure names the module and the chain of imports that brought it in (from
``-X importtime``). Wall times vary with the machine's load: they are measured by hand (best of 5), never
asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

_MARK = "@@startup-modules@@"
# Runs ``-m MODULE ARGS...`` (as ``python -m`` does) or a statement, then reports sys.modules on stderr.
_PROBE = rf"""
import json, runpy, sys
what, *args = sys.argv[1:]
code = 0
try:
    if what == "-m":
        sys.argv = list(args)
        runpy.run_module(args[0], run_name="__main__", alter_sys=True)
    else:
        exec(what, {{}})
except SystemExit as e:
    code = e.code
sys.stderr.write("\n{_MARK}" + json.dumps({{"code": code, "modules": sorted(sys.modules)}}) + "\n")
"""

# Third-party packages too slow to import for nothing (0.05-0.3 s each).
HEAVY = ("boto3", "botocore", "numpy", "torch", "diskcache", "PIL", "tqdm")


class Probe:
    """What one fresh interpreter imported: its exit code, output and modules, and who imported what."""

    def __init__(self, *argv: str) -> None:
        self.argv = argv
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", _PROBE, *argv],
            cwd=ROOT,
            env=os.environ,
            capture_output=True,
            text=True,
            timeout=120,
        )
        head, sep, tail = proc.stderr.rpartition(_MARK)
        assert sep, f"the probe of {argv} did not finish (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
        report = json.loads(tail)
        self.code = report["code"]
        self.modules = set(report["modules"])
        self.stdout = proc.stdout
        self.stderr = "\n".join(line for line in head.splitlines() if not line.startswith("import time:"))
        self._importtime = [
            line for line in head.splitlines() if line.startswith("import time:") and "[us]" not in line
        ]

    def chain(self, module: str) -> str:
        """``module <- its importer <- ...`` for the first import of ``module``, from ``-X importtime``
        (which prints a module after everything it imported, one indent deeper)."""
        rows = []
        for line in self._importtime:
            name = line.split("|", 2)[2]
            rows.append((len(name) - len(name.lstrip()), name.strip()))
        names = [n for _, n in rows]
        first = (
            names.index(module)
            if module in names
            else next((i for i, n in enumerate(names) if n.startswith(module + ".")), None)
        )
        for i, (depth, name) in enumerate(rows):
            if i == first:
                out = [name]
                for d, n in rows[i + 1 :]:
                    if d < depth:
                        out.append(n)
                        depth = d
                return " <- ".join(out)
        return module

    def assert_not_imported(self, module: str, why: str) -> None:
        loaded = sorted(m for m in self.modules if m == module or m.startswith(module + "."))
        assert not loaded, (
            f"{' '.join(self.argv)!r} imported {module} ({why}): {self.chain(module)}; "
            f"import it inside the function that uses it"
        )


@pytest.fixture(scope="module")
def fetch_help() -> Probe:
    probe = Probe("-m", "pipeline", "fetch", "--help")
    assert probe.code == 0, probe.stderr
    assert "--max-cache-bytes" in probe.stdout and "--sync {per-blob,before-manifest}" in probe.stdout
    return probe


# Beside HEAVY: asyncio and the mirror (~60 ms: the event loop, thread pools, the body checks), the fetch
# stage itself, and the manifest format (numpy).
@pytest.mark.parametrize(
    "module", [*HEAVY, "asyncio", "pipeline.fetch.mirror", "pipeline.fetch.stage", "cache.manifest"]
)
def test_fetch_help_imports_only_the_parser(fetch_help, module):
    fetch_help.assert_not_imported(module, "parsing `fetch --help` needs only argparse and pipeline.config")


@pytest.fixture(scope="module")
def parser_exit() -> dict[tuple[str, ...], Probe]:
    """One probe per command line, run on first use."""
    return {}


# Command lines that the parser answers alone, with their exit codes (2: argparse's error).
PARSER_EXITS = [
    (("--help",), 0),
    (("upload", "--help"), 0),
    (("verify", "--help"), 0),
    (("fetch", "--workers", "x"), 2),
]


@pytest.mark.parametrize(("argv", "code"), PARSER_EXITS, ids=[" ".join(a) for a, _ in PARSER_EXITS])
@pytest.mark.parametrize("module", ["boto3", "botocore", "numpy", "torch", "tqdm"])
def test_other_parser_exits_import_nothing_heavy(parser_exit, argv, code, module):
    if argv not in parser_exit:
        parser_exit[argv] = Probe("-m", "pipeline", *argv)
    probe = parser_exit[argv]
    assert probe.code == code, probe.stderr
    probe.assert_not_imported(module, "the parser alone answered")


@pytest.fixture(scope="module")
def bare_cache() -> Probe:
    probe = Probe("import cache")
    assert probe.code == 0, probe.stderr
    return probe


@pytest.mark.parametrize("module", [*HEAVY, "cache.shard", "cache.manifest", "cache.blobs", "cache.index"])
def test_import_cache_imports_no_submodule(bare_cache, module):
    bare_cache.assert_not_imported(module, "cache/__init__.py exports its names lazily")


# Every name cache/__init__.py exported before its exports became lazy, with the module defining it.
CACHE_EXPORTS = {
    "GC_LOCK": "cache.locks",
    "MANIFEST_FORMAT": "cache.manifest",
    "BlobStore": "cache.blobs",
    "BodyCheckError": "cache.checks",
    "CacheLayout": "cache.layout",
    "ManifestArrays": "cache.manifest",
    "ManifestHeader": "cache.manifest",
    "ManifestRecord": "cache.manifest",
    "S3Uri": "cache.uri",
    "ShardSpec": "cache.shard",
    "atomic_write_bytes": "cache.atomic",
    "atomic_writer": "cache.atomic",
    "default_cache_dir": "cache.layout",
    "latest_manifest": "cache.manifest",
    "list_manifests": "cache.manifest",
    "load_manifest": "cache.manifest",
    "manifest_name": "cache.manifest",
    "manifests_of": "cache.manifest",
    "read_key_list": "cache.manifest",
    "read_manifest_header": "cache.manifest",
    "write_manifest": "cache.manifest",
}

_STAR = """
import importlib, json, sys
import cache
ns = {}
exec("from cache import *", ns)
expected = json.loads(sys.argv[-1])
print(json.dumps({
    "all": sorted(cache.__all__),
    "bound": sorted(n for n in ns if not n.startswith("__")),
    "same": sorted(n for n, m in expected.items() if n in ns and ns[n] is getattr(importlib.import_module(m), n)),
    "dir": sorted(dir(cache)),
}))
"""


@pytest.fixture(scope="module")
def star_import() -> dict[str, list[str]]:
    proc = subprocess.run(
        [sys.executable, "-c", _STAR, json.dumps(CACHE_EXPORTS)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_cache_all_is_unchanged(star_import):
    assert star_import["all"] == sorted(CACHE_EXPORTS)
    assert star_import["bound"] == sorted(CACHE_EXPORTS), "`from cache import *` binds exactly __all__"


@pytest.mark.parametrize("name", sorted(CACHE_EXPORTS))
def test_every_cache_export_resolves(star_import, name):
    assert name in star_import["same"], (
        f"`from cache import *` in a fresh interpreter did not bind {name} to {CACHE_EXPORTS[name]}.{name}"
    )
    assert name in star_import["dir"], f"dir(cache) lacks {name}"


def test_cache_unknown_name_is_an_attribute_error():
    import cache

    with pytest.raises(AttributeError, match="no_such_name"):
        cache.no_such_name  # noqa: B018
    assert not hasattr(cache, "shard_mask"), "only __all__ is exported from the package"


def test_sync_flag_values_are_the_mirrors():
    """``--sync`` is built from pipeline.config (cheap); the mirror applies pipeline.fetch.mirror's SyncPolicy:
    both must name the same policies and default."""
    from pipeline.cli import build_parser
    from pipeline.config import DEFAULT_SYNC, SyncPolicy
    from pipeline.fetch.mirror import MirrorSettings
    from pipeline.fetch.mirror import SyncPolicy as MirrorSync

    assert [p.value for p in SyncPolicy] == [p.value for p in MirrorSync]
    assert DEFAULT_SYNC.value == MirrorSettings().sync.value
    assert build_parser().parse_args(["fetch"]).sync == MirrorSettings().sync.value


# --- a re-fetch that finds every object cached: LIST only, none of boto3, torch or PIL -------------------


@pytest.fixture(scope="module")
def noop_refetch(s3_server, tmp_path_factory) -> Probe:
    from pipeline.demo.server import seed_objects

    bucket = "tess-startup"
    seed_objects(bucket, [(f"imgs/{i:03d}_{i % 3}.png", b"\x89PNG not really %d" % i) for i in range(20)])
    cache_dir = str(tmp_path_factory.mktemp("startup-cache"))
    argv = (
        "fetch",
        f"s3://{bucket}/imgs/",
        "--endpoint",
        s3_server.endpoint,
        "--cache-dir",
        cache_dir,
        "--no-progress",
    )
    first = subprocess.run(
        [sys.executable, "-m", "pipeline", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert first.returncode == 0, first.stderr
    s3_server.reset_counts()
    probe = Probe("-m", "pipeline", *argv)
    assert probe.code == 0, probe.stderr
    assert "fetched 0, already cached 20" in probe.stdout, probe.stdout
    assert s3_server.counts["GET"] == 0 and s3_server.counts["LIST"] == 1, s3_server.counts
    return probe


# boto3/botocore: fetch signs its own requests (credentials from the environment here); torch and the
# datasets: workers=0 never starts a DataLoader; PIL: fetch stores bytes, it never decodes them.
@pytest.mark.parametrize(
    "module", ["boto3", "botocore", "torch", "PIL", "pipeline.data.datasets", "pipeline.demo.demo_set"]
)
def test_noop_refetch_imports_nothing_it_does_not_use(noop_refetch, module):
    noop_refetch.assert_not_imported(module, "every listed object was cached: LIST only, no GET")
