"""Per-image ImageNet transforms as TensorFlow graph functions (used inside tf.data maps).

Owns decoding (any JPEG, CMYK JPEG, grayscale, PNG/GIF/BMP saved as .JPEG, all to 3-channel
RGB uint8) and the paper's train and evaluation transforms plus the Inception-style crop:

- `train_paper`: He et al. 2015, Sec. 3.4: shorter side resized to a random integer in
  `scale_range` ([256, 480]), random `image_size` crop, horizontal flip, AlexNet PCA
  lighting, mean/std normalisation.
- `train_inception`: random-resized crop (area 8-100%, aspect 3/4-4/3) as torchvision,
  the Flax ImageNet example and Goyal et al. use; decode-and-crop fused, flip, normalise.
- `eval_center` (shorter side 256, centre 224), `eval_ten_crop` (Tables 2-3),
  `eval_multi_scale` (Table 4, batchable variant; see its docstring).

Resizing is bilinear with antialiasing (a triangle kernel widened by the downscale
factor) and torchvision's output-size rule, because that is what torchvision's
`Resize(256)` does (PIL's bilinear filter, and the tensor path's default `antialias=True`),
so converted torchvision weights see the pixels they were trained on. Every resize
followed by a crop goes through `tf.raw_ops.ScaleAndTranslate` with the crop's offset as a
translation: only the cropped pixels are computed, from only the JPEG window they need
(decode-and-crop with a margin covering the kernel), and the result equals resize-then-crop
of the whole image. Images stay uint8 until that resize.

Randomness is stateless: every draw is a function of a per-example seed (int64 [2]), so an
example's augmentation is reproducible whatever thread, process or resume produces it.
This module imports TensorFlow at the top; `imagenet.py` imports it lazily.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from resnet_jax.data.constants import EIGVAL, EIGVEC, MEAN_RGB, STD_RGB

# ---------------------------------------------------------------------------- decoding


def image_shape(image_bytes: tf.Tensor) -> tf.Tensor:
    """(height, width) int32 of an encoded image; reads only the header for JPEGs."""
    return tf.cond(
        tf.io.is_jpeg(image_bytes),
        lambda: tf.io.extract_jpeg_shape(image_bytes)[:2],
        lambda: tf.shape(_decode_any(image_bytes))[:2],
    )


def _decode_any(image_bytes: tf.Tensor) -> tf.Tensor:
    # PNG/GIF/BMP (ImageNet has a PNG saved as .JPEG); first frame of animations.
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def decode(image_bytes: tf.Tensor, window=None, dct_method: str = "INTEGER_ACCURATE") -> tf.Tensor:
    """uint8 [h, w, 3] RGB; `window` = (top, left, height, width) decodes only that part.

    Grayscale JPEGs are expanded and CMYK JPEGs converted by libjpeg (channels=3).
    INTEGER_ACCURATE is libjpeg's default IDCT, the one PIL (hence torchvision) uses.
    """

    def jpeg():
        if window is None:
            return tf.io.decode_jpeg(image_bytes, channels=3, dct_method=dct_method)
        return tf.io.decode_and_crop_jpeg(image_bytes, tf.stack(window), channels=3, dct_method=dct_method)

    def other():
        image = _decode_any(image_bytes)
        if window is None:
            return image
        top, left, height, width = window
        return image[top : top + height, left : left + width]

    image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
    return tf.ensure_shape(image, [None, None, 3])


# ---------------------------------------------------------------------------- geometry


def resized_shape(height: tf.Tensor, width: tf.Tensor, shorter: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """torchvision's `Resize(int)` size rule: shorter side = `shorter`, longer side truncated."""
    height, width, shorter = (tf.cast(v, tf.int64) for v in (height, width, shorter))
    new_h = tf.where(height <= width, shorter, shorter * height // width)
    new_w = tf.where(height <= width, shorter * width // height, shorter)
    return tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32)


def _axis_window(offset, out, scale, size):
    """Source rows [start, stop) that output rows [offset, offset+out) of a resize by
    `scale` read, plus a margin covering the antialiased triangle kernel."""
    margin = tf.cast(tf.math.ceil(tf.maximum(1.0, 1.0 / scale)), tf.int32) + 1
    start = tf.cast(tf.floor(tf.cast(offset, tf.float32) / scale), tf.int32) - margin
    stop = tf.cast(tf.math.ceil(tf.cast(offset + out, tf.float32) / scale), tf.int32) + margin
    start = tf.clip_by_value(start, 0, size)
    stop = tf.clip_by_value(stop, start, size)
    return start, stop


def resized_crop(
    image_bytes, shape, resized, crop, out_size, *, window: bool = True, dct_method="INTEGER_ACCURATE"
):
    """Pixels [top:top+out_h, left:left+out_w] of the image resized to `resized` (h, w).

    Float32 [out_h, out_w, 3] in 0..255. Equals antialiased bilinear resize of the whole
    image followed by the crop (ScaleAndTranslate with the crop as a translation); with
    `window`, only the needed JPEG window is decoded.
    """
    height, width = shape[0], shape[1]
    new_h, new_w = resized
    top, left = crop
    out_h, out_w = out_size
    scale_y = tf.cast(new_h, tf.float32) / tf.cast(height, tf.float32)
    scale_x = tf.cast(new_w, tf.float32) / tf.cast(width, tf.float32)
    if window:
        y0, y1 = _axis_window(top, out_h, scale_y, height)
        x0, x1 = _axis_window(left, out_w, scale_x, width)
        image = decode(image_bytes, (y0, x0, y1 - y0, x1 - x0), dct_method=dct_method)
    else:
        y0 = x0 = tf.constant(0, tf.int32)
        image = decode(image_bytes, dct_method=dct_method)
    return _scale_translate(
        image,
        (out_h, out_w),
        (scale_y, scale_x),
        (
            tf.cast(y0, tf.float32) * scale_y - tf.cast(top, tf.float32),
            tf.cast(x0, tf.float32) * scale_x - tf.cast(left, tf.float32),
        ),
    )


def _scale_translate(image, out_size, scale, translation):
    out = tf.raw_ops.ScaleAndTranslate(
        images=image[None],
        size=tf.stack([tf.cast(v, tf.int32) for v in out_size]),
        scale=tf.stack(scale),
        translation=tf.stack(translation),
        kernel_type="triangle",
        antialias=True,
    )[0]
    # Bilinear weights are non-negative, so this only removes float rounding outside 0..255.
    return tf.ensure_shape(tf.clip_by_value(out, 0.0, 255.0), [None, None, 3])


def resize_shorter(image: tf.Tensor, shorter) -> tf.Tensor:
    """A decoded image resized (antialiased bilinear, float32) to shorter side `shorter`."""
    shape = tf.shape(image)
    new_h, new_w = resized_shape(shape[0], shape[1], shorter)
    zero = tf.constant(0.0)
    return _scale_translate(
        image,
        (new_h, new_w),
        (
            tf.cast(new_h, tf.float32) / tf.cast(shape[0], tf.float32),
            tf.cast(new_w, tf.float32) / tf.cast(shape[1], tf.float32),
        ),
        (zero, zero),
    )


def center_offsets(height, width, crop_h, crop_w):
    """torchvision CenterCrop's offsets: round((size - crop) / 2), half to even as Python's round."""
    top = tf.round(tf.cast(height - crop_h, tf.float32) / 2.0)
    left = tf.round(tf.cast(width - crop_w, tf.float32) / 2.0)
    return tf.cast(top, tf.int32), tf.cast(left, tf.int32)


# ---------------------------------------------------------------------------- pixel ops


def normalize(
    image: tf.Tensor, mean: Sequence[float] = MEAN_RGB, std: Sequence[float] = STD_RGB
) -> tf.Tensor:
    """(image - mean) / std per RGB channel, in the 0..255 units of `image`."""
    return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def pca_lighting(image: tf.Tensor, alpha: tf.Tensor) -> tf.Tensor:
    """AlexNet lighting noise: adds EIGVEC @ (alpha * EIGVAL) to every pixel (0..255 units)."""
    shift = tf.linalg.matvec(tf.constant(EIGVEC, tf.float32), alpha * tf.constant(EIGVAL, tf.float32))
    return image + shift


def _seeds(seed: tf.Tensor, n: int) -> tf.Tensor:
    return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), n)


def _flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    coin = tf.random.stateless_uniform([], seed=seed) < 0.5
    return tf.cond(coin, lambda: tf.reverse(image, axis=[1]), lambda: image)


# ---------------------------------------------------------------------------- train


def paper_params(seed, shape, image_size: int = 224, scale_range=(256, 480)):
    """The paper transform's random draws for one image of `shape` (h, w).

    Returns (shorter, (new_h, new_w), (top, left), flip bool, alpha float32 [3] ~ N(0, 1)).
    """
    seeds = _seeds(seed, 4)
    lo, hi = int(scale_range[0]), int(scale_range[1])
    shorter = tf.random.stateless_uniform([], seed=seeds[0], minval=lo, maxval=hi + 1, dtype=tf.int32)
    new_h, new_w = resized_shape(shape[0], shape[1], shorter)
    uniform = tf.random.stateless_uniform([2], seed=seeds[1])
    top = tf.cast(uniform[0] * tf.cast(new_h - image_size + 1, tf.float32), tf.int32)
    left = tf.cast(uniform[1] * tf.cast(new_w - image_size + 1, tf.float32), tf.int32)
    top = tf.minimum(top, new_h - image_size)
    left = tf.minimum(left, new_w - image_size)
    flip = tf.random.stateless_uniform([], seed=seeds[2]) < 0.5
    alpha = tf.random.stateless_normal([3], seed=seeds[3])
    return shorter, (new_h, new_w), (top, left), flip, alpha


def train_paper(
    image_bytes,
    seed,
    *,
    image_size: int = 224,
    scale_range=(256, 480),
    pca_std: float = 0.1,
    mean=MEAN_RGB,
    std=STD_RGB,
) -> tf.Tensor:
    """He et al. 2015 Sec. 3.4 augmentation; float32 [image_size, image_size, 3], normalised.

    Shorter side to a uniform integer in `scale_range` (inclusive), a uniform crop, flip with
    probability 1/2, PCA lighting with alpha ~ N(0, pca_std), then (x - mean) / std. Pass
    std=(1, 1, 1) for the paper's mean subtraction alone. `scale_range[0]` must be >= image_size.
    """
    shape = image_shape(image_bytes)
    _, resized, crop, flip, alpha = paper_params(seed, shape, image_size, scale_range)
    image = resized_crop(
        image_bytes, shape, resized, crop, (image_size, image_size), dct_method="INTEGER_FAST"
    )
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    image = pca_lighting(image, alpha * pca_std) if pca_std else image
    return tf.ensure_shape(normalize(image, mean, std), [image_size, image_size, 3])


def inception_window(seed, shape, area_range=(0.08, 1.0), aspect_range=(3 / 4, 4 / 3)):
    """(top, left, height, width) of a random-resized crop; the whole image if 10 draws fail."""
    whole = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.concat([shape, [3]], 0),
        bounding_boxes=whole,
        seed=seed,
        min_object_covered=area_range[0],
        aspect_ratio_range=aspect_range,
        area_range=area_range,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin[0], begin[1], size[0], size[1]


def train_inception(
    image_bytes,
    seed,
    *,
    image_size: int = 224,
    area_range=(0.08, 1.0),
    aspect_range=(3 / 4, 4 / 3),
    mean=MEAN_RGB,
    std=STD_RGB,
) -> tf.Tensor:
    """Inception-style random-resized crop, flip, normalise; float32 [S, S, 3].

    Only the crop window is decoded (uint8), scaled down by libjpeg in the DCT domain by the
    largest power of two that keeps it >= S, then resized bilinearly to S x S. Departure
    from torchvision's RandomResizedCrop (one antialiased bilinear resize): for speed, the
    antialiasing comes from the DCT scaling, the remaining < 2x step has none.
    """
    seeds = _seeds(seed, 2)
    shape = image_shape(image_bytes)
    window = inception_window(seeds[0], shape, area_range, aspect_range)
    image = tf.cond(
        tf.io.is_jpeg(image_bytes),
        lambda: _decode_reduced(image_bytes, window, image_size),
        lambda: decode(image_bytes, window),
    )
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=False)
    image = _flip(image, seeds[1])
    return tf.ensure_shape(normalize(image, mean, std), [image_size, image_size, 3])


def _decode_reduced(image_bytes, window, image_size):
    """JPEG window decoded at 1/r scale, r in {1, 2, 4, 8} the largest keeping both sides
    >= image_size: libjpeg's DCT-domain scaling is a cheap low-pass, so the remaining
    bilinear resize shrinks by less than 2x and needs no antialiasing kernel."""
    top, left, height, width = window
    factor = tf.minimum(height, width) // image_size
    branch = tf.cast(factor >= 2, tf.int32) + tf.cast(factor >= 4, tf.int32) + tf.cast(factor >= 8, tf.int32)

    def at(ratio):
        def fn():
            crop = tf.stack(
                [top // ratio, left // ratio, tf.maximum(1, height // ratio), tf.maximum(1, width // ratio)]
            )
            return tf.io.decode_and_crop_jpeg(
                image_bytes, crop, channels=3, ratio=ratio, dct_method="INTEGER_FAST"
            )

        return fn

    return tf.ensure_shape(tf.switch_case(branch, [at(1), at(2), at(4), at(8)]), [None, None, 3])


# ---------------------------------------------------------------------------- eval


def eval_center(image_bytes, *, image_size: int = 224, resize_size: int = 256, mean=MEAN_RGB, std=STD_RGB):
    """torchvision's Resize(resize_size) + CenterCrop(image_size) + Normalize: [1, S, S, 3]."""
    shape = image_shape(image_bytes)
    new_h, new_w = resized_shape(shape[0], shape[1], resize_size)
    crop = center_offsets(new_h, new_w, image_size, image_size)
    image = resized_crop(image_bytes, shape, (new_h, new_w), crop, (image_size, image_size))
    return tf.ensure_shape(normalize(image, mean, std)[None], [1, image_size, image_size, 3])


def _five_crops(image, size):
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    top, left = center_offsets(h, w, size, size)
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (top, left)]
    return [image[y : y + size, x : x + size] for y, x in corners]


def eval_ten_crop(image_bytes, *, image_size: int = 224, resize_size: int = 256, mean=MEAN_RGB, std=STD_RGB):
    """The paper's 10-crop testing (Tables 2-3) in torchvision TenCrop's order: [10, S, S, 3].

    Shorter side to `resize_size`; crops top-left, top-right, bottom-left, bottom-right,
    centre, then the same five of the horizontally flipped image.
    """
    image = resize_shorter(decode(image_bytes), resize_size)
    views = _five_crops(image, image_size) + _five_crops(tf.reverse(image, axis=[1]), image_size)
    return tf.ensure_shape(normalize(tf.stack(views), mean, std), [10, image_size, image_size, 3])


def eval_multi_scale(image_bytes, *, scales=(224, 256, 384, 480, 640), mean=MEAN_RGB, std=STD_RGB):
    """Table 4's multi-scale testing, batchable: a tuple with one [2, s, s, 3] per scale s.

    For each s: shorter side resized to s, the centre s x s square, and its horizontal
    flip. Departure from the paper: the paper runs the network fully-convolutionally on
    the whole resized image (any aspect ratio) and averages the score maps; a square centre
    crop keeps batch shapes static, so the parts of the longer side outside the square are
    not seen (nothing is lost for square images). Scores are then averaged over all views.
    """
    shape = image_shape(image_bytes)
    image = decode(image_bytes)
    groups = []
    for s in scales:
        new_h, new_w = resized_shape(shape[0], shape[1], s)
        top, left = center_offsets(new_h, new_w, s, s)
        scale_y = tf.cast(new_h, tf.float32) / tf.cast(shape[0], tf.float32)
        scale_x = tf.cast(new_w, tf.float32) / tf.cast(shape[1], tf.float32)
        view = _scale_translate(
            image, (s, s), (scale_y, scale_x), (-tf.cast(top, tf.float32), -tf.cast(left, tf.float32))
        )
        groups.append(
            tf.ensure_shape(normalize(tf.stack([view, tf.reverse(view, axis=[1])]), mean, std), [2, s, s, 3])
        )
    return tuple(groups)
