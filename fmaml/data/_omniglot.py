"""Omniglot (Lake et al., 2015) from its official zip files, read in place.

The zips are never extracted: each PNG is decoded straight from the archive with ``zipfile`` and
Pillow, converted to 8-bit grayscale and resized with Pillow's LANCZOS filter (on the 1-bit
original Pillow would fall back to NEAREST), inverted so that ink is 1 and the background 0, and
kept in memory as ``uint8`` (255 = ink). Nothing is written to disk.

- :class:`OmniglotCharacters`: the characters of ``images_background*.zip`` (or
  ``images_evaluation.zip``), ``(C, 20, 1, S, S)``; :func:`load_background` finds the zips.
- :func:`split` (a seeded character split), :func:`rotate` (rotations as new classes) and
  :func:`sample_episodes` (N-way K-shot :class:`fmaml.Tasks`).
- :func:`load_one_shot_runs` and :func:`as_tasks`: the official one-shot runs (``all_runs.zip``).
"""

from __future__ import annotations

import io
import numbers
import os
import re
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from fmaml._typing import Tasks

__all__ = [
    "OmniglotCharacters",
    "OneShotRun",
    "as_tasks",
    "load_background",
    "load_one_shot_runs",
    "rotate",
    "sample_episodes",
    "split",
]

#: Drawings per character in Omniglot (20 people drew each character once).
DRAWINGS = 20
#: The zips :func:`load_background` reads from a data directory.
BACKGROUND_PATTERN = "images_background*.zip"
#: The official one-shot benchmark's zip.
RUNS_ZIP = "all_runs.zip"
_URL = "https://github.com/brendenlake/omniglot/tree/master/python"
_ANGLES = (0, 90, 180, 270)
#: The suffix :func:`rotate` gives a class name.
_ROTATION = re.compile(r"/rot(0|90|180|270)$")

StrPath = str | os.PathLike[str]


@dataclass(frozen=True, eq=False, repr=False)
class OmniglotCharacters:
    """Omniglot character classes: every drawing of every class, as one ``uint8`` tensor.

    Attributes:
        pixels: ``(C, D, 1, S, S)`` ``uint8``: class, drawing (``D = 20``), channel, row,
            column; 255 is ink, 0 background. :attr:`images` is the same as floats in ``[0, 1]``.
        names: ``C`` class names, ``"Alphabet/characterNN"``; :func:`rotate` appends
            ``"/rot90"`` and the like.

    Example:
        >>> chars = OmniglotCharacters.from_zips("../shared/data/omniglot")  # doctest: +SKIP
        >>> len(chars), chars.images.shape  # doctest: +SKIP
        (242, torch.Size([242, 20, 1, 28, 28]))
    """

    pixels: torch.Tensor
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        p = self.pixels
        if not isinstance(p, torch.Tensor) or p.dtype != torch.uint8 or p.dim() != 5:
            got = f"{p.dtype} of shape {tuple(p.shape)}" if isinstance(p, torch.Tensor) else p
            raise ValueError(
                f"OmniglotCharacters: `pixels` must be a uint8 tensor (C, D, 1, S, S), got {got}."
            )
        if p.shape[2] != 1 or p.shape[3] != p.shape[4]:
            raise ValueError(
                "OmniglotCharacters: `pixels` must have one channel and square images "
                f"(C, D, 1, S, S), got shape {tuple(p.shape)}."
            )
        names = tuple(self.names)
        if len(names) != p.shape[0] or len(set(names)) != len(names):
            raise ValueError(
                f"OmniglotCharacters: `names` must be {p.shape[0]} distinct names, one per class, "
                f"got {len(names)} ({len(set(names))} distinct)."
            )
        object.__setattr__(self, "names", names)

    @classmethod
    def from_zips(
        cls,
        paths_or_dir: StrPath | Sequence[StrPath],
        image_size: int = 28,
        pattern: str = BACKGROUND_PATTERN,
    ) -> OmniglotCharacters:
        """Read the characters of Omniglot zips such as ``images_background.zip``.

        A character (``Alphabet/characterNN``) found in several zips is read once, from the first
        zip (in the order given, a directory's zips sorted by name); its drawings' file names must
        agree. Classes are sorted by name, drawings by file name.

        Args:
            paths_or_dir: a directory (every ``pattern`` zip in it), one zip, or a list of zips,
                each laid out ``<root>/<Alphabet>/<characterNN>/<drawing>.png``.
            image_size: the side ``S`` of the stored images (105 keeps the originals).
            pattern: the glob used when ``paths_or_dir`` is a directory.

        Returns:
            The characters, ``pixels`` of shape ``(C, 20, 1, S, S)``.
        """
        _check_image_size("OmniglotCharacters.from_zips", image_size)
        if isinstance(paths_or_dir, (str, os.PathLike)) and Path(paths_or_dir).is_dir():
            zips = _find_zips(
                "OmniglotCharacters.from_zips", "paths_or_dir", Path(paths_or_dir), pattern, None
            )
        elif isinstance(paths_or_dir, (str, os.PathLike)):
            zips = [Path(paths_or_dir)]
        else:
            zips = [Path(p) for p in paths_or_dir]
        if not zips:
            raise ValueError("OmniglotCharacters.from_zips: `paths_or_dir` names no zip files.")
        return _read_characters(zips, image_size)

    @property
    def images(self) -> torch.Tensor:
        """``pixels`` as ``float32`` in ``[0, 1]``, 1 = ink (a new tensor on each access)."""
        return _to_float(self.pixels, torch.float32)

    @property
    def image_size(self) -> int:
        """The side ``S`` of the square images."""
        return self.pixels.shape[-1]

    @property
    def n_drawings(self) -> int:
        """Drawings per class, ``D`` (20 for Omniglot)."""
        return self.pixels.shape[1]

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __repr__(self) -> str:
        return (
            f"OmniglotCharacters({len(self)} classes x {self.n_drawings} drawings, "
            f"{self.image_size}x{self.image_size})"
        )

    def _take(self, indices: torch.Tensor) -> OmniglotCharacters:
        return OmniglotCharacters(self.pixels[indices], tuple(self.names[i] for i in indices))


def load_background(
    data_dir: StrPath, image_size: int = 28, files: Sequence[str] | None = None
) -> OmniglotCharacters:
    """The background characters in a data directory: every ``images_background*.zip`` in it.

    Args:
        data_dir: the folder holding the Omniglot zips (read in place).
        image_size: the side ``S`` of the stored images.
        files: zip file names inside ``data_dir`` to read instead of the glob, e.g.
            ``["images_background.zip"]`` or ``["images_evaluation.zip"]``.

    Returns:
        :meth:`OmniglotCharacters.from_zips` of those zips.

    Example:
        >>> chars = load_background("../shared/data/omniglot")  # doctest: +SKIP
    """
    _check_image_size("load_background", image_size)
    zips = _find_zips("load_background", "data_dir", Path(data_dir), BACKGROUND_PATTERN, files)
    return _read_characters(zips, image_size)


def split(
    characters: OmniglotCharacters, sizes: Sequence[int] | Sequence[float], seed: int
) -> tuple[OmniglotCharacters, ...]:
    """Split the classes at random into disjoint parts, e.g. train and validation.

    Split before :func:`rotate`, so that every rotation of a character lands in the same part.
    The split depends only on ``seed`` and the class list (same zips, same split); each part keeps
    the classes in their original (name) order.

    Args:
        characters: the classes to split.
        sizes: the part sizes, either all counts (ints >= 1, total at most ``len(characters)``)
            or all fractions (floats in ``(0, 1]``, total at most 1; part ``i`` ends at
            ``round(C * (f_0 + ... + f_i))``). Classes beyond the total are left out.
        seed: the seed of the random permutation.

    Returns:
        One :class:`OmniglotCharacters` per entry of ``sizes``.

    Example:
        >>> train, val = split(chars, (0.8, 0.2), seed=0)  # doctest: +SKIP
    """
    if not isinstance(characters, OmniglotCharacters):
        raise TypeError(
            f"split: `characters` must be OmniglotCharacters, got {type(characters).__name__}."
        )
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"split: `seed` must be an int, got {seed!r}.")
    bounds = _split_bounds(list(sizes) if isinstance(sizes, Sequence) else sizes, len(characters))
    order = torch.randperm(len(characters), generator=torch.Generator().manual_seed(seed))
    parts = []
    for start, stop in zip([0, *bounds[:-1]], bounds, strict=True):
        parts.append(characters._take(order[start:stop].sort().values))
    return tuple(parts)


def _split_bounds(sizes: object, n: int) -> list[int]:
    if not isinstance(sizes, list) or not sizes:
        raise ValueError(f"split: `sizes` must be a non-empty sequence, got {sizes!r}.")
    if all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in sizes):
        sizes = [int(s) for s in sizes]
        if min(sizes) < 1 or sum(sizes) > n:
            raise ValueError(
                f"split: `sizes` as counts must each be >= 1 and total at most the {n} classes, "
                f"got {sizes!r}."
            )
        bounds = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    elif all(isinstance(s, numbers.Real) and not isinstance(s, numbers.Integral) for s in sizes):
        sizes = [float(s) for s in sizes]
        if not all(0 < s <= 1 for s in sizes) or sum(sizes) > 1 + 1e-9:  # NaN fails too
            raise ValueError(
                f"split: `sizes` as fractions must each be in (0, 1] and total at most 1, "
                f"got {sizes!r}."
            )
        bounds = [min(n, round(n * sum(sizes[: i + 1]))) for i in range(len(sizes))]
    else:
        raise ValueError(
            f"split: `sizes` must be all ints (counts) or all floats (fractions), got {sizes!r}."
        )
    empty = [i for i, (a, b) in enumerate(zip([0, *bounds[:-1]], bounds, strict=True)) if a >= b]
    if empty:
        raise ValueError(
            f"split: part {empty[0]} of `sizes`={sizes!r} gets no class out of {n}; "
            "use larger fractions or counts."
        )
    return bounds


def rotate(characters: OmniglotCharacters, angles: Sequence[int] = _ANGLES) -> OmniglotCharacters:
    """Rotations as new classes: each class becomes ``len(angles)`` classes (Santoro et al., 2016).

    Rotation ``a`` of a class is ``torch.rot90(images, a // 90, dims=(-2, -1))``
    (counter-clockwise) of all its drawings. Classes come class-major: ``c0/rot0, c0/rot90, ...,
    c1/rot0, ...``. Apply after :func:`split`, so no character is on both sides of a split.

    Args:
        characters: the classes to augment.
        angles: distinct multiples of 90 among 0, 90, 180, 270 (degrees).

    Returns:
        ``len(angles) * C`` classes named ``"<name>/rot<angle>"``.

    Raises:
        ValueError: if ``characters`` hold rotations already (a name ending in ``/rot<angle>``):
            rotating twice would turn one image into several classes.
    """
    angles = tuple(angles)
    if not angles or len(set(angles)) != len(angles) or any(a not in _ANGLES for a in angles):
        raise ValueError(
            f"rotate: `angles` must be distinct values among {_ANGLES} (degrees), got {angles!r}."
        )
    rotated_names = [n for n in characters.names if _ROTATION.search(n)]
    if rotated_names:
        raise ValueError(
            f"rotate: `characters` are rotations already ({len(rotated_names)} of "
            f"{len(characters)} classes, e.g. {rotated_names[0]!r}); rotating again would make "
            "the same images several classes. Rotate the characters once, after split()."
        )
    p = characters.pixels
    rotated = torch.stack([torch.rot90(p, a // 90, dims=(-2, -1)) for a in angles], dim=1)
    names = tuple(f"{name}/rot{a}" for name in characters.names for a in angles)
    return OmniglotCharacters(rotated.reshape(-1, *p.shape[1:]), names)


def sample_episodes(
    chars: OmniglotCharacters,
    n_tasks: int,
    n_way: int,
    k_shot: int,
    q_queries: int,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> Tasks:
    """Draw ``n_tasks`` N-way K-shot classification episodes (Vinyals et al., 2016).

    Each task picks ``n_way`` distinct classes and labels them ``0..N-1`` in random order; for
    each class it picks ``k_shot + q_queries`` distinct drawings, the first ``k_shot`` for the
    support set and the rest for the query set. Images are ordered by label
    (``y = [0]*K + [1]*K + ...``). Deterministic given the generator's state.

    Args:
        chars: the classes to draw from (e.g. a :func:`split` part, :func:`rotate`-d).
        n_tasks: the number of tasks ``T`` (>= 1).
        n_way: classes per task ``N`` (at most ``len(chars)``).
        k_shot: support drawings per class ``K`` (>= 1).
        q_queries: query drawings per class ``Q`` (>= 1, ``K + Q <= 20``).
        generator: the source of randomness (on CPU, or the device of ``chars.pixels``).
        dtype: the floating dtype of the images.

    Returns:
        ``Tasks(support=(x, y), query=(x, y))``: support ``x`` of shape ``(T, N*K, 1, S, S)`` in
        ``[0, 1]`` and ``y`` ``(T, N*K)`` int64 labels in ``0..N-1``; query ``(T, N*Q, ...)``.

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> tasks = sample_episodes(chars, 32, 5, 1, 15, gen)  # doctest: +SKIP
        >>> tasks.support[0].shape  # doctest: +SKIP
        torch.Size([32, 5, 1, 28, 28])
    """
    name = "sample_episodes"
    if not isinstance(chars, OmniglotCharacters):
        raise TypeError(f"{name}: `chars` must be OmniglotCharacters, got {type(chars).__name__}.")
    for arg, value in (("n_tasks", n_tasks), ("n_way", n_way), ("k_shot", k_shot)):
        _check_count(name, arg, value)
    _check_count(name, "q_queries", q_queries)
    if n_way > len(chars):
        raise ValueError(
            f"{name}: `n_way`={n_way} exceeds the {len(chars)} classes in `chars`; use fewer "
            "ways, more characters, or rotate() them into more classes."
        )
    if k_shot + q_queries > chars.n_drawings:
        raise ValueError(
            f"{name}: `k_shot` + `q_queries` = {k_shot} + {q_queries} = {k_shot + q_queries} "
            f"exceeds the {chars.n_drawings} drawings per character; lower one of them."
        )
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{name}: `generator` must be a torch.Generator, got {type(generator).__name__}; "
            "pass e.g. torch.Generator().manual_seed(0)."
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name}: `dtype` must be a floating torch.dtype, got {dtype!r}.")

    n, m = k_shot + q_queries, chars.n_drawings
    # argsort of float64 uniforms: a uniformly random permutation per row, vectorised
    classes = _random_perms((n_tasks, len(chars)), generator)[:, :n_way]
    drawings = _random_perms((n_tasks, n_way, m), generator)[..., :n]
    classes, drawings = classes.to(chars.pixels.device), drawings.to(chars.pixels.device)
    x = _to_float(chars.pixels[classes[:, :, None], drawings], dtype)  # (T, N, K+Q, 1, S, S)
    labels = torch.arange(n_way, device=x.device)

    def part(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_class = images.shape[2]
        y = labels.repeat_interleave(per_class).expand(n_tasks, -1).clone()
        return images.reshape(n_tasks, n_way * per_class, *images.shape[3:]), y

    return Tasks(support=part(x[:, :, :k_shot]), query=part(x[:, :, k_shot:]))


def _random_perms(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, dtype=torch.float64, device=generator.device)
    return u.argsort(dim=-1)


class OneShotRun(NamedTuple):
    """One run of the official 20-way one-shot benchmark (Lake et al., 2015).

    Attributes:
        name: ``"runNN"``.
        support: ``(20, 1, S, S)`` float in ``[0, 1]``, ``training/class01.png`` to ``class20``.
        query: ``(20, 1, S, S)``, ``test/item01.png`` to ``item20``.
        labels: ``(20,)`` int64: query ``i`` shows the character of ``support[labels[i]]``,
            as ``class_labels.txt`` says.
    """

    name: str
    support: torch.Tensor
    query: torch.Tensor
    labels: torch.Tensor


def load_one_shot_runs(path_or_dir: StrPath, image_size: int = 28) -> list[OneShotRun]:
    """The official one-shot runs from ``all_runs.zip``, read in place.

    Each ``runNN/class_labels.txt`` line reads ``runNN/test/itemMM.png runNN/training/classKK.png``:
    query ``itemMM`` is of the class of support ``classKK``, so its label is the index of
    ``classKK`` among the run's support images in file-name order. Images get the same
    preprocessing as :func:`load_background` (ink = 1, LANCZOS to ``image_size``).

    Args:
        path_or_dir: ``all_runs.zip`` or the directory holding it.
        image_size: the side ``S`` of the images.

    Returns:
        The runs, sorted by name (20 for the official zip).

    Example:
        >>> runs = load_one_shot_runs("../shared/data/omniglot")  # doctest: +SKIP
        >>> tasks = as_tasks(runs)  # doctest: +SKIP
    """
    name = "load_one_shot_runs"
    _check_image_size(name, image_size)
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / RUNS_ZIP
    if not path.is_file():
        raise FileNotFoundError(
            f"{name}: {path} does not exist; pass the path of {RUNS_ZIP} (or its folder), "
            f"downloaded from {_URL}."
        )
    with _open_zip(name, path) as archive:
        runs = _index_runs(path, archive)
        out = []
        for run, (training, test, labels_file) in sorted(runs.items()):
            labels = _parse_class_labels(path, archive, run, training, test, labels_file)
            support = _decode_many(path, archive, training, image_size).unsqueeze(1)
            query = _decode_many(path, archive, test, image_size).unsqueeze(1)
            out.append(
                OneShotRun(
                    run, _to_float(support, torch.float32), _to_float(query, torch.float32), labels
                )
            )
    return out


def as_tasks(runs: Sequence[OneShotRun]) -> Tasks:
    """The one-shot runs as one batch of tasks, for evaluation with :class:`fmaml.MAML`.

    Args:
        runs: from :func:`load_one_shot_runs`, all of the same shapes.

    Returns:
        ``Tasks(support=(x, y), query=(x, y))`` with ``T = len(runs)``: support ``x``
        ``(T, 20, 1, S, S)`` and ``y = arange(20)`` per task; query ``x`` ``(T, 20, 1, S, S)``
        and ``y`` the runs' labels ``(T, 20)``.
    """
    runs = list(runs)
    if not runs or not all(isinstance(r, OneShotRun) for r in runs):
        raise ValueError("as_tasks: `runs` must be a non-empty list of OneShotRun.")
    shapes = {(r.support.shape, r.query.shape, r.labels.shape) for r in runs}
    if len(shapes) != 1:
        raise ValueError(f"as_tasks: the runs differ in shape ({sorted(map(str, shapes))}).")
    n = runs[0].support.shape[0]
    support_y = torch.arange(n).expand(len(runs), n).clone()
    return Tasks(
        support=(torch.stack([r.support for r in runs]), support_y),
        query=(torch.stack([r.query for r in runs]), torch.stack([r.labels for r in runs])),
    )


# --- reading -------------------------------------------------------------------------------------


def _find_zips(
    who: str, arg: str, data_dir: Path, pattern: str, files: Sequence[str] | None
) -> list[Path]:
    if not data_dir.is_dir():
        what = "is not a directory" if data_dir.exists() else "does not exist"
        raise FileNotFoundError(
            f"{who}: `{arg}` {str(data_dir)!r} {what}; pass the folder that holds the Omniglot "
            f"zips ({pattern})"
        )
    if files is not None:
        if isinstance(files, (str, os.PathLike)):
            files = [files]
        zips = [data_dir / f for f in files]
        missing = [str(z.name) for z in zips if not z.is_file()]
        if missing or not zips:
            raise FileNotFoundError(
                f"{who}: no file {missing or files!r} in data directory {data_dir} "
                f"(it holds {_listing(data_dir)})."
            )
        return zips
    zips = sorted(data_dir.glob(pattern))
    if not zips:
        raise FileNotFoundError(
            f"{who}: no {pattern} zips in data directory {data_dir} (it holds "
            f"{_listing(data_dir)}); download images_background.zip "
            f"from {_URL} into it."
        )
    return zips


def _listing(directory: Path, most: int = 8) -> str:
    """The sorted names in ``directory``, at most ``most`` of them."""
    names = sorted(p.name for p in directory.iterdir())
    more = f", ... ({len(names) - most} more)" if len(names) > most else ""
    return (", ".join(names[:most]) + more) or "nothing"


def _open_zip(who: str, path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise FileNotFoundError(f"{who}: {path} does not exist.")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(
            f"{who}: {path} is not a valid zip file (corrupt or truncated? {e}); "
            f"download it again from {_URL}."
        ) from e


def _read_characters(zips: list[Path], image_size: int) -> OmniglotCharacters:
    """Index every zip, keep each character from its first zip, decode, stack."""
    who = "OmniglotCharacters.from_zips"
    plan: dict[str, tuple[int, list[str]]] = {}  # name -> (zip index, entries)
    archives = [_open_zip(who, z) for z in zips]
    try:
        for i, (path, archive) in enumerate(zip(zips, archives, strict=True)):
            found = _index_characters(path, archive)
            if not found and len(zips) > 1:
                raise ValueError(
                    f"{who}: {path} holds no character images (an empty or unfinished "
                    f"download?); download it again from {_URL}, or remove it to use only "
                    f"{', '.join(z.name for z in zips if z != path)}."
                )
            for name, entries in found.items():
                if name not in plan:
                    plan[name] = (i, entries)
                    continue
                j, first = plan[name]
                if [e.rsplit("/", 1)[1] for e in first] != [e.rsplit("/", 1)[1] for e in entries]:
                    raise ValueError(
                        f"{who}: character {name} has different drawings in {zips[j].name} and "
                        f"{path.name}; they cannot both be Omniglot zips."
                    )
        if not plan:
            raise ValueError(f"{who}: no character images in {[z.name for z in zips]}.")
        names = sorted(plan)
        pixels = torch.empty(len(names), DRAWINGS, 1, image_size, image_size, dtype=torch.uint8)
        for c, name in enumerate(names):
            i, entries = plan[name]
            pixels[c, :, 0] = _decode_many(zips[i], archives[i], entries, image_size)
    finally:
        for archive in archives:
            archive.close()
    return OmniglotCharacters(pixels, tuple(names))


def _index_characters(path: Path, archive: zipfile.ZipFile) -> dict[str, list[str]]:
    """``{"Alphabet/characterNN": [entry, ...]}`` of one zip, checking its layout."""
    groups: dict[str, list[str]] = {}
    roots = set()
    for entry in archive.namelist():
        if entry.endswith("/"):
            continue
        parts = entry.split("/")
        if len(parts) != 4 or not all(parts) or not parts[3].lower().endswith(".png"):
            raise ValueError(
                f"OmniglotCharacters.from_zips: unexpected layout in {path.name}: first bad entry "
                f"{entry!r}; expected <root>/<Alphabet>/<characterNN>/<drawing>.png, as in the "
                "official images_background.zip."
            )
        roots.add(parts[0])
        if len(roots) > 1:
            raise ValueError(
                f"OmniglotCharacters.from_zips: unexpected layout in {path.name}: first bad entry "
                f"{entry!r} is outside the zip's single root folder {sorted(roots)[0]!r}/."
            )
        groups.setdefault(f"{parts[1]}/{parts[2]}", []).append(entry)
    for name, entries in groups.items():
        if len(entries) != DRAWINGS:
            raise ValueError(
                f"OmniglotCharacters.from_zips: character {name} in {path.name} has "
                f"{len(entries)} drawings, expected {DRAWINGS}."
            )
        entries.sort()
    return groups


_RUN_ENTRY = re.compile(
    r"(run\d+)/(?:(class_labels\.txt)|(training)/class\d+\.png|(test)/item\d+\.png)"
)


def _index_runs(
    path: Path, archive: zipfile.ZipFile
) -> dict[str, tuple[list[str], list[str], str]]:
    """``{run: (training entries, test entries, labels file)}``, checking the layout."""
    runs: dict[str, tuple[list[str], list[str], list[str]]] = {}
    for entry in archive.namelist():
        if entry.endswith("/"):
            continue
        match = _RUN_ENTRY.fullmatch(entry)
        if match is None:
            raise ValueError(
                f"load_one_shot_runs: unexpected layout in {path.name}: first bad entry {entry!r};"
                " expected runNN/class_labels.txt, runNN/training/classMM.png and "
                "runNN/test/itemMM.png, as in the official all_runs.zip."
            )
        training, test, labels = runs.setdefault(match[1], ([], [], []))
        (labels if match[2] else training if match[3] else test).append(entry)
    out = {}
    for run, (training, test, labels) in runs.items():
        if not labels or not training or not test:
            raise ValueError(
                f"load_one_shot_runs: {path.name}: {run} needs class_labels.txt, training/ and "
                f"test/ images; it has {len(labels)} labels file, {len(training)} training and "
                f"{len(test)} test images."
            )
        out[run] = (sorted(training, key=_number), sorted(test, key=_number), labels[0])
    if not out:
        raise ValueError(f"load_one_shot_runs: no runs in {path.name}.")
    return out


def _number(entry: str) -> int:
    return int(re.findall(r"\d+", entry.rsplit("/", 1)[1])[-1])


def _parse_class_labels(
    path: Path,
    archive: zipfile.ZipFile,
    run: str,
    training: list[str],
    test: list[str],
    labels_file: str,
) -> torch.Tensor:
    """Query labels: for each test entry (in order), the index of its training entry."""
    text = _read(path, archive, labels_file).decode("utf-8")
    support_index = {entry: i for i, entry in enumerate(training)}
    label_of: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        ok = len(fields) == 2 and fields[0] in test and fields[1] in support_index
        if not ok or fields[0] in label_of:
            raise ValueError(
                f"load_one_shot_runs: {path.name}: {labels_file} line {number}: expected "
                f"'{run}/test/itemMM.png {run}/training/classKK.png' naming an image of the run "
                f"(each test item once), got {line!r}."
            )
        label_of[fields[0]] = support_index[fields[1]]
    if len(label_of) != len(test):
        missing = [t for t in test if t not in label_of]
        raise ValueError(
            f"load_one_shot_runs: {path.name}: {labels_file} gives no class for {missing[0]!r}."
        )
    return torch.tensor([label_of[t] for t in test], dtype=torch.long)


def _read(path: Path, archive: zipfile.ZipFile, entry: str) -> bytes:
    try:
        return archive.read(entry)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
        raise ValueError(
            f"{path} is corrupt: cannot read {entry!r} ({e}); download it again from {_URL}."
        ) from e


def _decode_many(
    path: Path, archive: zipfile.ZipFile, entries: list[str], image_size: int
) -> torch.Tensor:
    """``(len(entries), S, S)`` uint8, ink 255: LANCZOS-resized to ``S``, then inverted."""
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("fmaml.data reads Omniglot's PNGs with Pillow: pip install pillow") from e
    lanczos = getattr(Image, "Resampling", Image).LANCZOS
    buffer = bytearray()
    for entry in entries:
        data = _read(path, archive, entry)
        try:
            with Image.open(io.BytesIO(data)) as image:
                gray = image.convert("L")
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"{path} is corrupt: {entry!r} is not a readable PNG ({e}).") from e
        if gray.size != (image_size, image_size):
            gray = gray.resize((image_size, image_size), lanczos)
        buffer += gray.tobytes()
    white = torch.frombuffer(buffer, dtype=torch.uint8).view(len(entries), image_size, image_size)
    # ink 255; LANCZOS is linear, so this equals inverting first up to 1/255 at rounding ties
    return 255 - white


def _to_float(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return pixels.to(dtype) / 255


def _check_image_size(who: str, image_size: object) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"{who}: `image_size` must be an int >= 1, got {image_size!r}.")


def _check_count(who: str, name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{who}: `{name}` must be an int >= 1, got {value!r}.")
