"""ImageNet input pipeline on the shared real JPEGs: transforms, labels, sharding, resume, bad files.

References: torchvision's own transforms (run in a subprocess, because importing
torchvision after TensorFlow segfaults in triton's import), numpy crops of the resized
image, the samples' manifest labels, tfds' mock data and tfrecords written from the samples.
"""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from _imagenet import SAMPLES_DIR, make_image_folder, make_tfds_imagenet, samples
from PIL import Image

from resnet_jax.data import DataError, imagenet
from resnet_jax.data import image_transforms as T

MEAN = np.asarray(imagenet.MEAN_RGB, np.float32)
STD = np.asarray(imagenet.STD_RGB, np.float32)


def unnormalize(x):
    return np.asarray(x) * STD + MEAN


def read(path) -> tf.Tensor:
    return tf.io.read_file(str(path))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("in"), n_val=7)


@pytest.fixture(scope="module")
def spec(folder):
    return imagenet.ImageNetSpec("folder", str(folder))


def sample(name_part: str) -> Path:
    return next(SAMPLES_DIR / r["filename"] for r in samples() if name_part in r["filename"])


def test_package_imports_and_lists_a_folder_without_tensorflow(folder):
    code = (
        "import sys; sys.modules['tensorflow'] = None\n"
        "from resnet_jax.data import imagenet as I\n"
        f"s = I.ImageNetSpec('folder', {str(folder)!r}); I.check(s)\n"
        "print(I.num_examples(s, 'train'), I.num_examples(s, 'eval'), I.num_eval_batches(s, 3, 2))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["100", "7", "2"]


def test_labels_are_the_ilsvrc_indices_and_tfds_order(spec):
    names = imagenet.class_names(spec)
    assert len(names) == 1000 and list(names) == sorted(names) and names[0] == "n01440764"
    paths, labels = imagenet._folder_files(spec, "train")
    want = {r["filename"]: int(r["label_index"]) for r in samples()}
    assert {Path(p).name: int(y) for p, y in zip(paths, labels)} == want
    assert len(want) == 100 and all(names[want[r["filename"]]] == r["synset"] for r in samples())


def test_missing_data_names_the_path_and_how_to_prepare(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path}/nothing.*train/<class>"):
        imagenet.check(imagenet.ImageNetSpec("folder", str(tmp_path / "nothing")))
    (tmp_path / "root" / "train" / "n01440764").mkdir(parents=True)
    with pytest.raises(DataError, match=r"root/train: no images"):
        imagenet.num_examples(imagenet.ImageNetSpec("folder", str(tmp_path / "root")), "train")
    with pytest.raises(DataError, match="ILSVRC2012_img_train.tar.*tfds build imagenet2012"):
        imagenet.check(imagenet.ImageNetSpec("tfds", str(tmp_path / "tfds")))
    with pytest.raises(ValueError, match="protocol"):
        imagenet.eval_batches(
            imagenet.ImageNetSpec("folder", str(tmp_path)),
            protocol="five",
            per_process_batch=1,
            process_index=0,
            process_count=1,
        )


# ---------------------------------------------------------------------------- train pipeline


def test_train_resume_and_two_processes_equal_one(spec):
    kw = dict(seed=3, global_batch=8, transform="paper")
    whole = imagenet.train_batches(spec, start_step=0, process_index=0, process_count=1, **kw)
    steps = [next(whole) for _ in range(3)]
    for batch in steps:
        assert batch["image"].shape == (8, 224, 224, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
        pixels = unnormalize(batch["image"])
        # 0..255 pixels plus the PCA shift (|shift| < ~30 for alpha within 5 sigma).
        assert -40 < pixels.min() < 20 and 235 < pixels.max() < 295
    labels = {int(r["label_index"]) for r in samples()}
    assert {int(y) for b in steps for y in b["label"]} <= labels
    assert len({int(y) for b in steps for y in b["label"]}) == 24  # one epoch's permutation: no repeats
    # Resumed at step 1, as two processes: rows [0, 4) and [4, 8) of each global batch.
    halves = [
        imagenet.train_batches(spec, start_step=1, process_index=p, process_count=2, **kw) for p in (0, 1)
    ]
    for step in (1, 2):
        parts = [next(h) for h in halves]
        np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), steps[step]["label"])
        np.testing.assert_allclose(
            np.concatenate([p["image"] for p in parts]), steps[step]["image"], atol=1e-5
        )
    other_seed = next(
        imagenet.train_batches(spec, start_step=0, process_index=0, process_count=1, **{**kw, "seed": 4})
    )
    assert not np.array_equal(other_seed["label"], steps[0]["label"])


def test_inception_train_batches(spec):
    kw = dict(
        seed=0,
        start_step=5,
        global_batch=4,
        process_index=0,
        process_count=1,
        transform="inception",
        image_size=128,
    )
    a, b = next(imagenet.train_batches(spec, **kw)), next(imagenet.train_batches(spec, **kw))
    assert a["image"].shape == (4, 128, 128, 3) and a["image"].dtype == np.float32
    np.testing.assert_array_equal(a["image"], b["image"])
    pixels = unnormalize(a["image"])
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3 and pixels.std() > 20


# ---------------------------------------------------------------------------- train transforms


def test_paper_scale_range_spans_256_to_480():
    @tf.function
    def draw(i):
        shorter, resized, crop, _, _ = T.paper_params(
            tf.stack([tf.constant(7, tf.int64), i]), tf.constant([333, 500])
        )
        return tf.stack([shorter, *resized, *crop])

    draws = np.array([draw(tf.constant(i, tf.int64)).numpy() for i in range(600)])
    shorter, new_h, new_w, top, left = draws.T
    assert shorter.min() >= 256 and shorter.max() <= 480
    assert shorter.min() <= 262 and shorter.max() >= 474  # both ends reached (uniform over 225 values)
    np.testing.assert_array_equal(new_h, shorter)  # 333 < 500: the height is the shorter side
    np.testing.assert_array_equal(new_w, shorter * 500 // 333)
    assert (top >= 0).all() and (top <= new_h - 224).all() and (left <= new_w - 224).all()
    assert top.max() > 200 and left.max() > 400  # crops reach far corners of large scales


def test_paper_transform_is_crop_of_resized_image_then_flip_and_pca():
    path = sample("tiger_shark")  # 500 x 313
    image_bytes = read(path)
    full = T.decode(image_bytes, dct_method="INTEGER_FAST")
    for i in range(4):
        seed = tf.constant([1, i], tf.int64)
        shorter, _, (top, left), flip, alpha = T.paper_params(seed, tf.constant([313, 500]))
        want = T.resize_shorter(full, shorter).numpy()[int(top) : int(top) + 224, int(left) : int(left) + 224]
        want = want[:, ::-1] if bool(flip) else want
        plain = T.train_paper(image_bytes, seed, pca_std=0.0, mean=(0, 0, 0), std=(1, 1, 1)).numpy()
        np.testing.assert_allclose(plain, want, atol=0.05)  # window decode vs whole decode: < 0.05 of 255
        lit = T.train_paper(image_bytes, seed, pca_std=0.1, mean=(0, 0, 0), std=(1, 1, 1)).numpy()
        shift = np.asarray(imagenet.EIGVEC) @ (0.1 * alpha.numpy() * np.asarray(imagenet.EIGVAL))
        np.testing.assert_allclose(lit - plain, np.broadcast_to(shift, lit.shape), atol=1e-3)
        normed = T.train_paper(image_bytes, seed).numpy()
        np.testing.assert_allclose(normed, (lit - MEAN) / STD, atol=1e-4)


def test_inception_crop_covers_8_to_100_percent():
    window = tf.function(
        lambda i: tf.stack(
            T.inception_window(tf.stack([tf.constant(2, tf.int64), i]), tf.constant([400, 600]))
        )
    )
    top, left, h, w = np.array([window(tf.constant(i, tf.int64)).numpy() for i in range(300)]).T
    area = h * w / (400 * 600)
    # The largest 4:3 box in a 3:2 image covers 8/9 of it.
    assert area.min() >= 0.08 - 1e-3 and area.max() <= 8 / 9 + 1e-2 and area.min() < 0.15 and area.max() > 0.8
    ratio = (w / h)[area < 1]
    assert ratio.min() > 0.7 and ratio.max() < 1.4
    assert (top + h <= 400).all() and (left + w <= 600).all()


def test_inception_output_is_the_resized_crop_window():
    rows = samples()
    big = SAMPLES_DIR / max(rows, key=lambda r: int(r["width"]) * int(r["height"]))["filename"]
    image_bytes = read(big)
    full = T.decode(image_bytes, dct_method="INTEGER_FAST")
    reduced = 0
    for i in range(6):
        seed = tf.constant([5, i], tf.int64)
        seeds = T._seeds(seed, 2)
        top, left, h, w = (int(v) for v in T.inception_window(seeds[0], T.image_shape(image_bytes)))
        reduced += min(h, w) >= 2 * 224
        want = tf.image.resize(full[top : top + h, left : left + w], [224, 224], antialias=True).numpy()
        if bool(tf.random.stateless_uniform([], seed=seeds[1]) < 0.5):
            want = want[:, ::-1]
        got = unnormalize(T.train_inception(image_bytes, seed))
        # DCT-domain downscaling + bilinear vs one antialiased resize: the same picture up to
        # blur (this image is finely textured); a crop shifted by 8 output pixels is far off.
        assert np.abs(got - want).mean() < 5.0, (i, h, w)
        assert np.abs(got[8:] - want[:-8]).mean() > 3 * np.abs(got - want).mean(), (i, h, w)
    assert reduced >= 2  # the DCT-scaled path was exercised


# ---------------------------------------------------------------------------- odd files


def make_odd_files(tmp_path) -> dict[str, Path]:
    src = Image.open(sample("tiger_shark"))
    paths = {name: tmp_path / f"{name}.JPEG" for name in ("cmyk", "png", "tiny", "gray")}
    src.convert("CMYK").save(paths["cmyk"], format="JPEG", quality=95)
    src.save(paths["png"], format="PNG")  # a PNG named .JPEG, as one ILSVRC train image is
    src.resize((20, 13)).save(paths["tiny"], format="JPEG")
    paths["gray"] = sample("Airedale")  # a real grayscale ImageNet JPEG
    return paths


def test_cmyk_png_tiny_and_gray_decode_to_rgb_and_pass_every_transform(tmp_path):
    paths = make_odd_files(tmp_path)
    for name, path in paths.items():
        image = T.decode(read(path)).numpy()
        reference = np.asarray(Image.open(path).convert("RGB"), np.float32)
        assert image.shape == reference.shape and image.dtype == np.uint8, name
        # libjpeg and PIL agree up to their CMYK/YCbCr rounding.
        assert np.abs(image - reference).mean() < (2.0 if name == "cmyk" else 0.5), name
        seed = tf.constant([0, 1], tf.int64)
        assert T.train_paper(read(path), seed).shape == (224, 224, 3)
        assert T.train_inception(read(path), seed).shape == (224, 224, 3)
        assert T.eval_center(read(path)).shape == (1, 224, 224, 3)
        assert T.eval_ten_crop(read(path)).shape == (10, 224, 224, 3)
    gray = T.decode(read(paths["gray"])).numpy()
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    tiny = unnormalize(T.eval_center(read(paths["tiny"]))[0])
    assert np.isfinite(tiny).all() and tiny.std() > 10  # upscaled, not blank


def folder_with(tmp_path, bad: bytes | None, n: int = 7) -> Path:
    """train/ and val/ of n real samples; the 4th replaced by `bad` bytes when given."""
    root = make_image_folder(tmp_path, n_val=n, n_train=n)
    if bad is not None:
        for split in ("train", "val"):
            victim = sorted((root / split).glob("*/*.JPEG"))[3]
            victim.unlink()
            victim.write_bytes(bad)
    return root


def test_corrupt_file_stops_with_its_name_or_is_skipped_and_counted(tmp_path, caplog):
    truncated = sample("tiger_shark").read_bytes()[:5000]
    clean = imagenet.ImageNetSpec("folder", str(folder_with(tmp_path / "clean", None)))
    broken_root = folder_with(tmp_path / "broken", truncated)
    broken = imagenet.ImageNetSpec("folder", str(broken_root))
    victim = sorted((broken_root / "val").glob("*/*.JPEG"))[3]
    ekw = dict(protocol="center", per_process_batch=4, process_index=0, process_count=1)
    with pytest.raises(DataError, match=rf"{victim}: cannot be decoded.*skip_bad_files"):
        list(imagenet.eval_batches(broken, **ekw))
    skipping = imagenet.eval_batches(broken, skip_bad_files=True, **ekw)
    got, want = list(skipping), list(imagenet.eval_batches(clean, **ekw))
    assert skipping.bad_files == [str(victim)]
    mask = np.concatenate([b["mask"] for b in got])
    np.testing.assert_array_equal(mask, [1, 1, 1, 0, 1, 1, 1, 0])
    for g, w in zip(got, want):  # every other row exactly as in the clean run
        keep = g["mask"]
        np.testing.assert_array_equal(g["views"][0][keep], w["views"][0][keep])
        np.testing.assert_array_equal(g["label"][keep], w["label"][keep])

    tkw = dict(seed=0, start_step=0, global_batch=7, process_index=0, process_count=1)
    train_victim = sorted((broken_root / "train").glob("*/*.JPEG"))[3]
    with pytest.raises(DataError, match=rf"{train_victim}: cannot be decoded"):
        next(imagenet.train_batches(broken, **tkw))
    skipping = imagenet.train_batches(broken, skip_bad_files=True, **tkw)
    with caplog.at_level(logging.WARNING):
        got, want = next(skipping), next(imagenet.train_batches(clean, **tkw))
    assert skipping.bad_files == [str(train_victim)]
    assert f"skipping unreadable image {train_victim} (1 skipped so far)" in caplog.text
    # Which row held the bad file: the step's rows are a pure function of (seed, step).
    paths, _ = imagenet._folder_files(clean, "train")
    rows = [Path(paths[i]).name for i in imagenet.train_indices(0, 0, 1, 7, len(paths))[0]]
    (bad,) = [r for r, name in enumerate(rows) if name == train_victim.name]
    others = np.arange(7) != bad
    # Every other row exactly as in the clean run; the bad row is a copy of the next good
    # row (image and label): no blank image and no wrong label reach the step.
    np.testing.assert_array_equal(got["image"][others], want["image"][others])
    np.testing.assert_array_equal(got["label"][others], want["label"][others])
    substitute = (bad + 1) % 7
    np.testing.assert_array_equal(got["image"][bad], want["image"][substitute])
    assert got["label"][bad] == want["label"][substitute]
    assert not np.any(np.all(got["image"] == 0, axis=(1, 2, 3)))


def test_bad_training_rows_take_the_next_good_row_of_their_batch():
    """The substitution rule on its own (both training sources use it): cyclic, labels too,
    evaluation rows (masked, never None) untouched, an all-bad batch refused."""
    rows = [None, {"label": 1}, None, {"label": 3}, None]
    assert [r["label"] for r in imagenet._substitute(rows, list("abcde"))] == [1, 1, 3, 3, 1]
    masked = [{"label": 0, "mask": False}, {"label": 1, "mask": True}]
    assert imagenet._substitute(masked, ["a", "b"]) == masked
    with pytest.raises(DataError, match="every file of a training batch failed.*first: a"):
        imagenet._substitute([None, None], ["a", "b"])


def test_resume_with_a_bad_file_repeats_the_uninterrupted_batches(tmp_path):
    """Skipping stays a pure function of (seed, step): resumed mid-run, the batches (bad
    rows' substitutes included) and the skips are those of the uninterrupted run."""
    truncated = sample("tiger_shark").read_bytes()[:5000]
    broken_root = folder_with(tmp_path / "broken", truncated, n=6)
    broken = imagenet.ImageNetSpec("folder", str(broken_root))
    clean = imagenet.ImageNetSpec("folder", str(folder_with(tmp_path / "clean", None, n=6)))
    victim = str(sorted((broken_root / "train").glob("*/*.JPEG"))[3])
    kw = dict(seed=2, global_batch=3, process_index=0, process_count=1, transform="inception", image_size=32)
    whole = imagenet.train_batches(broken, start_step=0, skip_bad_files=True, **kw)
    got = list(itertools.islice(whole, 6))  # three epochs of two steps: the bad file once in each
    want = list(itertools.islice(imagenet.train_batches(clean, start_step=0, **kw), 6))
    paths, _ = imagenet._folder_files(broken, "train")
    where = [
        (s, r)
        for s, idx in enumerate(imagenet.train_indices(2, 0, 6, 3, 6))
        for r, i in enumerate(idx)
        if paths[i] == victim
    ]
    assert len(where) == 3 and whole.bad_files == [victim] * 3
    for s, r in where:  # the run resumed below is checked against this one, so pin it first
        np.testing.assert_array_equal(got[s]["image"][r], want[s]["image"][(r + 1) % 3])
        assert got[s]["label"][r] == want[s]["label"][(r + 1) % 3]
    resumed = imagenet.train_batches(broken, start_step=3, skip_bad_files=True, **kw)
    for s in range(3, 6):
        batch = next(resumed)
        np.testing.assert_array_equal(batch["image"], got[s]["image"])
        np.testing.assert_array_equal(batch["label"], got[s]["label"])
    assert resumed.bad_files == [victim] * sum(s >= 3 for s, _ in where)


# ---------------------------------------------------------------------------- evaluation


def test_every_eval_image_counted_once_over_processes(spec, folder):
    per_process = [
        list(imagenet.eval_batches(spec, per_process_batch=2, process_index=p, process_count=3))
        for p in range(3)
    ]
    assert [len(b) for b in per_process] == [imagenet.num_eval_batches(spec, 2, 3)] * 3 == [2, 2, 2]
    labels = [int(y) for batches in per_process for b in batches for y, m in zip(b["label"], b["mask"]) if m]
    val = [int(r["label_index"]) for r in samples()[-7:]]
    assert sorted(labels) == sorted(val) and len(labels) == 7
    batch = per_process[0][0]
    assert batch["views"][0].shape == (2, 1, 224, 224, 3) and batch["mask"].dtype == bool


def test_ten_crop_views_are_corners_centre_and_flips_of_the_resized_image():
    path = sample("common_newt")  # 400 x 200: resized to 512 x 256
    views = unnormalize(T.eval_ten_crop(read(path)))
    resized = T.resize_shorter(T.decode(read(path)), 256).numpy()
    assert resized.shape == (256, 512, 3)
    h, w = resized.shape[:2]
    corners = [(0, 0), (0, w - 224), (h - 224, 0), (h - 224, w - 224), (16, 144)]
    for i, (y, x) in enumerate(corners):
        crop = resized[y : y + 224, x : x + 224]
        np.testing.assert_allclose(views[i], crop, atol=1e-3)
        # torchvision TenCrop order: the same five crops of the flipped image.
        flipped = resized[:, ::-1][y : y + 224, x : x + 224]
        np.testing.assert_allclose(views[5 + i], flipped, atol=1e-3)


def test_multi_scale_gives_each_image_two_views_per_scale(spec):
    scales = (224, 256, 384, 480, 640)
    batches = list(
        imagenet.eval_batches(
            spec, protocol="multi_scale", per_process_batch=4, process_index=1, process_count=2
        )
    )
    assert len(batches) == 1 and batches[0]["mask"].tolist() == [True, True, True, False]
    assert [v.shape for v in batches[0]["views"]] == [(4, 2, s, s, 3) for s in scales]
    path = sample("common_newt")
    for s, group in zip(scales, T.eval_multi_scale(read(path), scales=scales)):
        resized = T.resize_shorter(T.decode(read(path)), s).numpy()
        left = round((resized.shape[1] - s) / 2)
        centre = resized[:, left : left + s]
        np.testing.assert_allclose(unnormalize(group[0]), centre, atol=1e-2)
        np.testing.assert_allclose(unnormalize(group[1]), centre[:, ::-1], atol=1e-2)


TORCHVISION_REFERENCE = textwrap.dedent("""
    import sys, numpy as np, torchvision.transforms as T
    from PIL import Image
    norm = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    center = T.Compose([T.Resize(256), T.CenterCrop(224), norm])
    ten = T.Compose([T.Resize(256), T.TenCrop(224)])
    out = {}
    for i, path in enumerate(sys.argv[2:]):
        image = Image.open(path).convert("RGB")
        out[f"center{i}"] = center(image).permute(1, 2, 0).numpy()
        out[f"ten{i}"] = np.stack([norm(v).permute(1, 2, 0).numpy() for v in ten(image)])
    np.savez(sys.argv[1], **out)
""")


def test_eval_transforms_equal_torchvision_resize_centercrop_normalize(tmp_path):
    rows = samples()

    # 9 images: tall and wide, 2 grayscale, the smallest (upscaled) and the largest.
    def side(r):
        return min(int(r["width"]), int(r["height"]))

    chosen = (
        rows[::20] + [r for r in rows if r["mode"] == "L"][:2] + [min(rows, key=side), max(rows, key=side)]
    )
    paths = [str(SAMPLES_DIR / r["filename"]) for r in chosen]
    subprocess.run(
        [sys.executable, "-c", TORCHVISION_REFERENCE, str(tmp_path / "ref.npz"), *paths], check=True
    )
    ref = np.load(tmp_path / "ref.npz")
    center_diff, ten_diff = [], []
    for i, path in enumerate(paths):
        ours = unnormalize(T.eval_center(read(path))[0])
        diff = np.abs(ours - unnormalize(ref[f"center{i}"]))
        center_diff.append(diff.mean())
        assert diff.max() < 1.6, path  # 0..255 levels: PIL rounds to uint8 (and between its two passes)
        ten = np.abs(unnormalize(T.eval_ten_crop(read(path))) - unnormalize(ref[f"ten{i}"]))
        ten_diff.append(ten.mean())
        assert ten.max() < 1.6, path
    assert np.mean(center_diff) < 0.4 and np.mean(ten_diff) < 0.4


# ---------------------------------------------------------------------------- tfds


def test_tfds_imagenet2012_end_to_end_on_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    builder = tfds.builder("imagenet2012", data_dir=str(tmp_path))
    splits = [
        tfds.core.SplitInfo(name=name, shard_lengths=[n], num_bytes=0, filename_template=None)
        for name, n in (("train", 24), ("validation", 10))
    ]
    builder.info.set_splits(tfds.core.SplitDict(splits))
    Path(builder.data_dir).mkdir(parents=True)
    builder.info.write_to_directory(builder.data_dir)  # split sizes for num_examples
    spec = imagenet.ImageNetSpec("tfds", str(tmp_path))
    with tfds.testing.mock_data(num_examples=24, data_dir=str(tmp_path)):
        imagenet.check(spec)
        assert imagenet.num_examples(spec, "train") == 24 and len(imagenet.class_names(spec)) == 1000
        kw = dict(
            seed=1, global_batch=8, process_index=0, process_count=1, transform="inception", image_size=64
        )
        run = imagenet.train_batches(spec, start_step=0, **kw)
        steps = [next(run) for _ in range(4)]  # crosses the epoch boundary (3 steps per epoch)
        resumed = next(imagenet.train_batches(spec, start_step=2, **kw))
        np.testing.assert_array_equal(resumed["label"], steps[2]["label"])
        np.testing.assert_allclose(resumed["image"], steps[2]["image"], atol=1e-5)
        assert steps[0]["image"].shape == (8, 64, 64, 3) and steps[0]["label"].dtype == np.int32
        batches = list(imagenet.eval_batches(spec, per_process_batch=4, process_index=0, process_count=1))
        assert len(batches) == imagenet.num_eval_batches(spec, 4, 1) == 3
        assert np.concatenate([b["mask"] for b in batches]).sum() == 10


def test_tfds_bad_record_takes_the_next_good_row_of_its_batch_or_stops(tmp_path, caplog):
    """A training record whose JPEG bytes do not decode, on the real tfds path (stock
    builder reading tfrecords): skipped, its row is a copy (image and label) of the next good
    row of its batch, not the blank image with label 0 it was before; every other row is
    bit-equal to a clean run, the skips are counted and logged, resume is exact; without
    skip_bad_files, a DataError naming the dataset, split and step."""
    victim = 3
    truncated = (SAMPLES_DIR / samples()[victim]["filename"]).read_bytes()[:5000]
    victim_label = int(samples()[victim]["label_index"])
    clean = imagenet.ImageNetSpec("tfds", str(make_tfds_imagenet(tmp_path / "clean", 8)))
    broken_dir = make_tfds_imagenet(tmp_path / "broken", 8, {victim: truncated})
    broken = imagenet.ImageNetSpec("tfds", str(broken_dir))
    kw = dict(seed=5, global_batch=4, process_index=0, process_count=1, transform="inception", image_size=32)
    want = list(itertools.islice(imagenet.train_batches(clean, start_step=0, **kw), 4))
    # Two epochs of two steps; which row holds the victim depends on (seed, epoch), not the bytes.
    where = [(s, r) for s, b in enumerate(want) for r, y in enumerate(b["label"]) if y == victim_label]
    assert [s // 2 for s, _ in where] == [0, 1]  # once per epoch
    skipping = imagenet.train_batches(broken, start_step=0, skip_bad_files=True, **kw)
    with caplog.at_level(logging.WARNING):
        got = list(itertools.islice(skipping, 4))
    names = [f"imagenet2012/train record at step {s}, row {r}" for s, r in where]
    assert skipping.bad_files == names
    assert f"skipping unreadable image {names[0]} (1 skipped so far)" in caplog.text
    assert f"skipping unreadable image {names[1]} (2 skipped so far)" in caplog.text
    for s in range(4):
        bad = [r for t, r in where if t == s]
        others = ~np.isin(np.arange(4), bad)
        np.testing.assert_array_equal(got[s]["image"][others], want[s]["image"][others])
        np.testing.assert_array_equal(got[s]["label"][others], want[s]["label"][others])
        for r in bad:
            np.testing.assert_array_equal(got[s]["image"][r], want[s]["image"][(r + 1) % 4])
            assert got[s]["label"][r] == want[s]["label"][(r + 1) % 4] != 0
    # Resumed mid-epoch (the first step's records read, not decoded) and across the epoch boundary.
    resumed = imagenet.train_batches(broken, start_step=1, skip_bad_files=True, **kw)
    for s in range(1, 4):
        batch = next(resumed)
        np.testing.assert_array_equal(batch["image"], got[s]["image"])
        np.testing.assert_array_equal(batch["label"], got[s]["label"])
    assert resumed.bad_files == [n for (s, _), n in zip(where, names) if s >= 1]

    failing = imagenet.train_batches(broken, start_step=0, **kw)
    for _ in range(where[0][0]):
        next(failing)
    with pytest.raises(
        DataError,
        match=rf"tfds imagenet2012/train \(data_dir {broken_dir}\S*\): a record of training step "
        rf"{where[0][0]} failed to decode: .*skip_bad_files=True",
    ):
        next(failing)
