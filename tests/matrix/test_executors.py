"""Executors: local and Ray return the same Outcomes for a seeded torch step, record a failing
item in one line while the others finish, and call `on_done` once per item.

The Ray tests share one local Ray (2 CPUs, started once for this module: about 10 s). Its workers
cannot import this file (tests are not a package), so the module is pickled by value for them;
vptlab itself reaches the workers by import, as it does for the matrix.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from vptlab.errors import ConfigError
from vptlab.matrix.executors import (
    Executor,
    LocalExecutor,
    Outcome,
    RayExecutor,
    Resources,
    create_executor,
)


def train_step(seed: int) -> dict[str, float]:
    """One seeded SGD step of a tiny linear classifier: any thread or library difference shows."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(16, 4)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    after = F.cross_entropy(model(x), y).item()
    return {"loss": loss.item(), "after": after, "threads": torch.get_num_threads()}


def odd_fails(seed: int) -> int:
    if seed % 2:
        raise ValueError(f"seed {seed} is odd\nand this line is not shown")
    return seed


def dies(item: str) -> str:
    """Ends its process the way a crash or an out-of-memory kill would."""
    if item == "die":
        os._exit(1)
    return item


def interrupted(_: int) -> None:
    raise KeyboardInterrupt


@pytest.fixture(scope="module")
def ray_executor() -> Iterator[RayExecutor]:
    ray = pytest.importorskip("ray")
    module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(module)
    executor = RayExecutor(num_cpus=2)
    yield executor
    executor.close()
    ray.cloudpickle.unregister_pickle_by_value(module)


@pytest.fixture(params=["local", pytest.param("ray", marks=pytest.mark.slow)])  # Ray starts slowly
def executor(request: pytest.FixtureRequest) -> Executor:
    if request.param == "ray":
        return request.getfixturevalue("ray_executor")
    return LocalExecutor()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The local run's torch threads, to match the Ray task's num_cpus=1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_local_and_ray_agree_on_a_torch_step(ray_executor: RayExecutor, one_thread: None) -> None:
    items = [(f"seed{seed}", seed) for seed in range(4)]
    local = LocalExecutor().map(train_step, items, Resources())
    remote = ray_executor.map(train_step, items, Resources(num_cpus=1))
    assert [o.label for o in remote] == [label for label, _ in items]
    assert all(o.ok for o in remote)
    assert [o.value for o in remote] == [o.value for o in local]
    assert remote[0].value["threads"] == 1
    assert len({o.value["loss"] for o in remote}) == 4


def test_a_failing_item_is_one_line_and_the_others_finish(executor: Executor) -> None:
    done: list[Outcome] = []
    items = [(f"s{seed}", seed) for seed in range(4)]
    outcomes = executor.map(odd_fails, items, Resources(), on_done=done.append)
    assert [o.label for o in outcomes] == ["s0", "s1", "s2", "s3"]
    assert [o.ok for o in outcomes] == [True, False, True, False]
    assert [o.value for o in outcomes] == [0, None, 2, None]
    assert outcomes[1].error == "ValueError: seed 1 is odd"
    assert outcomes[0].error is None and outcomes[0].seconds >= 0
    assert sorted(o.label for o in done) == ["s0", "s1", "s2", "s3"]
    assert {id(o) for o in done} == {id(o) for o in outcomes}


@pytest.mark.slow
def test_a_dead_ray_worker_is_a_failed_item(ray_executor: RayExecutor) -> None:
    outcomes = ray_executor.map(dies, [("a", "live"), ("b", "die")], Resources())
    assert outcomes[0].ok and outcomes[0].value == "live"
    assert not outcomes[1].ok
    assert outcomes[1].error is not None and "\n" not in outcomes[1].error


def test_an_empty_map_starts_nothing(executor: Executor) -> None:
    assert executor.map(odd_fails, [], Resources()) == []


def test_ctrl_c_stops_a_local_run() -> None:
    with pytest.raises(KeyboardInterrupt):
        LocalExecutor().map(interrupted, [("a", 0)], Resources())


@pytest.mark.slow
def test_a_cell_bigger_than_the_local_ray_is_refused(ray_executor: RayExecutor) -> None:
    with pytest.raises(ConfigError, match="a cell needs 3 CPUs and 0 GPUs but the local Ray has 2"):
        ray_executor.map(odd_fails, [("a", 0)], Resources(num_cpus=3))


@pytest.mark.slow
def test_a_running_ray_is_joined_and_left_running(ray_executor: RayExecutor) -> None:
    import ray

    joined = create_executor("ray")
    assert isinstance(joined, RayExecutor)
    assert joined.map(odd_fails, [("a", 0)], Resources())[0].value == 0
    joined.close()
    assert ray.is_initialized()


def test_unknown_executor_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^unknown executor 'dask'; choose from: local, ray$"):
        create_executor("dask")
    with pytest.raises(ConfigError, match="for --executor ray"):
        create_executor("local", address="auto")
    assert create_executor("local").name == "local"


def test_missing_ray_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"--executor ray needs Ray: pip install 'vptlab\[ray\]'"):
        create_executor("ray")
