"""Meta-learning data: sinusoid regression and Omniglot, as :class:`fmaml.Tasks`.

- :class:`SinusoidTasks`: the sinusoid regression tasks of Finn et al. (2017).
- Omniglot (Lake et al., 2015), read in place from its official zips: :func:`load_background`
  (or :meth:`OmniglotCharacters.from_zips`), :func:`split`, :func:`rotate`,
  :func:`sample_episodes`; the official one-shot runs with :func:`load_one_shot_runs` and
  :func:`as_tasks`. Decoding the PNGs needs Pillow.

See ``docs/data.md``.
"""

from fmaml.data._omniglot import (
    OmniglotCharacters,
    OneShotRun,
    as_tasks,
    load_background,
    load_one_shot_runs,
    rotate,
    sample_episodes,
    split,
)
from fmaml.data._sinusoid import SinusoidMeta, SinusoidTasks, true_function

__all__ = [
    "OmniglotCharacters",
    "OneShotRun",
    "SinusoidMeta",
    "SinusoidTasks",
    "as_tasks",
    "load_background",
    "load_one_shot_runs",
    "rotate",
    "sample_episodes",
    "split",
    "true_function",
]
