"""DPRouter: least load (reports + routed-but-unreported), prefix affinity within a bounded
imbalance, n > 1 children on one core, owners for aborts and stop hits; DPCoreClient's message
fan-out over fake cores (no processes)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pagellm.config import EngineConfig
from pagellm.core.scheduler import RequestUpdate, SchedulerStats
from pagellm.engine.core_interface import (AbortRequests, AddRequest, CoreOutputs, EngineCoreRequest, FinishOnStop,
                                           ResetPrefixCache, Shutdown, StatsRequest)
from pagellm.engine.dp_client import DPCoreClient, cuda_device_slices
from pagellm.engine.dp_router import DPRouter, combine_stats, prefix_keys
from pagellm.sampling_params import SamplingParams

BS = 4


def req(request_id: str, prompt: list[int], n: int = 1, salt=None) -> list[EngineCoreRequest]:
    return [EngineCoreRequest(f"{i}_{request_id}", list(prompt), SamplingParams(), cache_salt=salt)
            for i in range(n)]


def stats(running=0, waiting=0, kv=0.0) -> SchedulerStats:
    return SchedulerStats(running, waiting, kv, 0, 0, 0)


def distinct(i: int) -> list[int]:
    return [100 + i] * (2 * BS)  # a different first block for every i


def test_least_load_counts_reports_and_unreported_requests():
    r = DPRouter(3, BS, max_imbalance=0)
    r.on_report(0, stats(running=2, waiting=1))
    r.on_report(1, stats(running=1))
    r.on_report(2, stats(running=1, kv=0.5))
    assert r.route("a", req("a", distinct(0))) == 1  # load 1, lower KV usage than core 2
    assert r.loads() == [3, 2, 1]  # a is pending on core 1
    assert r.route("b", req("b", distinct(1))) == 2
    assert r.route("c", req("c", distinct(2), n=3)) == 1  # 2 vs 2: core 1's KV usage is lower
    assert r.loads() == [3, 5, 2]
    # Core 1's report now counts a and c in its own numbers: they are no longer pending.
    r.on_report(1, stats(running=1, waiting=4), added=["a", "c"])
    assert r.loads() == [3, 5, 2] and r.cores[1].pending == {}


def test_ties_go_to_lower_kv_usage_then_lower_rank():
    r = DPRouter(2, BS)
    assert r.least_loaded() == 0
    r.on_report(0, stats(kv=0.3))
    r.on_report(1, stats(kv=0.1))
    assert r.least_loaded() == 1


def test_shared_prefix_follows_its_core_within_the_imbalance_bound():
    r = DPRouter(2, BS, max_imbalance=2)
    system = [7, 7, 7, 7, 8, 8, 8, 8]  # two full blocks
    assert r.route("s1", req("s1", system + [1, 2])) == 0
    assert r.route("x", req("x", distinct(5))) == 1  # least loaded: 1 vs 0
    # Loads now 1 and 1; with the prefix, stay on core 0 while it is at most 2 over the least.
    assert r.route("s2", req("s2", system + [3])) == 0
    assert r.route("s3", req("s3", system + [4, 5, 6])) == 0  # loads 2 vs 1
    assert r.route("s4", req("s4", system)) == 0  # loads 3 vs 1: still within 2
    assert r.loads() == [4, 1]
    # 4 vs 1 is over the bound: the next one goes to the least loaded core, and the prefix follows it.
    assert r.route("s5", req("s5", system + [9])) == 1
    assert r.route("s6", req("s6", system + [9, 9])) == 1


def test_longest_prefix_wins_and_salt_and_partial_blocks_do_not_match():
    r = DPRouter(2, BS, max_imbalance=10)
    a, b = [1] * BS, [2] * BS
    assert r.route("ab", req("ab", a + b)) == 0
    assert r.route("ac", req("ac", a + [3] * BS)) == 0  # shares a's first block with "ab"
    r.cores[0].pending.clear()
    r.on_report(0, stats(running=3))  # core 0 busier, still within the bound
    assert r.route("ab2", req("ab2", a + b + [5])) == 0
    # A different salt is another cache: no affinity, so least loaded.
    assert r.route("salted", req("salted", a + b, salt="tenant-2")) == 1
    # Under one full block there is nothing to share: least loaded.
    assert prefix_keys(a[:BS - 1], BS) == []
    r.on_report(1, stats(running=5))
    assert r.route("short", req("short", a[:BS - 1])) == 0
    assert prefix_keys(a + b, BS) != prefix_keys(a + b, BS, "s")
    assert len(prefix_keys([1] * 100, BS, max_blocks=4)) == 4


def test_affinity_off_routes_by_load_only():
    r = DPRouter(2, BS, prefix_affinity=False)
    assert [r.route(f"r{i}", req(f"r{i}", [1] * 8)) for i in range(4)] == [0, 1, 0, 1]


def test_children_stay_together_and_aborts_reach_their_owner():
    r = DPRouter(2, BS)
    r.on_report(0, stats(running=5))
    assert r.route("multi", req("multi", distinct(0), n=4)) == 1
    assert {r.owner_of_core_request(f"{i}_multi") for i in range(4)} == {1}
    assert r.route("single", req("single", distinct(1))) == 1  # 4 pending on core 1 < 5 on core 0
    assert r.split_by_owner(["0_multi", "0_single", "unknown"]) == {1: ["0_multi", "0_single"]}
    # The last child ending forgets the user request.
    r.forget_core_requests(["0_multi", "1_multi", "2_multi"])
    assert r.owner("multi") == 1
    r.on_report(1, stats(), finished=["3_multi"])
    assert r.owner("multi") is None and r.owner("single") == 1
    # A rejected request is forgotten whole, pending included.
    r.route("bad", req("bad", distinct(2), n=2))
    r.on_report(r.owner("bad"), stats(), rejected=["bad"])
    assert r.owner("bad") is None and r.owner_of_core_request("0_bad") is None
    with pytest.raises(ValueError, match="already routed"):
        r.route("single", req("single", distinct(1)))


def test_combine_stats_sums_counts_and_averages_usage():
    total = combine_stats([SchedulerStats(1, 2, 0.5, 3, 10, 4), SchedulerStats(2, 0, 0.1, 1, 5, 1)])
    assert total == SchedulerStats(3, 2, pytest.approx(0.3), 4, 15, 5)


def test_cuda_device_slices():
    assert cuda_device_slices(2, 2, "4,5,6,7", 8) == ["4,5", "6,7"]
    assert cuda_device_slices(3, 1, None, 4) == ["0", "1", "2"]
    with pytest.raises(ValueError, match="2 cores x 2 ranks = 4 CUDA devices, but only 3"):
        cuda_device_slices(2, 2, "0,1,2", 3)


# -- DPCoreClient over fake cores ---------------------------------------------------------------------------
class FakeCore:
    def __init__(self, setup, rank, devices):
        self.rank, self.sent, self.closed = rank, [], False

    def send(self, message):
        if self.closed:
            raise BrokenPipeError("closed")
        self.sent.append(message)

    def start_reader(self, on_message, on_exit):
        self.emit, self.exit = on_message, on_exit

    def close(self, timeout=10.0):
        self.closed = True


@pytest.fixture
def dp():
    setup = SimpleNamespace(config=EngineConfig(data_parallel_size=2, block_size=BS, device="cpu"))
    client = DPCoreClient(setup, start_core=FakeCore)
    got, exits = [], []
    client.start_reader(got.append, exits.append)
    return client, client._cores, got, exits


def test_client_routes_adds_and_splits_aborts_and_stops(dp):
    client, (c0, c1), got, _ = dp
    client.send(AddRequest("a", req("a", distinct(0))))
    client.send(AddRequest("b", req("b", distinct(1), n=2)))
    assert [m.request_id for m in c0.sent] == ["a"] and [m.request_id for m in c1.sent] == ["b"]
    client.send(AbortRequests(["0_a", "1_b", "gone"]))
    client.send(FinishOnStop([("0_b", "stop")]))
    assert c0.sent[-1] == AbortRequests(["0_a"]) and c1.sent[-2:] == [AbortRequests(["1_b"]),
                                                                        FinishOnStop([("0_b", "stop")])]
    assert client.router.owner("a") is None and client.router.owner("b") == 1


def test_client_answers_stats_and_resets_once_every_core_has(dp):
    client, (c0, c1), got, _ = dp
    client.send(StatsRequest(7))
    client.send(ResetPrefixCache(8))
    assert StatsRequest(7) in c0.sent and StatsRequest(7) in c1.sent
    c0.emit(CoreOutputs([], SchedulerStats(1, 0, 0.2, 0, 0, 0), stats_tokens=[7], reset_results=[(8, True)]))
    assert got[-1].engine_index == 0 and got[-1].stats_answers == {} and got[-1].reset_results == []
    c1.emit(CoreOutputs([], SchedulerStats(2, 1, 0.4, 0, 0, 0), stats_tokens=[7], reset_results=[(8, False)]))
    assert got[-1].engine_index == 1 and got[-1].stats_tokens == []
    assert got[-1].stats_answers == {7: SchedulerStats(3, 1, pytest.approx(0.3), 0, 0, 0)}
    assert got[-1].reset_results == [(8, False)]  # one core refused: not reset everywhere


def test_client_reports_one_death_and_stops_the_rest(dp):
    client, (c0, c1), got, exits = dp
    client.send(AddRequest("a", req("a", distinct(0))))
    client.send(StatsRequest(1))
    c1.exit("killed")
    assert exits == ["data-parallel engine core 1 of 2: killed"]
    assert Shutdown() in c0.sent
    c0.emit(CoreOutputs([RequestUpdate("0_a", [3])], stats(), stats_tokens=[1]))
    c0.exit("shut down")
    assert got == [] and len(exits) == 1  # nothing after the death reaches the front end
    with pytest.raises(BrokenPipeError, match="core 1 of 2"):
        client.send(AddRequest("late", req("late", distinct(3))))
    client.close()
    assert c0.closed and c1.closed
