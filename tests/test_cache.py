"""The erase cache: content addresses, exactly one producer per key (threads, processes, Ray workers),
leases of dead producers, remote storage through pyarrow, and a trial's erasure through the cache."""

import multiprocessing as mp
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.cache import EraseCache, FileLeases, LeaseTable, content_key, open_cache
from orchestrator.resolved import resolve
from orchestrator.trial import _WARM, execute_trial
from tests.conftest import REPO


def _produce_slowly(counter: Path, delay: float = 0.5):
    def produce(folder: Path) -> None:
        with counter.open("a") as f:  # one line per erasure that really ran
            f.write("erased\n")
        time.sleep(delay)  # long enough that every other caller arrives while it runs
        (folder / "weights.txt").write_text("the erased model")

    return produce


def _worker(root: str, staging: str, counter: str, start_at: float, out) -> None:
    cache = open_cache(root, Path(staging))  # no Ray: lock-file leases
    time.sleep(max(0.0, start_at - time.time()))  # every process asks at the same instant
    got = cache.get("erased-abc", _produce_slowly(Path(counter)))
    out.put((got.status, (got.folder / "weights.txt").read_text()))


def test_one_producer_across_processes_starting_together(tmp_path):
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 1.0
    procs = [
        ctx.Process(
            target=_worker, args=(str(tmp_path / "store"), str(tmp_path / "stage"), str(tmp_path / "n"), start_at, out)
        )
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert (tmp_path / "n").read_text().count("erased") == 1  # exactly one erasure ran
    assert sorted(s for s, _ in results) == ["hit", "hit", "hit", "miss"]
    assert {text for _, text in results} == {"the erased model"}
    assert not list((tmp_path / "store").glob("erase_cache/*.tmp-*"))  # no half entries left behind


def test_one_producer_across_ray_workers(tmp_path):
    ray = pytest.importorskip("ray")
    from orchestrator.cache import start_lease_actor

    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    try:
        actor = start_lease_actor("leases-test")  # noqa: F841  (the driver owns it, as in a sweep)

        @ray.remote(num_cpus=1)
        def trial(root: str, staging: str, counter: str, start_at: float) -> str:
            import time as clock  # self-contained: the worker cannot import this test module
            from pathlib import Path as P

            from orchestrator.cache import open_cache as open_

            def produce(folder):
                with open(counter, "a") as f:
                    f.write("erased\n")
                clock.sleep(1.0)
                (folder / "weights.txt").write_text("the erased model")

            cache = open_(root, P(staging), "leases-test")
            clock.sleep(max(0.0, start_at - clock.time()))
            return cache.get("erased-xyz", produce).status

        start_at = time.time() + 3.0
        args = (str(tmp_path / "store"), str(tmp_path / "stage"), str(tmp_path / "n"), start_at)
        statuses = ray.get([trial.remote(*args) for _ in range(4)])
    finally:
        ray.shutdown()
    assert (tmp_path / "n").read_text().count("erased") == 1
    assert sorted(statuses) == ["hit", "hit", "hit", "miss"]


def test_failed_producer_leaves_nothing_and_the_next_caller_produces(tmp_path):
    cache = open_cache(str(tmp_path / "store"), tmp_path / "stage")

    def broken(folder: Path) -> None:
        (folder / "half").write_text("x")
        raise RuntimeError("erasure crashed")

    with pytest.raises(RuntimeError):
        cache.get("erased-k", broken)
    assert not cache.complete("erased-k") and not list((tmp_path / "store").rglob("half"))
    got = cache.get("erased-k", _produce_slowly(tmp_path / "n", delay=0.0))
    assert got.status == "miss" and cache.complete("erased-k")
    assert cache.get("erased-k", broken).status == "hit"  # complete: never produced again


def test_leases_of_dead_producers_expire(tmp_path):
    table = LeaseTable(ttl_s=0.2)
    assert table.acquire("k", "a") and not table.acquire("k", "b")
    time.sleep(0.3)  # "a" died: it stopped renewing
    assert table.acquire("k", "b") and not table.acquire("k", "a")
    table.release("k", "b")
    assert table.acquire("k", "a")

    files = FileLeases(tmp_path, ttl_s=0.2)
    assert files.acquire("k", "a") and not files.acquire("k", "b")
    files.renew("k", "a")
    assert not files.acquire("k", "b")
    time.sleep(0.3)
    assert files.acquire("k", "b")


def test_remote_storage_uploads_then_downloads_per_node(tmp_path):
    """A non-local pyarrow filesystem (a SubTreeFileSystem stands in for S3): the producer uploads, the
    marker comes last, another node downloads the entry into its own staging folder."""
    from pyarrow import fs

    (tmp_path / "bucket").mkdir()
    remote = fs.SubTreeFileSystem(str(tmp_path / "bucket"), fs.LocalFileSystem())
    node_a = EraseCache("erase_cache", tmp_path / "a", FileLeases(tmp_path / "leases"), filesystem=remote)
    node_b = EraseCache("erase_cache", tmp_path / "b", FileLeases(tmp_path / "leases"), filesystem=remote)
    assert node_a.get("erased-r", _produce_slowly(tmp_path / "n", delay=0.0)).status == "miss"
    assert (tmp_path / "bucket" / "erase_cache" / "erased-r" / "weights.txt").is_file()
    assert (tmp_path / "bucket" / "erase_cache" / "erased-r" / "COMPLETE").is_file()
    got = node_b.get("erased-r", _produce_slowly(tmp_path / "n", delay=0.0))
    assert got.status == "hit" and got.folder == tmp_path / "b" / "erased-r"
    assert (got.folder / "weights.txt").read_text() == "the erased model"
    assert (tmp_path / "n").read_text().count("erased") == 1


def test_content_keys():
    a = content_key("erased", {"method": "esd", "config": {"lr": 1e-5, "iterations": 10}, "seed": 0})
    b = content_key("erased", {"seed": 0, "config": {"iterations": 10, "lr": 1e-5}, "method": "esd"})
    assert a == b and a.startswith("erased-")  # key order does not matter
    assert a != content_key("erased", {"method": "esd", "config": {"lr": 1e-5, "iterations": 10}, "seed": 1})
    assert a != content_key("evaluation", {"method": "esd", "config": {"lr": 1e-5, "iterations": 10}, "seed": 0})


SMOKE = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())
FAST = {
    "finetune.config.steps": 2,
    "finetune.eval_every": 2,
    "erase.config.iterations": 2,
    "evaluate.config.images_per_prompt": 1,
    "finetune.dataset.config.images_per_prompt": 1,
}


def test_trial_erasure_goes_through_the_cache(tmp_path, monkeypatch):
    """A second worker (a cleared memo) loads the first one's erased model, and the base model's
    evaluation, from the cache: same weights, same evaluations, no second erasure or base evaluation."""
    import orchestrator.trial as trial_module

    data = {**SMOKE, "cache_dir": str(tmp_path / "cache"), "storage_path": str(tmp_path / "store")}
    trial = resolve(data, FAST)
    _WARM.clear()  # a fresh worker: an earlier test in this process may have left this experiment warm
    cache = open_cache(trial.spec.storage_path, Path(trial.spec.cache_dir) / "erased")
    first: list[dict] = []
    execute_trial(trial, first.append, tmp_path / "t1", cache)
    _WARM.clear()  # another worker: nothing in memory
    evaluated: list[bool] = []  # embed=True marks the base model's evaluation

    def counting(*args, **kw):
        evaluated.append(kw.get("embed", False))
        return evaluate(*args, **kw)

    evaluate = trial_module.evaluate
    monkeypatch.setattr(trial_module, "evaluate", counting)
    second: list[dict] = []
    execute_trial(trial, second.append, tmp_path / "t2", cache)
    assert first[0]["erase_cache"] == "miss" and second[0]["erase_cache"] == "hit"
    for key in ("presence_erased", "retention_erased", "erase_distance", "erase_seconds"):
        assert first[0][key] == second[0][key]
    for key in ("presence_base", "retention_base", "data_closeness"):  # the cached base evaluation
        assert first[0][key] == second[0][key]
    assert True not in evaluated and len(evaluated) == len(second) - 1  # only the fine-tuned model's evaluations
    assert second[-1]["ft_loss"] == first[-1]["ft_loss"]  # the same erased weights fine-tune identically
    entries = sorted(p.name.split("-")[0] for p in (tmp_path / "store" / "erase_cache").iterdir() if p.is_dir())
    assert entries == ["base", "erased", "evaluation"]
