"""Shared fixtures. 8 fake CPU devices so sharding is tested on every run; tiny shapes, compiled once."""

import atexit
import gc
import os
import shutil
import tempfile

# The suite's programs are tiny and compiled once each, so compiling is most of its time. XLA:CPU's LLVM back
# end at -O0 cuts the suite's CPU time by about a third, and its older loop emitters instead of the fusion
# emitters halve what is left of a compile (same HLO passes, same results within the tests' tolerances;
# BENCHMARKS.md). The two xdist workers share two cores: Eigen's single-threaded kernels keep each worker's
# programs on one core instead of four threads contending for two (497-510 s, from 564-575 s; make test runs).
# Tests only: users' runs keep XLA's defaults. An XLA_FLAGS already set wins.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    " --xla_cpu_use_fusion_emitters=false --xla_cpu_multi_thread_eigen=false",
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One JAX compilation cache per test session, shared by the xdist workers and every subprocess the tests
# start (resume, multi-process, CLI): the same steps compile once instead of once per process. It starts
# empty, so a session never reuses another session's programs, and is removed by the process that made it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="cappa-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import pytest  # noqa: E402

TINY_CONFIG = os.path.join(os.path.dirname(__file__), "tiny_config.py")


# The longest test files first (seconds on 2 busy cores, longest first), then the rest in name order: with
# `--dist loadfile --no-loadscope-reorder` (the Makefile) the workers take files in this order, so no long file
# starts late and runs alone at the end while the other worker idles.
LONGEST_FIRST = (
    "test_demo.py",  # ~190 s
    "test_cappa_train.py",
    "test_decode.py",
    "test_caption.py",
    "test_resume.py",
    "test_train.py",
    "test_vqa.py",
    "test_multiprocess.py",
    "test_kernels.py",
    "test_siglit.py",
    "test_cappa.py",
    "test_accelerator_bench.py",  # ~35-50 s
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # A stable sort: the other files keep their order.
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_sessionfinish(session):
    """Collects and freezes the heap while the session is still finishing, before an xdist worker reports done.

    Once a worker has reported, execnet gives it 5 s to return and then sends it SIGINT. In that window pytest's
    unraisable-exception plugin runs full gc.collect() passes over the worker's whole heap (TensorFlow, JAX and
    every test's objects), each calling JAX's `_xla_gc_callback`; on a busy machine they overran the 5 s and the
    run ended with "Exception ignored in: <function _xla_gc_callback>: KeyboardInterrupt". Collected here (xdist
    reports after this hook) and frozen, the heap leaves those later passes almost nothing to scan.
    """
    del session
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """`scenes/tiny` prepared once per session (the input pipeline prepares embedded data itself)."""
    path = str(tmp_path_factory.mktemp("tfds"))
    from transfer import input_pipeline

    input_pipeline.get_builder({"name": "scenes/tiny", "split": "train", "data_dir": path})
    return path


@pytest.fixture()
def tiny_config(data_dir):
    """A fresh, fully merged tiny classifier config reading the session's data_dir."""
    from transfer import config as config_lib
    from transfer import train

    config, _ = train.prepare_config(config_lib.load_config_file(TINY_CONFIG))
    config.input.data.data_dir = data_dir
    return config


@pytest.fixture(scope="session")
def scenes_tokenizer(data_dir, tmp_path_factory):
    """A small BPE SentencePiece model trained on the `scenes/tiny` training captions."""
    from transfer import tokenizer

    path = str(tmp_path_factory.mktemp("tokenizer") / "scenes_bpe.model")
    data = {"name": "scenes/tiny", "split": "train", "data_dir": data_dir}
    texts = tokenizer.captions_from_dataset(data)
    return tokenizer.train_tokenizer(texts, path, vocab_size=96, model_type="bpe")


@pytest.fixture(scope="session")
def tiny_run(data_dir, tmp_path_factory):
    """A workdir of the tiny classifier trained 6 steps (checkpoint at step 6): a tower for probe tests."""
    from transfer import config as config_lib
    from transfer import train

    config, _ = train.prepare_config(config_lib.load_config_file(TINY_CONFIG))
    config.input.data.data_dir = data_dir
    config.total_steps = 6
    config.evals = {}
    workdir = str(tmp_path_factory.mktemp("tiny_run"))
    train.train(config, workdir)
    return workdir
