"""``fmaml.data`` Omniglot: the background zips, splits, rotations, episodes and one-shot runs.

Tests marked by the ``chars``/``runs`` fixtures read the official zips in the shared data folder
(``../shared/data/omniglot`` from the repository root) and skip without it; the rest build tiny
zips of their own in ``tmp_path``.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import pytest
import torch

import fmaml
from fmaml.data import (
    OmniglotCharacters,
    OneShotRun,
    as_tasks,
    load_background,
    load_one_shot_runs,
    rotate,
    sample_episodes,
    split,
)

Image = pytest.importorskip("PIL.Image", reason="fmaml.data reads Omniglot's PNGs with Pillow")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"
SMALL1, SMALL2 = DATA / "images_background_small1.zip", DATA / "images_background_small2.zip"


def _need_data() -> None:
    if not (SMALL1.is_file() and SMALL2.is_file() and (DATA / "all_runs.zip").is_file()):
        pytest.skip(f"the Omniglot zips are not in {DATA}")


@pytest.fixture(scope="module")
def chars() -> OmniglotCharacters:
    _need_data()
    return load_background(DATA)


@pytest.fixture(scope="module")
def per_zip() -> tuple[OmniglotCharacters, OmniglotCharacters]:
    _need_data()
    return OmniglotCharacters.from_zips(SMALL1), OmniglotCharacters.from_zips([SMALL2])


@pytest.fixture(scope="module")
def runs() -> list[OneShotRun]:
    _need_data()
    return load_one_shot_runs(DATA)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def png(ink: list[tuple[int, int, int, int]], size: int = 105) -> bytes:
    """A 1-bit PNG as in Omniglot: white background, black ink in the given boxes."""
    image = Image.new("1", (size, size), 1)
    for box in ink:
        image.paste(0, box)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def write_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def tiny_background(path: Path, characters: list[str], drawings: int = 20) -> Path:
    """A background zip whose drawing ``d`` of character ``c`` has ink in box ``(c, d)`` only."""
    entries = {}
    for c, name in enumerate(characters):
        for d in range(drawings):
            box = (5 * d, 5 * c, 5 * d + 5, 5 * c + 5)
            entries[f"{path.stem}/{name}/{d:04d}_{d + 1:02d}.png"] = png([box])
    return write_zip(path, entries)


def synthetic(n_classes: int = 6, size: int = 4) -> OmniglotCharacters:
    """Classes whose drawing ``d`` of class ``c`` has pixel (0, 0) = c and pixel (0, 1) = d."""
    pixels = torch.zeros(n_classes, 20, 1, size, size, dtype=torch.uint8)
    pixels[:, :, 0, 0, 0] = torch.arange(n_classes, dtype=torch.uint8)[:, None]
    pixels[:, :, 0, 0, 1] = torch.arange(20, dtype=torch.uint8)
    return OmniglotCharacters(pixels, tuple(f"A/character{c:02d}" for c in range(n_classes)))


# --- the official background zips -----------------------------------------------------------------


def test_counts_per_zip_and_deduplicated_union(chars, per_zip):
    small1, small2 = per_zip
    assert len(small1) == 136 and len(small2) == 156
    assert len(chars) == 242  # Greek (24) and Latin (26) are in both zips
    shared = set(small1.names) & set(small2.names)
    assert {name.split("/")[0] for name in shared} == {"Greek", "Latin"} and len(shared) == 50
    assert set(chars.names) == set(small1.names) | set(small2.names)
    assert list(chars.names) == sorted(chars.names)
    assert all(re.fullmatch(r"[^/]+/character\d\d", name) for name in chars.names)


def test_shared_characters_are_the_same_drawings_in_both_zips(chars, per_zip):
    small1, small2 = per_zip
    index = {name: i for i, name in enumerate(chars.names)}
    for zip_chars in (small1, small2):
        for i, name in enumerate(zip_chars.names):
            assert torch.equal(zip_chars.pixels[i], chars.pixels[index[name]]), name


def test_image_tensors_shapes_range_and_ink_is_one(chars):
    assert chars.pixels.shape == (242, 20, 1, 28, 28) and chars.pixels.dtype == torch.uint8
    assert chars.n_drawings == 20 and chars.image_size == 28
    images = chars.images
    assert images.shape == (242, 20, 1, 28, 28) and images.dtype == torch.float32
    assert images.min() == 0 and images.max() == 1
    assert torch.equal(images, chars.pixels.float() / 255)
    # strokes are thin: mostly background (0), and the border is blank
    assert 0.03 < images.mean() < 0.2
    assert images[..., 0, :].mean() < 0.01 and images[..., :, -1].mean() < 0.01
    # every drawing has ink
    assert (images.amax(dim=(-1, -2, -3)) > 0.5).all()


def test_load_background_takes_explicit_files_and_sizes(chars):
    _need_data()
    one = load_background(DATA, files=["images_background_small1.zip"], image_size=14)
    assert one.pixels.shape == (136, 20, 1, 14, 14)
    assert set(one.names) <= set(chars.names)


# --- decoding, on a zip of our own ----------------------------------------------------------------


def test_decoding_inverts_keeps_105_and_resizes(tmp_path):
    path = tiny_background(tmp_path / "images_background_tiny.zip", ["Alpha/character01"])
    full = load_background(tmp_path, image_size=105)
    assert full.names == ("Alpha/character01",) and full.pixels.shape == (1, 20, 1, 105, 105)
    for d in range(20):  # ink exactly where the PNG is black
        expected = torch.zeros(105, 105, dtype=torch.uint8)
        expected[0:5, 5 * d : 5 * d + 5] = 255
        assert torch.equal(full.pixels[0, d, 0], expected)
    small = OmniglotCharacters.from_zips(path, image_size=21)  # 105 / 5: one box = one pixel
    assert small.pixels.shape == (1, 20, 1, 21, 21)
    for d in range(20):
        assert small.pixels[0, d, 0].flatten().argmax() == d  # the pixel (0, d)
        assert small.pixels[0, d, 0, 0, d] > 200


def test_drawings_are_sorted_and_classes_by_name(tmp_path):
    tiny_background(tmp_path / "images_background_b.zip", ["Zeta/character02", "Beta/character01"])
    loaded = load_background(tmp_path, image_size=105)
    assert loaded.names == ("Beta/character01", "Zeta/character02")
    # Beta was written second (row band 1), Zeta first (row band 0)
    assert loaded.pixels[0, 0, 0, 5, 0] == 255 and loaded.pixels[1, 0, 0, 0, 0] == 255


# --- errors ---------------------------------------------------------------------------------------


def test_missing_data_dir_in_the_library_words(tmp_path):
    """The library names its own arguments, never the command line's options."""
    missing = tmp_path / "nowhere"
    with pytest.raises(
        FileNotFoundError,
        match=rf"^load_background: `data_dir` '{re.escape(str(missing))}' does not exist; pass "
        r"the folder that holds the Omniglot zips \(images_background\*\.zip\)$",
    ):
        load_background(missing)
    (tmp_path / "file").write_text("")
    with pytest.raises(FileNotFoundError, match=r"^load_background: `data_dir` .* is not a dir"):
        load_background(tmp_path / "file")
    with pytest.raises(FileNotFoundError) as info:
        load_background("/nonexistent")
    assert "--" not in str(info.value)


def test_an_empty_zip_beside_good_ones_is_an_error(tmp_path):
    """An empty (valid) zip among several is a broken download, not fewer characters."""
    tiny_background(tmp_path / "images_background_a.zip", ["Alpha/character01"])
    write_zip(tmp_path / "images_background_b.zip", {})
    with pytest.raises(
        ValueError,
        match=r"images_background_b\.zip holds no character images .*download it "
        r"again .*or remove it to use only images_background_a\.zip",
    ):
        load_background(tmp_path, image_size=105)
    (tmp_path / "images_background_b.zip").unlink()
    assert len(load_background(tmp_path, image_size=105)) == 1


def test_no_zips_in_data_dir(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(FileNotFoundError, match=r"no images_background\*\.zip zips in data dir"):
        load_background(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no file \['images_evaluation.zip'\]"):
        load_background(tmp_path, files=["images_evaluation.zip"])


def test_zip_with_a_wrong_layout_names_the_zip_and_the_entry(tmp_path):
    write_zip(
        tmp_path / "images_background_flat.zip", {"images_background_flat/Greek/a.png": png([])}
    )
    with pytest.raises(
        ValueError,
        match=r"unexpected layout in images_background_flat\.zip: first bad entry "
        r"'images_background_flat/Greek/a\.png'",
    ):
        load_background(tmp_path)


def test_zip_with_two_roots_or_a_wrong_drawing_count(tmp_path):
    a = tiny_background(tmp_path / "a.zip", ["A/character01"])
    with zipfile.ZipFile(a, "a") as archive:
        archive.writestr("other_root/A/character01/x.png", png([]))
    with pytest.raises(ValueError, match=r"first bad entry 'other_root/A/character01/x\.png'"):
        OmniglotCharacters.from_zips(a)
    b = tiny_background(tmp_path / "b.zip", ["A/character01"], drawings=19)
    with pytest.raises(ValueError, match=r"character A/character01 in b\.zip has 19 drawings"):
        OmniglotCharacters.from_zips([b])


def test_corrupt_zip_and_corrupt_png(tmp_path):
    (tmp_path / "images_background_bad.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(ValueError, match=r"images_background_bad\.zip is not a valid zip file"):
        load_background(tmp_path)
    bad_png = write_zip(
        tmp_path / "c.zip", {f"c/A/character01/{d:02d}.png": b"not a png" for d in range(20)}
    )
    with pytest.raises(ValueError, match=r"c\.zip is corrupt: 'c/A/character01/00\.png' is not"):
        OmniglotCharacters.from_zips(bad_png)


def test_bad_image_size_and_bad_construction():
    with pytest.raises(ValueError, match=r"`image_size` must be an int >= 1, got 0"):
        load_background(DATA, image_size=0)
    with pytest.raises(ValueError, match=r"`pixels` must be a uint8 tensor"):
        OmniglotCharacters(torch.zeros(2, 20, 1, 4, 4), ("a", "b"))
    with pytest.raises(ValueError, match=r"`names` must be 2 distinct names"):
        OmniglotCharacters(torch.zeros(2, 20, 1, 4, 4, dtype=torch.uint8), ("a", "a"))


# --- splits and rotations -------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete(chars):
    train, val = split(chars, (0.8, 0.2), seed=0)
    again = split(chars, (0.8, 0.2), seed=0)
    assert train.names == again[0].names and val.names == again[1].names
    assert torch.equal(train.pixels, again[0].pixels)
    assert len(train) == round(0.8 * 242) and len(train) + len(val) == 242
    assert not set(train.names) & set(val.names)
    assert list(train.names) == sorted(train.names)  # parts keep the name order
    assert split(chars, (0.8, 0.2), seed=1)[0].names != train.names
    index = {name: i for i, name in enumerate(chars.names)}
    for i, name in enumerate(val.names):
        assert torch.equal(val.pixels[i], chars.pixels[index[name]])


def test_split_by_counts_leaves_the_rest_out():
    parts = split(synthetic(10), (3, 4, 1), seed=5)
    assert [len(p) for p in parts] == [3, 4, 1]
    assert len(set().union(*(p.names for p in parts))) == 8


@pytest.mark.parametrize(
    ("sizes", "match"),
    [
        ((0.5, 3), r"all ints \(counts\) or all floats \(fractions\)"),
        ((5, 6), r"counts must each be >= 1 and total at most the 10 classes"),
        ((0.7, 0.4), r"fractions must each be in \(0, 1\] and total at most 1"),
        ((0.95, 0.01), r"part 1 of `sizes`=\[0.95, 0.01\] gets no class out of 10"),
        ((), r"`sizes` must be a non-empty sequence"),
    ],
)
def test_split_errors(sizes, match):
    with pytest.raises(ValueError, match=match):
        split(synthetic(10), sizes, seed=0)


def test_rotation_classes_are_rot90_of_the_originals(chars):
    rotated = rotate(chars)
    assert len(rotated) == 4 * 242 and rotated.pixels.shape[1:] == chars.pixels.shape[1:]
    originals, images = chars.images, rotated.images
    for c in (0, 100, 241):
        for k, angle in enumerate((0, 90, 180, 270)):
            assert rotated.names[4 * c + k] == f"{chars.names[c]}/rot{angle}"
            expected = torch.rot90(originals[c], k, dims=(-2, -1))
            assert torch.equal(images[4 * c + k], expected)
    # 90 degrees is counter-clockwise: the top row becomes the left column, read upwards
    assert torch.equal(images[1, 3, 0, :, 0].flip(0), originals[0, 3, 0, 0, :])
    some = rotate(chars, angles=(0, 180))
    assert len(some) == 2 * 242
    assert torch.equal(some.pixels[1], torch.rot90(chars.pixels[0], 2, dims=(-2, -1)))
    with pytest.raises(ValueError, match=r"`angles` must be distinct values among"):
        rotate(chars, angles=(0, 45))


def test_rotating_twice_is_an_error():
    once = rotate(synthetic(3))
    with pytest.raises(
        ValueError,
        match=r"`characters` are rotations already \(12 of 12 classes, "
        r"e\.g\. 'A/character00/rot0'\).*Rotate the characters once",
    ):
        rotate(once)
    with pytest.raises(ValueError, match=r"rotations already \(1 of 3"):
        rotate(OmniglotCharacters(once.pixels[:3], ("A/x", "A/y", "A/z/rot90")))
    assert len(set(once.names)) == len(once) == 12


def test_split_then_rotate_keeps_characters_on_one_side(chars):
    train, val = (rotate(part) for part in split(chars, (0.75, 0.25), seed=0))
    base = {name.rsplit("/", 1)[0] for name in train.names}
    assert not base & {name.rsplit("/", 1)[0] for name in val.names}


# --- episodes -------------------------------------------------------------------------------------


def check_episode_labels(tasks: fmaml.Tasks, source: OmniglotCharacters, k: int, q: int) -> None:
    """Every image of label c in a task is a distinct drawing of one class, distinct per c."""
    where: dict[bytes, set[tuple[int, int]]] = {}
    for c in range(len(source)):
        for d in range(source.n_drawings):
            where.setdefault(source.pixels[c, d].numpy().tobytes(), set()).add((c, d))
    (xs, ys), (xq, yq) = tasks.support, tasks.query
    n_way = int(ys.max()) + 1
    for t in range(xs.shape[0]):
        classes = []
        for label in range(n_way):
            images = torch.cat([xs[t][ys[t] == label], xq[t][yq[t] == label]])
            assert images.shape[0] == k + q
            pixels = (images * 255).round().to(torch.uint8)
            found = [where[p.numpy().tobytes()] for p in pixels]
            candidates = set.intersection(*({c for c, _ in f} for f in found))
            assert candidates, f"task {t}, label {label}: images from different classes"
            c = min(candidates)
            drawings = [min(d for cc, d in f if cc == c) for f in found]
            assert len(set(drawings)) == k + q, "support and query drawings must be distinct"
            classes.append(c)
        assert len(set(classes)) == n_way, f"task {t}: a class appears under two labels"


def test_episode_shapes_and_labels(chars):
    tasks = sample_episodes(chars, 8, n_way=5, k_shot=2, q_queries=3, generator=gen())
    (xs, ys), (xq, yq) = tasks.support, tasks.query
    assert xs.shape == (8, 10, 1, 28, 28) and xq.shape == (8, 15, 1, 28, 28)
    assert xs.dtype == torch.float32 and xs.min() >= 0 and xs.max() <= 1
    assert ys.dtype == yq.dtype == torch.long
    assert torch.equal(ys, torch.arange(5).repeat_interleave(2).expand(8, -1))
    assert torch.equal(yq, torch.arange(5).repeat_interleave(3).expand(8, -1))
    check_episode_labels(tasks, chars, 2, 3)


def test_episode_labels_on_rotated_real_characters(chars):
    rotated = rotate(split(chars, (40,), seed=0)[0])
    tasks = sample_episodes(rotated, 4, 20, 5, 15, gen(1), dtype=torch.float64)
    assert tasks.query[0].dtype == torch.float64
    check_episode_labels(tasks, rotated, 5, 15)


def test_episode_labels_exactly_on_synthetic_classes():
    source = synthetic(6)
    tasks = sample_episodes(source, 50, 3, 4, 6, gen(2))
    (xs, ys), (xq, yq) = tasks.support, tasks.query
    class_of = lambda x: (x[..., 0, 0, 0] * 255).round().long()  # noqa: E731
    drawing_of = lambda x: (x[..., 0, 0, 1] * 255).round().long()  # noqa: E731
    for t in range(50):
        picked = [class_of(xs[t][ys[t] == c]).unique() for c in range(3)]
        assert all(p.numel() == 1 for p in picked) and len({int(p) for p in picked}) == 3
        for c in range(3):
            assert torch.equal(class_of(xq[t][yq[t] == c]).unique(), picked[c])
            both = torch.cat([drawing_of(xs[t][ys[t] == c]), drawing_of(xq[t][yq[t] == c])])
            assert both.unique().numel() == 10
    # over 50 tasks every class and several label assignments turn up
    assert set(class_of(xs).unique().tolist()) == set(range(6))


def test_episodes_are_deterministic_given_the_generator():
    source = synthetic(10)
    a = sample_episodes(source, 6, 5, 1, 3, gen(4))
    b = sample_episodes(source, 6, 5, 1, 3, gen(4))
    c = sample_episodes(source, 6, 5, 1, 3, gen(5))
    for x, y in zip((*a.support, *a.query), (*b.support, *b.query), strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a.support[0], c.support[0])


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((4, 11, 1, 1), ValueError, r"`n_way`=11 exceeds the 10 classes in `chars`"),
        ((4, 5, 10, 11), ValueError, r"`k_shot` \+ `q_queries` = 10 \+ 11 = 21 exceeds the 20"),
        ((0, 5, 1, 1), ValueError, r"`n_tasks` must be an int >= 1, got 0"),
        ((4, 5, 0, 1), ValueError, r"`k_shot` must be an int >= 1, got 0"),
        ((4, 5, 1, 0), ValueError, r"`q_queries` must be an int >= 1, got 0"),
    ],
)
def test_episode_errors(args, error, match):
    with pytest.raises(error, match=match):
        sample_episodes(synthetic(10), *args, generator=gen())


def test_episode_type_errors():
    with pytest.raises(TypeError, match=r"`generator` must be a torch.Generator"):
        sample_episodes(synthetic(10), 1, 2, 1, 1, generator=0)
    with pytest.raises(TypeError, match=r"`chars` must be OmniglotCharacters"):
        sample_episodes(torch.zeros(3), 1, 2, 1, 1, generator=gen())


# --- the one-shot runs ----------------------------------------------------------------------------


def test_twenty_runs_of_twenty_way_one_shot(runs):
    assert [r.name for r in runs] == [f"run{i:02d}" for i in range(1, 21)]
    for run in runs:
        assert run.support.shape == run.query.shape == (20, 1, 28, 28)
        assert run.labels.shape == (20,) and run.labels.dtype == torch.long
        assert sorted(run.labels.tolist()) == list(range(20))  # one query per support class
        assert run.query.min() >= 0 and run.query.max() == 1 and run.support.mean() < 0.2


def test_run_labels_match_the_class_labels_file(runs):
    with zipfile.ZipFile(DATA / "all_runs.zip") as archive:
        text = archive.read("run07/class_labels.txt").decode()
    expected = {}
    for line in text.strip().split("\n"):
        item, cls = re.fullmatch(
            r"run07/test/item(\d\d)\.png run07/training/class(\d\d)\.png", line
        ).groups()
        expected[int(item) - 1] = int(cls) - 1
    assert runs[6].labels.tolist() == [expected[i] for i in range(20)]


def test_run_images_are_the_named_files_inverted():
    _need_data()
    full = load_one_shot_runs(DATA / "all_runs.zip", image_size=105)[2]
    with zipfile.ZipFile(DATA / "all_runs.zip") as archive:
        for kind, index, tensor in (
            ("training/class", 4, full.support),
            ("test/item", 17, full.query),
        ):
            with Image.open(io.BytesIO(archive.read(f"run03/{kind}{index:02d}.png"))) as image:
                gray = bytearray(image.convert("L").tobytes())
            white = torch.frombuffer(gray, dtype=torch.uint8).view(105, 105)
            assert torch.equal(tensor[index - 1, 0], 1 - white.float() / 255)


def test_as_tasks(runs):
    tasks = as_tasks(runs)
    (xs, ys), (xq, yq) = tasks.support, tasks.query
    assert xs.shape == xq.shape == (20, 20, 1, 28, 28)
    assert torch.equal(ys, torch.arange(20).expand(20, 20))
    assert torch.equal(yq, torch.stack([r.labels for r in runs]))
    assert torch.equal(xq[3], runs[3].query)
    with pytest.raises(ValueError, match=r"`runs` must be a non-empty list of OneShotRun"):
        as_tasks([])


def test_one_shot_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"all_runs\.zip does not exist"):
        load_one_shot_runs(tmp_path)
    write_zip(tmp_path / "all_runs.zip", {"run01/extra/a.png": png([])})
    with pytest.raises(ValueError, match=r"first bad entry 'run01/extra/a\.png'"):
        load_one_shot_runs(tmp_path)
    entries = {
        "run01/training/class01.png": png([]),
        "run01/test/item01.png": png([]),
        "run01/class_labels.txt": b"run01/test/item01.png,run01/training/class01.png\n",
    }
    write_zip(tmp_path / "all_runs.zip", entries)
    with pytest.raises(ValueError, match=r"class_labels\.txt line 1: expected 'run01/test/itemMM"):
        load_one_shot_runs(tmp_path)
    entries["run01/class_labels.txt"] = b"run01/test/item01.png run01/training/class01.png\n"
    run = load_one_shot_runs(write_zip(tmp_path / "ok.zip", entries), image_size=8)
    assert len(run) == 1 and run[0].labels.tolist() == [0] and run[0].query.shape == (1, 1, 8, 8)
