"""The ``tess`` command: every workflow step is a subcommand, every flag derives from a config dataclass, and
each default and help text has one home."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re

import pytest

import train_vae
from pipeline.cli import build_parser
from pipeline.config import CACHE_DIR_HELP, ClientOptions, FetchConfig, TrainConfig
from pipeline.flags import CLIENT_FLAGS, FETCH_FLAGS, FETCH_NOT_FLAGS, TRAIN_FLAGS
from pipeline.modes import DeviceKind, LabelRule, OnBadSample, PackMode, RetryMode, Source, SyncPolicy
from tests.helpers import run_cli

COMMANDS = ["fetch", "train", "demo", "serve", "verify", "stats", "clean-cache", "upload"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def test_the_tess_command_has_every_workflow_step():
    assert list(_subparsers(build_parser())) == COMMANDS


def test_tess_train_has_exactly_the_flags_of_train_vae():
    mine = {
        d: (a.option_strings, a.default, a.choices) for d, a in _actions(_subparsers(build_parser())["train"]).items()
    }
    theirs = {d: (a.option_strings, a.default, a.choices) for d, a in _actions(train_vae.build_parser()).items()}
    assert mine == theirs


@pytest.mark.parametrize(
    ("cls", "table", "skip", "command"),
    [
        (FetchConfig, FETCH_FLAGS, FETCH_NOT_FLAGS, "fetch"),
        (ClientOptions, CLIENT_FLAGS, (), "fetch"),
        (TrainConfig, TRAIN_FLAGS, (), "train"),
    ],
    ids=["FetchConfig", "ClientOptions", "TrainConfig"],
)
def test_every_field_has_one_flag_with_the_fields_default(cls, table, skip, command, monkeypatch):
    monkeypatch.delenv("CACHE_MAX_BYTES", raising=False)
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip]
    assert sorted(table) == sorted(f.name for f in fields), f"{cls.__name__}: a field without a flag, or a stray flag"
    actions = _actions(_subparsers(build_parser())[command])
    for f in fields:
        default = None if f.default is dataclasses.MISSING else f.default
        default = ",".join(default) if isinstance(default, tuple) else default
        assert actions[f.name].default == default, f"--{f.name.replace('_', '-')} default differs from {cls.__name__}"


# Each mode flag: its choices are its enum's values, and its default a member of it.
MODE_FLAGS = [
    ("fetch", "sync", SyncPolicy),
    ("fetch", "labels", LabelRule),
    ("fetch", "retry_mode", RetryMode),
    ("train", "source", Source),
    ("train", "pack", PackMode),
    ("train", "on_bad_sample", OnBadSample),
    ("train", "labels", LabelRule),
]


@pytest.mark.parametrize(("command", "dest", "kind"), MODE_FLAGS, ids=[f"{c}-{d}" for c, d, _ in MODE_FLAGS])
def test_mode_flags_offer_their_enums_values(command, dest, kind):
    action = _actions(_subparsers(build_parser())[command])[dest]
    assert list(action.choices) == [m.value for m in kind]
    assert kind(action.default) in kind


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": "ftp"}, "source='ftp' must be one of cache, s3 (--source)"),
        ({"pack": "maybe"}, "pack='maybe' must be one of auto, on, off (--pack)"),
        ({"on_bad_sample": "ignore"}, "on_bad_sample='ignore' must be one of stop, skip (--on-bad-sample)"),
    ],
)
def test_a_bad_mode_names_its_value_and_the_choices(kwargs, message):
    with pytest.raises(ValueError) as e:
        TrainConfig(**kwargs)
    assert str(e.value) == message


def test_modes_become_members_and_the_device_its_kind():
    c = TrainConfig(source="s3", pack="off", on_bad_sample="skip", device="cuda:1")
    assert (c.source, c.pack, c.on_bad_sample, c.device_kind) == (
        Source.S3,
        PackMode.OFF,
        OnBadSample.SKIP,
        DeviceKind.CUDA,
    )
    assert FetchConfig(prefix="s3://bkt/p/", sync="per-blob").sync is SyncPolicy.PER_BLOB


def test_mirror_settings_take_their_defaults_from_client_options():
    from pipeline.fetch.mirror import MirrorSettings

    d, m = ClientOptions(), MirrorSettings()
    assert (m.concurrency, m.max_attempts) == (d.max_in_flight, d.max_attempts)
    o = ClientOptions(max_in_flight=7, max_attempts=2)
    assert (MirrorSettings.from_options(o).concurrency, MirrorSettings.from_options(o).max_attempts) == (7, 2)


def test_the_older_flag_name_still_sets_objects_in_flight():
    args = build_parser().parse_args(["fetch", "s3://bkt/p/", "--max-connections", "9"])
    assert args.max_in_flight == 9


def test_every_cache_dir_flag_has_the_one_help_text():
    helps = {}
    for name, sub in [*_subparsers(build_parser()).items(), ("train_vae.py", train_vae.build_parser())]:
        action = _actions(sub).get("cache_dir")
        if action is not None:
            helps[name] = action.help
    assert sorted(helps) == sorted(["fetch", "train", "demo", "verify", "stats", "clean-cache", "train_vae.py"])
    assert set(helps.values()) == {CACHE_DIR_HELP}
    assert "$TESS_CACHE_DIR" in CACHE_DIR_HELP and "$XDG_CACHE_HOME" in CACHE_DIR_HELP


@pytest.mark.slow
def test_tess_demo_fetches_the_demo_set_trains_and_names_its_pictures(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    proc = run_cli(
        "demo", "--demo", "48", "-e", "1", "--cache-dir", str(cache), "--out", str(out), "--no-progress", timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert "fetched 48" in proc.stdout
    assert f"pictures: {out / 'reconstructions.png'}" in proc.stdout
    for name in ("reconstructions.png", "samples.png", "loss.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    assert len(list((cache / "manifests").glob("*.jsonl"))) == 1


def _literals(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_every_make_hint_in_a_message_also_names_the_tess_command():
    """A message that tells the user to run `make ...` gives the `tess ...` form beside it (the hints of
    pipeline.hints build both; the fixed ones are written out)."""
    from tests.helpers import ROOT

    lonely = []
    for path in sorted([*(ROOT / "cache").rglob("*.py"), *(ROOT / "pipeline").rglob("*.py")]):
        for line, text in _literals(ast.parse(path.read_text())):
            if re.search(r"run `make \w", text) and "`tess " not in text:
                lonely.append(f"{path.relative_to(ROOT)}:{line}: {text.strip()[:80]}")
    assert not lonely, "hints with only the make form: " + "; ".join(lonely)
