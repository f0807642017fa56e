"""Few-shot linear probes of a trained tower (`cappa probe`, tasks/fewshot.py).

  cappa probe --checkpoint workdirs/cappa_tiny --config configs/fewshot.py
  cappa probe --checkpoint WORKDIR --config configs/fewshot.py:big_vision,data_dir=~/tensorflow_datasets
  cappa probe --checkpoint WORKDIR --config configs/fewshot.py:scenes,cifar100 --config.shots="(1, 10)"

arg: dataset names of tasks/fewshot_datasets.py's `DATASETS` (any number), `local` (the default: the embedded
`scenes` and scikit-learn's `digits`, prepared on this machine without a download), `scenes_factors` (the scenes
label's factors one by one: `scenes_shape`, `scenes_color`, `scenes_count`), `big_vision` (big_vision's few-shot
set: prepare those with `tfds build NAME` first), `data_dir=DIR` for every dataset. Per-dataset knobs are
overridable, e.g. `--config.datasets.cifar100.train_split='train[:10000]'`.

A dataset's `pp` must give a float image in [-1, 1] and the label; `{res}` is replaced by the tower's resolution
(its learnt position embedding), or by `resolution` when that is set. The other knobs and their defaults:
tasks/fewshot.py's `PROBE_DEFAULTS`.
"""

import ml_collections

from tasks import fewshot_datasets
from transfer.config import parse_arg


def get_config(arg=None):
    flags = {name: False for name in (*fewshot_datasets.DATASETS, *fewshot_datasets.PRESETS)}
    args = parse_arg(arg, data_dir=None, **flags)
    names = [n for n in flags if args[n] is True] or ["local"]
    c = ml_collections.ConfigDict()
    c.datasets = fewshot_datasets.select(names, args["data_dir"])
    # Every other knob (shots, seeds, l2_grid, layer, pooling, resolution, batch_size, cache_dir, ...)
    # has its default in tasks/fewshot.py's PROBE_DEFAULTS; override with --config.<key>=<value>.
    return c
