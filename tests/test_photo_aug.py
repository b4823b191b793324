"""Photos (issue 19): aspect-preserving preparation, the batched photo augmentation against torchvision, seeded
batches, cached photo views replayed bit for bit, mixup / cutmix labels for CE with the teacher labelling the
mixed image, precise BatchNorm statistics, and the params that name it all."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from conftest import tiny_params
from datagen import write_imagefolder
from PIL import Image

from kdpipe import config
from kdpipe.config import StudentConfig
from kdpipe.data import imagefolder, photo_aug, photo_render, splits
from kdpipe.data.batches import Split, to_float
from kdpipe.data.images import load_image
from kdpipe.distill import losses
from kdpipe.distill.views import label_photo_views
from kdpipe.params_file import ConfigError
from kdpipe.run.runtime import Runtime
from kdpipe.train import precise_bn

CPU = torch.device("cpu")
PHOTO = dict(model="tiny_cnn", augment="resized_crop", crop_padding=0, flip=True, crop_scale=(0.2, 1.0),
             color_jitter=(0.4, 0.4, 0.4), mixup_alpha=0.4, cutmix_alpha=1.0)

# ------------------------------------------------------------------------------------------- preparation


def _save(path, pixels: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def test_a_two_to_one_image_is_prepared_to_its_centre_square_not_stretched(tmp_path):
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)  # (H, W, 3): 2:1
    path = _save(tmp_path / "wide.png", wide)
    assert np.array_equal(load_image(path, "RGB", (8, 8), "center_crop"), wide[:, 4:12])  # the centre square
    tall = _save(tmp_path / "tall.png", wide.transpose(1, 0, 2).copy())  # 1:2
    assert np.array_equal(load_image(tall, "RGB", (8, 8), "center_crop"), wide.transpose(1, 0, 2)[4:12])
    # Shrunk 4× (antialiased): red and blue quarters either side of a green half. Cropped: green, apart from the
    # filter's reach into the neighbours at the two edge columns; stretched: a red quarter on the left.
    bands = np.zeros((48, 96, 3), dtype=np.uint8)
    bands[:, :24, 0], bands[:, 24:72, 1], bands[:, 72:, 2] = 255, 255, 255
    root = tmp_path / "folder"
    for cls in ("a", "b"):
        _save(root / cls / "bands.png", bands)
    prepared = imagefolder.load(root, 12)  # the prepare stage's decoder; center_crop, the image-folder default
    crop = prepared.train_x[0].permute(1, 2, 0).numpy().astype(int)  # (12, 12, 3)
    assert (crop[:, 1:-1] == [0, 255, 0]).all() and (crop[:, :, 1] >= 200).all()
    stretched = imagefolder.load(root, 12, resize="stretch").train_x[0].permute(1, 2, 0).numpy().astype(int)
    assert (stretched[:, :2, 0] == 255).all() and (stretched[:, :2, 1] == 0).all()


# Computed with the code before the resize param existed (commit 4559395), on the same generated files.
DIGITS_DIGEST = "83734d8f16d707c029438b44754841a060a0f23a497e31c29f6b958421896d66"
SQUARE = ("2c640cf601e3e008378bda77de54641d9b0a0b74f47d96016ade085e910a831c",
          "9caf7d746d3dd7784e1a561086fc94d8bd2e81214a6d3e9ddeccf2f6c343626e")
STRETCHED_12x10 = ("62e988b6bd0d040ab9bccc1980f5a9f677c86e4c890a576133a2995b0d5dbc55",
                   "dbe14e1d05b35f57718378cbd7e604eda069251f87f41467b894894feb18bd3c")


def _bytes_and_digest(raw) -> tuple[str, str]:
    return (hashlib.sha256(raw.train_x.numpy().tobytes()).hexdigest(),
            splits.prepare_dataset(raw, 0.2, 0.2, 0)["digest"])


def test_square_datasets_prepare_the_same_bytes_and_digest_as_before(tmp_path):
    from kdpipe.data import datasets

    digits = datasets.load_raw("digits", tmp_path)
    assert splits.prepare_dataset(digits, 0.15, 0.2, 0)["digest"] == DIGITS_DIGEST  # the default params' data
    square = write_imagefolder(tmp_path / "sq", per_class=6, size=(10, 10))
    assert _bytes_and_digest(imagefolder.load(square, 8)) == SQUARE  # center_crop of a square: as before
    wide = write_imagefolder(tmp_path / "wide", per_class=6, size=(12, 10))
    assert _bytes_and_digest(imagefolder.load(wide, 8, resize="stretch")) == STRETCHED_12x10  # stretch: as before
    assert _bytes_and_digest(imagefolder.load(wide, 8))[0] != STRETCHED_12x10[0]  # the new default crops


# --------------------------------------------------------------------------------- the batched augmentation


@pytest.mark.parametrize("shape", [(24, 24), (20, 28)])
def test_batched_resized_crop_equals_torchvision_per_image(shape):
    from torchvision.transforms.v2 import functional as TF

    h, w = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, h, w, generator=gen)
    box = photo_aug.draw_crops(32, h, w, (0.08, 1.0), (3 / 4, 4 / 3), gen)
    flipped = torch.rand(32, generator=gen) < 0.5
    out = photo_aug.resized_crop(x, box, flipped, (h, w))  # one grid_sample for the batch
    for i in range(32):
        top, left, ch, cw = box[i].tolist()
        assert 0 <= top <= h - ch and 0 <= left <= w - cw
        for antialias in (True, False):  # crops only enlarge here, where antialiasing changes nothing
            ref = TF.resized_crop(x[i], top, left, ch, cw, [h, w], antialias=antialias)
            ref = TF.horizontal_flip(ref) if flipped[i] else ref
            torch.testing.assert_close(out[i], ref, atol=2e-6, rtol=0)
    smaller = photo_aug.resized_crop(x, box, flipped, (12, 10))  # a smaller output: plain bilinear, as interpolate
    ref = TF.resized_crop(x[3], *box[3].tolist(), [12, 10], antialias=False)
    torch.testing.assert_close(smaller[3], TF.horizontal_flip(ref) if flipped[3] else ref, atol=2e-6, rtol=0)


def _torchvision_view(img, box, flipped, factors, size):
    """One uint8 image as torchvision v2 augments it: resized_crop (antialiased), flip, to float, adjust_*."""
    from torchvision.transforms.v2 import functional as TF

    out = TF.resized_crop(img, *box.tolist(), list(size), antialias=True)
    out = TF.to_dtype(TF.horizontal_flip(out) if flipped else out, torch.float32, scale=True)
    b, c, s = factors.tolist()
    return TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(out, b), c), s)


@pytest.mark.parametrize("channels, shape, size", [(3, (24, 24), (24, 24)), (3, (20, 28), (20, 28)),
                                                   (3, (40, 40), (12, 10)), (1, (24, 24), (24, 24))])
def test_the_uint8_path_equals_torchvision_on_uint8_images(channels, shape, size):
    """The CPU's uint8 path resizes each box with the kernel torchvision's resized_crop uses on a uint8 image
    (antialiased: the 40 px crops shrunk to 12 × 10 take the filter), so the two agree to float rounding; the float
    path, resampling floats, differs from both by the uint8 rounding of the resized crop."""
    h, w = shape
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (24, channels, h, w), dtype=torch.uint8, generator=gen)
    d = photo_aug.draw(24, h, w, StudentConfig(**{**PHOTO, "mixup_alpha": 0.0, "cutmix_alpha": 0.0}), gen, flip=True)
    out = photo_render.render_uint8(x, d.box, d.flipped, d.jitter, size)
    assert out.dtype == torch.float32 and out.shape == (24, channels, *size) and d.flipped.any()
    for i in range(24):
        ref = _torchvision_view(x[i], d.box[i], d.flipped[i], d.jitter[i], size)
        torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=0)
    plain = photo_render.render_uint8(x, d.box, d.flipped, None, size)  # no colour: the resized crop / 255
    assert torch.equal(plain * 255, (plain * 255).round()) and not torch.equal(plain, out)
    if size == shape:
        float_path = photo_aug.render(to_float(x), None, d)
        gap = (photo_aug.render(x, None, d) - float_path).abs().max()
        assert 0 < gap < 0.02  # the uint8 rounding of the crop, through the colour factors


def test_the_uint8_path_renders_each_image_alone_whatever_the_batch_chunk_or_threads(monkeypatch):
    """Cached views are labelled in batches of one size and replayed in another: an image's view must not depend
    on the images rendered beside it, on the chunking, or on the caller's torch threads."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8, generator=gen)
    d = photo_aug.draw(20, 16, 16, StudentConfig(**PHOTO), gen, flip=True)
    whole = photo_aug.render(x, x[d.partner], d)
    rows = torch.tensor([3, 17, 4])
    assert torch.equal(photo_aug.render(x[rows], x[d.partner[rows]], d.select(rows)), whole[rows])
    monkeypatch.setattr(photo_render, "CHUNK_BYTES", 1)  # one image per task
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(photo_aug.render(x, x[d.partner], d), whole)
    finally:
        torch.set_num_threads(threads)


def test_a_large_output_reuses_a_buffer_only_once_nothing_holds_it(monkeypatch):
    monkeypatch.setattr(photo_render, "RECYCLE_BYTES", 0)  # every output size recycles
    monkeypatch.setattr(photo_render, "_SPARE", {})
    gen = torch.Generator().manual_seed(6)
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=gen)
    draws = [photo_aug.draw(4, 16, 16, StudentConfig(**PHOTO), gen, flip=True) for _ in range(4)]
    first = photo_aug.render(x, None, draws[0])
    kept = first.clone()
    second = photo_aug.render(x, None, draws[1])  # first is alive: a new buffer
    assert torch.equal(first, kept) and second.data_ptr() != first.data_ptr()
    ptr, view = first.data_ptr(), first[1:]
    del first
    third = photo_aug.render(x, None, draws[2])  # a view still holds first's buffer, second is alive
    assert third.data_ptr() not in (ptr, second.data_ptr()) and torch.equal(view, kept[1:])
    del view
    with torch.inference_mode():  # the views' labelling renders under inference mode
        fourth = photo_aug.render(x, None, draws[3])
    assert fourth.data_ptr() == ptr  # released: reused
    torch.testing.assert_close(fourth, photo_aug.render(to_float(x), None, draws[3]), atol=0.02, rtol=0)
    del fourth
    assert photo_aug.render(x, None, draws[0]).data_ptr() == ptr and torch.equal(photo_aug.render(x, None, draws[0]), kept)


def test_crop_draws_respect_scale_and_ratio_and_fall_back_to_the_centre():
    gen = torch.Generator().manual_seed(1)
    box = photo_aug.draw_crops(2000, 32, 32, (0.3, 0.6), (0.5, 2.0), gen).float()
    area, ratio = box[:, 2] * box[:, 3] / 1024, box[:, 3] / box[:, 2]
    assert area.min() > 0.25 and area.max() < 0.66 and ratio.min() > 0.45 and ratio.max() < 2.2  # rounding slack
    impossible = photo_aug.draw_crops(4, 16, 32, (0.99, 1.0), (0.2, 0.25), gen)  # never fits: the central crop
    assert impossible.tolist() == [[0, 14, 16, 4]] * 4  # torchvision: width round(16 · 0.25), centred


def test_colour_jitter_equals_torchvision_adjust_functions():
    from torchvision.transforms.v2 import functional as TF

    gen = torch.Generator().manual_seed(2)
    x = torch.rand(8, 3, 10, 10, generator=gen)
    factors = photo_aug.draw_jitter(8, (0.4, 0.4, 0.4), gen)
    out = photo_aug.color(x, factors)
    for i in range(8):
        b, c, s = factors[i].tolist()
        ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[i], b), c), s)
        torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=0)
    assert torch.equal(photo_aug.draw_jitter(3, (0.0, 0.0, 0.0), gen), torch.ones(3, 3))


def test_the_same_seed_gives_the_same_batch():
    cfg = StudentConfig(**PHOTO)
    x, y = torch.rand(16, 3, 12, 12), torch.arange(16) % 4

    def batch(seed):
        return photo_aug.augment(x, y, cfg, torch.Generator().manual_seed(seed), 4, flip=True)

    (a, ya), (b, yb), (c, _) = batch(5), batch(5), batch(6)
    assert torch.equal(a, b) and torch.equal(ya, yb) and not torch.equal(a, c)
    assert ya.shape == (16, 4) and torch.allclose(ya.sum(1), torch.ones(16))


# ----------------------------------------------------------------------- cached views, mixing, the teacher


class _Recorder(torch.nn.Module):
    """A stand-in teacher that records each image it labels and answers with a per-image signature."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return x.flatten(1)[:, :4] * 10


def test_a_cached_photo_view_replays_bit_for_bit_the_image_the_teacher_labelled():
    gen = torch.Generator().manual_seed(0)
    train = Split(torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8, generator=gen), torch.arange(24) % 4)
    recipe = StudentConfig(**PHOTO)
    teacher = _Recorder()
    views = label_photo_views(teacher, train.x, 3, recipe, seed=7, rt=Runtime(CPU, "fp32"), batch_size=10)
    seen = torch.cat([torch.stack(teacher.seen[b * 3:(b + 1) * 3], 1) for b in range(3)])  # (24, 3, C, H, W)
    d = views.photo
    assert d.box.shape == (24, 3, 4) and views.logits.shape == (24, 3, 4)
    full = (d.box[..., 2] == 16) & (d.box[..., 3] == 16)
    cut, mixup = d.cut[..., 2] > 0, (d.cut[..., 2] == 0) & (d.lam < 0.99)
    assert (~full).any() and d.flipped.any() and (d.jitter != 1).all() and cut.any() and mixup.any()

    idx = torch.tensor([5, 0, 23, 17, 5, 9, 11, 2])
    replayed, rows, labels = views.reading(train).augment(train.x[idx], idx, train.y[idx],  # uint8, as the step
                                                          torch.Generator().manual_seed(1))
    image, view = rows // 3, rows % 3
    assert torch.equal(image, idx)
    assert torch.equal(replayed, seen[image, view])  # bit for bit: box, flip, colour and partner replayed
    lam, partner = d.lam[image, view], d.partner[image, view].long()
    expected = photo_aug.mixed_targets(train.y[idx], train.y[partner], lam, 4)
    assert torch.equal(labels, expected) and (labels.max(1).values < 1).any()  # labels mixed as the images were
    torch.testing.assert_close(views.flat_logits()[rows].float(), (replayed.flatten(1)[:, :4] * 10).half().float())

    again = label_photo_views(_Recorder(), train.x, 3, recipe, seed=7, rt=Runtime(CPU), batch_size=24)
    assert all(torch.equal(getattr(again.photo, f), getattr(d, f)) for f in ("box", "partner", "lam", "cut"))
    state = views.state()
    assert state["mixes"] and state["photo"]["box"].dtype == torch.int16


def test_mixup_and_cutmix_mix_the_labels_for_ce_and_the_teacher_sees_the_mixed_image():
    """A live teacher: the engine's step augments (resized crop, flip, colour, mixup / cutmix), the teacher labels
    exactly the images the student trains on, and the CE term takes the mixed labels."""
    from kdpipe.distill.methods import PRESETS
    from kdpipe.models.zoo import build_model
    from kdpipe.train.distiller import distill_loss
    from kdpipe.train.engine import _Trainer
    from kdpipe.train.objective import Objective

    cfg = StudentConfig(**PHOTO, batch_size=16)
    gen = torch.Generator().manual_seed(3)
    xb, yb = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8, generator=gen), torch.arange(16) % 4
    teacher, student = _Recorder(), build_model("tiny_cnn", 3, 4)
    logits_seen = []
    student.register_forward_hook(lambda _m, _i, out: logits_seen.append(out.detach()))
    loss_fn = distill_loss(config.DistillConfig(), teacher, weights=PRESETS["kd"])
    trainer = _Trainer.build(student, cfg, Runtime(CPU, "fp32", channels_last=False), 0, Objective(loss_fn=loss_fn))
    _, y, parts = trainer.step(torch.arange(16), xb, yb, lr=0.01)

    expected_x, expected_y = photo_aug.augment(xb, yb, cfg, Runtime(CPU).generator(1), 4, flip=True)  # uint8 in
    assert torch.equal(teacher.seen[0], expected_x)  # the teacher labelled the mixed images the student saw
    assert torch.equal(y, expected_y) and (y.max(1).values < 1).sum() >= 4  # soft labels, several mixed
    ce = losses.cross_entropy(logits_seen[0], expected_y)
    torch.testing.assert_close(parts["ce"], ce)
    d = photo_aug.draw(16, 12, 12, cfg, Runtime(CPU).generator(1), flip=True)
    log_p = torch.log_softmax(logits_seen[0].float(), 1)
    per_image = -(d.lam * log_p[torch.arange(16), yb] + (1 - d.lam) * log_p[torch.arange(16), yb[d.partner]])
    torch.testing.assert_close(parts["ce"], per_image.mean())  # λ·CE(own label) + (1 − λ)·CE(partner's)


@pytest.mark.parametrize("box_by_box", [True, False], ids=["cpu boxes", "masked (the GPU's)"])
def test_mix_in_place_blends_mixup_rows_and_pastes_cutmix_boxes_exactly(monkeypatch, box_by_box):
    """mix_ works in place on the batch; each row equals its definition, pixel for pixel: λ·x + (1 − λ)·partner
    for a mixup row, x with the partner's pixels inside the box (and only there) for a cutmix row."""
    gen = torch.Generator().manual_seed(7)
    cfg = StudentConfig(**PHOTO)
    x, partner = torch.rand(24, 3, 10, 14, generator=gen), torch.rand(24, 3, 10, 14, generator=gen)
    d = photo_aug.draw(24, 10, 14, cfg, gen, flip=True)
    cut = d.cut.long()
    assert 0 < int((cut[:, 2] > 0).sum()) < 24  # both kinds of rows
    if not box_by_box:  # the masked branch is the one a CUDA batch takes; run it on this CPU's batch
        monkeypatch.setattr(photo_aug, "_pastes_box_by_box", lambda t: False)
    out = photo_aug.mix_(x.clone(), partner, d.lam, d.cut)
    for i in range(24):
        top, left, h, w = cut[i].tolist()
        if h == 0:
            assert torch.equal(out[i], d.lam[i] * x[i] + (1 - d.lam[i]) * partner[i])
            continue
        expected = x[i].clone()
        expected[:, top : top + h, left : left + w] = partner[i, :, top : top + h, left : left + w]
        assert torch.equal(out[i], expected), i


def test_cross_entropy_takes_soft_labels_and_keeps_the_hard_path():
    logits, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 0])
    onehot = torch.nn.functional.one_hot(y, 5).to(torch.float32)
    for eps in (0.0, 0.1):
        torch.testing.assert_close(losses.cross_entropy(logits, onehot, eps), losses.cross_entropy(logits, y, eps))
    assert torch.equal(losses.cross_entropy(logits, y), torch.nn.functional.cross_entropy(logits, y))


def test_recalibrated_batchnorm_holds_the_sample_statistics():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.01))
    train = Split(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8), torch.zeros(40, dtype=torch.long))
    read = lambda split, batches: ((i, split.x[i], split.y[i]) for i in batches)  # noqa: E731
    assert precise_bn.recalibrate(net, train, 32, Runtime(CPU, "fp32"), read) == 32
    with torch.no_grad():
        conv = net[0](to_float(train.x[:32]))  # (32, 4, 6, 6): what the BatchNorm normalised
    torch.testing.assert_close(net[1].running_mean, conv.mean((0, 2, 3)))
    torch.testing.assert_close(net[1].running_var, conv.var((0, 2, 3), unbiased=True))
    assert net[1].momentum == 0.01 and net.training


# ----------------------------------------------------------------------------------------------- params


@pytest.mark.parametrize("section, overrides, message", [
    ("student", {"mixup_alpha": 0.2}, "student.mixup_alpha: only with augment: resized_crop"),
    ("teacher", {"augment": "resized_crop", "crop_padding": 2}, "teacher.crop_padding: pad_crop's zero padding"),
    ("student", {**PHOTO, "crop_scale": [0.5, 0.2]}, "student.crop_scale: must be [low, high]"),
    ("student", {**PHOTO, "color_jitter": [0.4, 2, 0]}, "student.color_jitter: each strength must be in [0, 1]"),
    ("distill", {"method": "dkd"}, "student.mixup_alpha: mixup and cutmix mix the labels, and the dkd term"),
])
def test_augmentation_params_fail_with_the_key_path(tmp_path, section, overrides, message):
    params = tiny_params(tmp_path)
    if section == "distill":
        params["student"].update({k: list(v) if isinstance(v, tuple) else v for k, v in PHOTO.items()})
    params[section].update({k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()})
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        config.from_dict(params)


def test_the_recipe_names_its_augmentation_and_mlflow_gets_it_flat(tmp_path):
    params = tiny_params(tmp_path)
    params["student"].update({k: list(v) if isinstance(v, tuple) else v for k, v in PHOTO.items()})
    flat = config.from_dict(params).flat()
    assert flat["teacher.augment"] == "pad_crop" and flat["student.augment"] == "resized_crop"
    assert flat["student.crop_scale"] == [0.2, 1.0] and flat["student.cutmix_alpha"] == 1.0
    assert flat["data.resize"] == "center_crop"
