"""One label rule per listing (issue 16): chosen once over the whole listing, printed, recorded in the manifest,
and what training does with it (as recorded, or recomputed when --labels names another rule)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from cache import BlobStore, CacheLayout, load_manifest, read_manifest_header, write_manifest
from cache.manifest import ManifestRecord
from pipeline.config import LabelRule, TrainConfig
from pipeline.data.datasets import DSSDataset
from pipeline.fetch.labels import assign_labels, folder_class, label_from_name
from pipeline.fetch.listing import Listing
from pipeline.fetch.stage import FetchConfig, fetch
from pipeline.train.distributed import DistState
from pipeline.train.sources import build_source, manifest_labels
from pipeline.transport.listing import ObjectInfo
from tests.conftest import png_bytes
from tests.helpers import ROOT, run_cli

MIXED = ["p/big/a.png", "p/odd/b.png", "p/flat_0.png", "p/flat_1.png", "p/loose.png"]
MIXED_WHY = (
    "labels: none (3 of 5 image keys lie in no class folder and 3 have no _<int> suffix; "
    "pass --labels folder or suffix to force one)"
)


def _labels(keys, prefix="p/", rule=LabelRule.AUTO):
    labelled = assign_labels(keys, prefix, rule)
    return labelled.values.tolist(), labelled.classes, labelled.choice


@pytest.mark.parametrize(
    ("keys", "prefix", "labels", "classes", "line"),
    [
        # Camera and phone names in class folders: the folder is the class, the _<int> is no label.
        (
            ["cat/IMG_1234.jpg", "dog/DSC_0_7.png"],
            "",
            [0, 1],
            ("cat", "dog"),
            "labels: folder (2 classes: cat, dog; every image key lies in a class folder)",
        ),
        (
            ["ph/cat/IMG_1234.jpg", "ph/dog/DSC_0042.JPG", "ph/fox/PXL_20240101_123456.jpg"],
            "ph/",
            [0, 1, 2],
            ("cat", "dog", "fox"),
            "labels: folder (3 classes: cat, dog, fox; every image key lies in a class folder)",
        ),
        # Nested folders: the class is the first folder below the prefix.
        (
            ["p/a/x/1.png", "p/b/y/z/2.png", "p/a/3.png"],
            "p/",
            [0, 1, 0],
            ("a", "b"),
            "labels: folder (2 classes: a, b; every image key lies in a class folder)",
        ),
        # A flat research prefix: the suffix.
        (
            ["p/img_3.png", "p/img_0.png", "p/img_3b_12.webp"],
            "p/",
            [3, 0, 12],
            (),
            "labels: suffix (3 distinct labels in 0..12; every image key has a _<int> suffix "
            "and none lies in a class folder)",
        ),
        # Every key has a suffix, some lie in folders: not every one in a folder, so the suffix for all.
        (
            ["p/a/x_1.png", "p/y_2.png"],
            "p/",
            [1, 2],
            (),
            "labels: suffix (2 distinct labels in 1..2; every image key has a _<int> suffix "
            "and 1 of 2 lie in no class folder)",
        ),
        # Mixed: folder indices 0 and 1 would collide with the _0/_1 of flat keys; neither rule fits all: none.
        (MIXED, "p/", [-1] * 5, (), MIXED_WHY),
    ],
    ids=["camera-names", "phone-names-under-prefix", "nested", "flat-suffix", "suffix-beats-partial-folders", "mixed"],
)
def test_auto_picks_one_rule_for_the_whole_listing(keys, prefix, labels, classes, line):
    values, got_classes, choice = _labels(keys, prefix)
    assert (values, got_classes) == (labels, classes)
    assert choice.line() == line and choice.requested is LabelRule.AUTO and choice.rule is not LabelRule.AUTO


@pytest.mark.parametrize(
    ("rule", "labels", "classes", "line"),
    [
        (
            LabelRule.FOLDER,
            [0, 1, -1, -1, -1],
            ("big", "odd"),
            "labels: folder (2 classes: big, odd; forced by --labels folder; "
            "3 of 5 image keys lie in no class folder and get -1)",
        ),
        (
            LabelRule.SUFFIX,
            [-1, -1, 0, 1, -1],
            (),
            "labels: suffix (2 distinct labels in 0..1; forced by --labels suffix; "
            "3 of 5 image keys have no _<int> suffix and get -1)",
        ),
        (LabelRule.NONE, [-1] * 5, (), "labels: none (forced by --labels none: every key gets -1)"),
        (LabelRule.AUTO, [-1] * 5, (), MIXED_WHY),
    ],
)
def test_forcing_each_rule_on_a_mixed_listing(rule, labels, classes, line):
    values, got_classes, choice = _labels(MIXED, rule=rule)
    assert (values, got_classes, choice.line()) == (labels, classes, line)
    assert choice.requested is rule
    # Never a mix: every label that is not -1 came from the one rule applied.
    assert not (set(values) - {-1}) or choice.rule in (LabelRule.FOLDER, LabelRule.SUFFIX)


def test_forced_rules_on_listings_that_fit_them_say_so():
    assert _labels(["p/img_3.png"], rule="suffix")[2].line() == (
        "labels: suffix (1 distinct label in 3..3; forced by --labels suffix; every image key has a _<int> suffix)"
    )
    values, classes, choice = _labels(["p/x.png", "p/y_2.png"], rule="folder")
    assert (values, classes) == ([-1, -1], ())
    assert choice.line() == (
        "labels: folder (no class folders; forced by --labels folder; 2 of 2 image keys lie in "
        "no class folder and get -1)"
    )


@pytest.mark.parametrize(
    ("keys", "labels", "rule", "fragment"),
    [
        # A README, a marker and a CSV beside class folders: they get -1 and do not break the folder rule, and
        # a folder holding only non-image keys is no class.
        (
            ["p/cat/a.png", "p/dog/b.PNG", "p/README.txt", "p/_SUCCESS", "p/notes/x.csv"],
            [0, 1, -1, -1, -1],
            "folder",
            "2 classes: cat, dog; every image key lies in a class folder; 3 keys without an image extension get -1",
        ),
        # The same beside a flat research set: the suffix rule, and labels_9.csv gives no label 9.
        (
            ["p/img_1.png", "p/img_2.jpg", "p/labels_9.csv", "p/_SUCCESS"],
            [1, 2, -1, -1],
            "suffix",
            "2 distinct labels in 1..2; every image key has a _<int> suffix",
        ),
        # No image key at all: nothing to decide on.
        (
            ["p/a/notes_1.txt", "p/_SUCCESS"],
            [-1, -1],
            "none",
            "no image keys: none of the 2 keys ends in an image extension such as .jpg or .png, so every key gets -1",
        ),
    ],
    ids=["beside-folders", "beside-suffixes", "no-images"],
)
def test_non_image_keys_get_minus_one_and_do_not_decide_the_rule(keys, labels, rule, fragment):
    values, classes, choice = _labels(keys)
    assert values == labels and choice.rule == rule and fragment in choice.reason
    assert "notes" not in classes


@pytest.mark.parametrize(
    ("key", "prefix", "folder", "suffix"),
    [
        ("p/cat/IMG_1234.jpg", "p/", "cat", 1234),
        ("p/a/x/1.png", "p/", "a", None),
        ("p/img_3.png", "p/", None, 3),
        ("p//x_5.png", "p/", None, 5),
        ("p/PXL_20240101_123456.jpg", "p/", None, 123456),
        ("p/x_y.png", "p/", None, None),
    ],
)
def test_folder_class_and_suffix_of_one_key(key, prefix, folder, suffix):
    assert folder_class(key, prefix) == folder and label_from_name(key) == suffix


def test_listing_decides_once_and_a_shard_keeps_the_whole_listings_choice():
    keys = [f"p/c{i % 3}/IMG_{i:04d}.jpg" for i in range(30)]
    listing = Listing.from_objects([ObjectInfo(key=k, size=1, etag='"e"', last_modified="") for k in keys], prefix="p/")
    # One shard holding only c0 and c2 keys still numbers c2 as 2 (classes come from the whole listing).
    part = listing.subset(np.array([i for i in range(30) if i % 3 != 1]))
    assert part.label_choice == listing.label_choice and part.classes == ("c0", "c1", "c2")
    assert sorted(set(part.label.tolist())) == [0, 2]
    forced = Listing.from_objects(
        [ObjectInfo(key=k, size=1, etag='"e"', last_modified="") for k in keys], prefix="p/", labels=LabelRule.SUFFIX
    )
    assert forced.label.tolist()[:3] == [0, 1, 2] and forced.label_choice.rule is LabelRule.SUFFIX


@pytest.mark.parametrize("bad", ["Folder", "mix", ""])
def test_config_refuses_an_unknown_rule(bad):
    for make in (lambda: TrainConfig(labels=bad), lambda: FetchConfig(prefix="s3://bkt/p/", labels=bad)):
        with pytest.raises(ValueError) as e:
            make()
        assert f"labels={bad!r} must be one of auto, folder, suffix, none (--labels, LABELS=)" in str(e.value)
    assert (
        TrainConfig(labels="folder").labels is LabelRule.FOLDER
        and FetchConfig(prefix="s3://bkt/p/").labels is LabelRule.AUTO
    )


# -- fetch: the header records the rule ------------------------------------------------------------------


def test_fetch_records_the_rule_and_classes_in_the_header(put, bucket, options, cache_dir):
    for i, key in enumerate(["cam/cat/IMG_1234.jpg", "cam/dog/DSC_0_7.png", "cam/dog/DSC_0_8.png", "cam/README.txt"]):
        put(key, png_bytes(i))
    r = fetch(FetchConfig(prefix=f"s3://{bucket}/cam/", options=options, cache_dir=cache_dir, progress=False))
    assert r.label_choice.rule is LabelRule.FOLDER
    header = json.loads(r.manifest.read_text("utf-8").splitlines()[0])
    assert header["labels"] == "folder" and header["classes"] == ["cat", "dog"]
    # "labels" sits beside "classes" in the header line.
    assert list(header).index("labels") + 1 == list(header).index("classes")
    m = load_manifest(r.manifest)
    assert dict(zip(m.keys, m.label.tolist())) == {
        "cam/README.txt": -1,
        "cam/cat/IMG_1234.jpg": 0,
        "cam/dog/DSC_0_7.png": 1,
        "cam/dog/DSC_0_8.png": 1,
    }
    forced = fetch(
        FetchConfig(prefix=f"s3://{bucket}/cam/", options=options, cache_dir=cache_dir, progress=False, labels="suffix")
    )
    h = read_manifest_header(forced.manifest)
    assert (h.labels, h.classes) == ("suffix", None) and forced.summary.fetched == 0  # relabelled, nothing downloaded
    assert sorted(load_manifest(forced.manifest).label.tolist()) == [-1, 7, 8, 1234]


def test_cli_fetch_prints_the_rule_line(s3_server, put, bucket, cache_dir):
    put("cam/cat/IMG_1234.jpg", png_bytes(1))
    put("cam/dog/DSC_0_7.png", png_bytes(2))
    put("cam/fox/PXL_20240101_123456.jpg", png_bytes(3))
    base = (
        "fetch",
        f"s3://{bucket}/cam/",
        "--endpoint",
        s3_server.endpoint,
        "--cache-dir",
        str(cache_dir),
        "--no-progress",
    )
    proc = run_cli(*base)
    assert proc.returncode == 0, proc.stderr
    assert "labels: folder (3 classes: cat, dog, fox; every image key lies in a class folder)\n" in proc.stdout
    forced = run_cli(*base, "--labels", "none")
    assert forced.returncode == 0, forced.stderr
    assert "labels: none (forced by --labels none: every key gets -1)" in forced.stdout
    (path,) = CacheLayout(root=cache_dir).manifests.glob("*.jsonl")
    assert read_manifest_header(path).labels == "none" and set(load_manifest(path).label.tolist()) == {-1}
    bad = run_cli(*base, "--labels", "mixed")
    assert bad.returncode == 2 and "invalid choice: 'mixed'" in bad.stderr


def test_cli_fetch_of_a_mixed_prefix_says_why_and_how_to_force(s3_server, put, bucket, cache_dir):
    for i, key in enumerate(["mx/big/a.png", "mx/odd/b.png", "mx/flat_0.png", "mx/flat_1.png"]):
        put(key, png_bytes(i))
    proc = run_cli(
        "fetch", f"s3://{bucket}/mx/", "--endpoint", s3_server.endpoint, "--cache-dir", str(cache_dir), "--no-progress"
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "labels: none (2 of 4 image keys lie in no class folder and 2 have no _<int> suffix; pass --labels folder "
        "or suffix to force one)"
    ) in proc.stdout


def test_make_passes_labels_to_fetch_and_train():
    for target in ("fetch", "train"):
        proc = subprocess.run(
            ["make", "-n", target, "LABELS=folder", "PREFIX=s3://b/p/"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        line = [ln for ln in proc.stdout.splitlines() if "pipeline fetch" in ln or "train_vae.py" in ln][-1]
        assert "--labels folder" in line, line
    plain = subprocess.run(["make", "-n", "fetch"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "--labels" not in plain.stdout


def test_train_vae_flag_comes_from_train_config():
    import train_vae

    action = {a.dest: a for a in train_vae.build_parser()._actions}["labels"]
    assert action.default == TrainConfig().labels == "auto" and list(action.choices) == [
        "auto",
        "folder",
        "suffix",
        "none",
    ]


# -- training: the manifest's labels as recorded, or recomputed -----------------------------------------------


def _manifest(root, keys, *, labels, extra=None, prefix="p/"):
    """A manifest of ``keys`` (tiny PNGs) with these per-record ``labels``; ``extra`` the optional header fields."""
    store = BlobStore(CacheLayout(root=root))
    recs = []
    for i, (key, label) in enumerate(zip(keys, labels)):
        data = png_bytes(i)
        sha, _ = store.put_bytes(data)
        recs.append(ManifestRecord(key=key, sha256=sha, size=len(data), etag="", last_modified="", label=label))
    return write_manifest(
        CacheLayout(root=root), endpoint="http://127.0.0.1:9", bucket="b", prefix=prefix, records=recs, extra=extra
    )


def _train_labels(root, **kw):
    config = TrainConfig(cache_dir=str(root), pack="off", progress=False, **kw)
    src = build_source(config, DistState())
    return src.batches[list(range(len(src.indices)))][1].tolist(), src.labels


def test_a_manifest_written_before_the_rule_was_recorded_keeps_its_labels(tmp_path):
    # The old per-key mix: folder index 0, then a suffix 7, as tess wrote them before issue 16.
    keys = ["p/cat/IMG_0001.png", "p/x_7.png"]
    path = _manifest(tmp_path, keys, labels=[0, 7], extra={"classes": ["cat"]})
    header = read_manifest_header(path)
    assert header.labels is None and "labels" not in json.loads(path.read_text().splitlines()[0])
    assert load_manifest(path).label.tolist() == [0, 7]
    labels, line = _train_labels(tmp_path)
    assert labels == [0, 7] and line.startswith("labels: as the manifest holds them (written before tess recorded")
    # An explicit rule recomputes them from the keys and prefix, one rule for all.
    labels, line = _train_labels(tmp_path, labels="suffix")
    assert labels == [1, 7]
    assert line.endswith("; recomputed from the manifest's keys (it recorded no rule)") and "labels: suffix (" in line


@pytest.mark.parametrize(
    ("rule", "labels", "fragment"),
    [
        ("auto", [0, 1, 1], "labels: folder (as recorded in the manifest; 2 classes)"),
        ("folder", [0, 1, 1], "labels: folder (as recorded in the manifest; 2 classes)"),
        (
            "suffix",
            [1234, 7, 8],
            "labels: suffix (3 distinct labels in 7..1234; forced by --labels suffix; every image "
            "key has a _<int> suffix); recomputed from the manifest's keys (it recorded folder)",
        ),
        ("none", [-1, -1, -1], "recomputed from the manifest's keys (it recorded folder)"),
    ],
)
def test_training_uses_the_recorded_rule_unless_told_another(tmp_path, rule, labels, fragment):
    keys = ["p/cat/IMG_1234.png", "p/dog/DSC_0_7.png", "p/dog/DSC_0_8.png"]
    _manifest(tmp_path, keys, labels=[0, 1, 1], extra={"labels": "folder", "classes": ["cat", "dog"]})
    got, line = _train_labels(tmp_path, labels=rule)
    assert got == labels and fragment in line


def test_folder_labels_on_a_shard_manifest_need_a_new_fetch(tmp_path):
    _manifest(tmp_path, ["p/a/x_1.png", "p/b/y_2.png"], labels=[1, 2], extra={"labels": "suffix", "shard": "0/2"})
    with pytest.raises(ValueError) as e:
        _train_labels(tmp_path, labels="folder")
    assert "shard 0/2" in str(e.value) and "numbered over the whole listing" in str(e.value)
    assert "make fetch PREFIX=s3://b/p/ ENDPOINT=http://127.0.0.1:9 SHARD=0/2 LABELS=folder" in str(e.value)
    # A per-key rule needs no whole listing: recomputed on the shard.
    assert _train_labels(tmp_path, labels="none")[0] == [-1, -1]


def test_manifest_labels_leave_the_data_identity_alone(tmp_path):
    path = _manifest(tmp_path, ["p/a_1.png", "p/b_2.png"], labels=[1, 2], extra={"labels": "suffix"})
    m = load_manifest(path)
    relabelled, _ = manifest_labels(m, LabelRule.NONE, CacheLayout(root=tmp_path))
    assert relabelled.label.tolist() == [-1, -1] and m.label.tolist() == [1, 2]
    assert relabelled.header.records_sha256 == m.header.records_sha256
    same, _ = manifest_labels(m, LabelRule.SUFFIX, CacheLayout(root=tmp_path))
    assert same is m


def test_streaming_dataset_applies_the_rule_to_its_listing(put, bucket, options):
    for i, key in enumerate(["st/img_3.png", "st/img_5.png", "st/sub/img_9.png"]):
        put(key, png_bytes(i))
    auto = DSSDataset(f"s3://{bucket}/st/", options=options, image_size=None)
    assert auto.listing.label_choice.rule is LabelRule.SUFFIX and [auto[i][1] for i in range(3)] == [3, 5, 9]
    folder = DSSDataset(f"s3://{bucket}/st/", options=options, image_size=None, labels="folder")
    assert folder.listing.label.tolist() == [-1, -1, 0] and folder.listing.classes == ("sub",)
    assert "forced by --labels folder" in folder.listing.label_choice.line()


@pytest.mark.parametrize(
    ("prefix", "key", "cls"),
    [
        ("data/", "data/train/cat/x.png", "train"),
        ("data/tr", "data/train/cat/x.png", "train"),  # a prefix ending inside a name counts from its folder
        ("data/train/", "data/train/cat/x.png", "cat"),
        ("", "cat/x.png", "cat"),
        ("data/", "data/x.png", None),
    ],
)
def test_the_class_is_the_first_folder_below_the_prefixs_folder(prefix, key, cls):
    from pipeline.fetch.labels import folder_class

    assert folder_class(key, prefix) == cls
