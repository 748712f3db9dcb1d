"""Layer 8 without Ray: latency tables, the degree controller, calibration cache, atomic switching."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import tiny_vit
from test_compensator import random_plugin

import tocom
from tocom.models import is_patched
from tocom.serve import ArrivalRate, DegreeController, ElasticModel, LatencyTable, calibrate, completion_ms

# Per-batch ms: linear in batch size; r=0 costs 10 ms/image, r=8 6 ms, r=16 3 ms (+2 ms fixed).
TABLE = LatencyTable({d: {b: 2 + c * b for b in (1, 2, 4, 8)} for d, c in ((0, 10), (8, 6), (16, 3))})


def test_table_interpolates_and_extrapolates():
    assert TABLE.predict(0, 4) == 42
    assert TABLE.predict(0, 3) == pytest.approx((22 + 42) / 2)  # between 2 and 4
    assert TABLE.predict(0, 16) == pytest.approx(82 * 2)  # per-image cost of the largest
    assert LatencyTable.from_json(TABLE.to_json()).ms == TABLE.ms
    with pytest.raises(ValueError, match="degree 4 was not calibrated"):
        TABLE.predict(4, 1)


def test_completion_serves_fifo_batches():
    # Batches of 2: the first (waits 30, 20) ends at 22 ms, the second (10) 12 ms later.
    assert completion_ms(TABLE, 0, [30, 20, 10], max_batch=2) == max(30 + 22, 10 + 22 + 12)
    assert completion_ms(TABLE, 0, [5, 5, 5, 5, 50], max_batch=4) == 50 + 42 + 12


@pytest.mark.parametrize("waits, expected", [
    ([0], 0),  # idle: full accuracy
    ([0] * 8, 0),  # one full batch: 82 ms, within 85 ms
    ([30] * 8, 8),  # the same batch after a 30 ms wait: r=0 ends at 112 ms, r=8 at 80 ms
    ([0] * 12, 8),  # a batch of 8 and one of 4: 124 ms at r=0, 76 ms at r=8
    ([0] * 24, 16),  # three batches: only r=16 (78 ms) fits
    ([90], 16),  # already past the budget: nothing fits, so the fastest
])
def test_least_degree_within_slo(waits, expected):
    ctl = DegreeController(TABLE, slo_ms=100, max_batch=8, margin=0.85)
    assert ctl.choose(waits) == expected


def test_hysteresis_steps_up_at_once_and_down_after_patience():
    ctl = DegreeController(TABLE, slo_ms=100, max_batch=8, margin=0.85, hysteresis=0.25, patience=3)
    assert ctl.choose([0] * 24) == 16  # rush: straight to the top
    # 8 requests: r=0 fits the budget (82 <= 85) but not the hysteresis band (63.75): stay at r=16
    # while r=8 (50 ms) fits the band for 3 batches, then step down to r=8, never below.
    trace = [ctl.choose([0] * 8) for _ in range(7)]
    assert trace == [16, 16, 8, 8, 8, 8, 8]
    assert [ctl.choose([0]) for _ in range(4)] == [8, 8, 0, 0]  # idle: back to full accuracy
    # An interrupted streak starts again.
    ctl.choose([0] * 24)
    assert [ctl.choose(w) for w in ([0], [0], [0] * 24, [0], [0], [0])] == [16, 16, 16, 16, 16, 0]


def test_no_flapping_on_a_noisy_boundary():
    ctl = DegreeController(TABLE, slo_ms=100, max_batch=8, margin=0.85)
    sizes = [8, 9, 8, 9, 7, 9, 8, 9, 8, 9] * 3  # 8 fits r=0 barely, 9 does not
    degrees = [ctl.choose([0] * n) for n in sizes]
    changes = sum(a != b for a, b in zip(degrees, degrees[1:]))
    assert changes <= 1, degrees
    undamped = [DegreeController(TABLE, 100, 8, hysteresis=0.0, patience=1).least_fitting([0] * n, 85)
                for n in sizes]
    assert sum(a != b for a, b in zip(undamped, undamped[1:])) > 10  # the trace does cross the boundary


def test_retry_after_counts_batches_at_the_fastest_degree():
    ctl = DegreeController(TABLE, slo_ms=100, max_batch=8)
    assert ctl.retry_after_s(8) == 1
    assert ctl.retry_after_s(8 * 50) == 2  # 50 batches of 26 ms


def test_calibration_is_cached_per_model(tmp_path, monkeypatch):
    monkeypatch.setenv("TOCOM_CACHE", str(tmp_path))
    model = tocom.patch(tiny_vit(), "tome")
    table, info = calibrate(model, (0, 2), max_batch=2, rounds=1)
    assert not info["cached"] and table.degrees == [0, 2] and sorted(table.ms[0]) == [1, 2]
    again, info2 = calibrate(model, (0, 2), max_batch=2, rounds=1)
    assert info2["cached"] and info2["path"] == info["path"] and again.ms == table.ms
    _, other = calibrate(tocom.patch(tiny_vit(depth=2), "tome"), (0, 2), max_batch=2, rounds=1)
    assert other["path"] != info["path"] and not other["cached"]


def test_degree_for_latency(tmp_path, monkeypatch):
    monkeypatch.setenv("TOCOM_CACHE", str(tmp_path))
    model = tiny_vit()
    assert tocom.degree_for_latency(model, 1e6, batch_size=2, degrees=(0, 2, 4)) == 0
    assert not is_patched(model)  # calibrated on a copy
    with pytest.raises(ValueError, match="no degree in"):
        tocom.degree_for_latency(model, 1e-6, batch_size=2, degrees=(0, 2, 4))


def test_switching_is_atomic_with_forwards():
    model = tiny_vit()
    plugin = random_plugin(model, groups=4)
    torch.nn.init.normal_(plugin.B, std=0.5)  # large deltas: a half-switched forward would show
    degrees = [0, 2, 4]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    elastic = ElasticModel(model, degrees, plugin)
    reference = {d: elastic.run(x, d) for d in degrees}  # pure-degree outputs, no concurrency yet
    assert not torch.allclose(reference[0], reference[4], atol=1e-3)
    stop, errors = threading.Event(), []

    def switcher():
        i = 0
        while not stop.is_set():
            elastic.switch(degrees[i % 3])
            i += 1

    thread = threading.Thread(target=switcher)
    thread.start()
    try:
        for i in range(60):
            d = degrees[(i * 7) % 3]
            out = elastic.run(x, d)
            if not torch.allclose(out, reference[d], rtol=0, atol=1e-6):
                errors.append((i, d, (out - reference[d]).abs().max().item()))
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[:5]


def test_serve_command_line_checks_flags():
    from tocom.cli import build_parser
    from tocom.serve.cli import config_from_args

    args = build_parser().parse_args(["serve", "deit_tiny_patch16_224", "--degrees", "0,8,16",
                                      "--max-replicas", "3", "--worker-cores", "1,2"])
    config = config_from_args(args)
    assert config.degrees == (0, 8, 16) and config.max_replicas == 3 and config.host == "127.0.0.1"
    assert config.worker_cores == (1, 2)
    default = config_from_args(build_parser().parse_args(["serve", "m"]))
    assert default.worker_cores is None and default.lead_ms == 25.0
    assert config_from_args(build_parser().parse_args(["serve", "m", "--lead-ms", "off"])).lead_ms is None
    with pytest.raises(ValueError, match="--lead-ms must be >= 0 or 'off'"):
        config_from_args(build_parser().parse_args(["serve", "m", "--lead-ms", "-5"]))
    with pytest.raises(ValueError, match="--replicas <= --max-replicas"):
        config_from_args(build_parser().parse_args(["serve", "m", "--replicas", "3", "--max-replicas", "2"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m", "--degrees", "0,x"])


def test_measured_forwards_scale_the_predictions():
    ctl = DegreeController(TABLE, slo_ms=100, max_batch=8, margin=0.85, smoothing=0.5)
    assert ctl.choose([0] * 8) == 0  # 82 ms as calibrated
    for _ in range(10):  # the machine got busy: batches of 8 at r=0 take 1.5x the calibrated 82 ms
        ctl.observe(0, 8, 123.0)
    assert ctl.slowdown == pytest.approx(1.5, abs=0.01)
    assert ctl.choose([0] * 8) == 8  # 8 x 1.5 = 75 ms fits at r=8
    for _ in range(50):
        ctl.observe(16, 8, 1e6)
    assert ctl.slowdown == 4.0  # one pathological stall cannot make predictions absurd


def test_admission_refuses_what_the_fastest_degree_cannot_answer_in_time():
    ctl = DegreeController(TABLE, slo_ms=100, max_batch=8)
    assert ctl.fastest == 16  # 26 ms per batch of 8, 2 + 3 b ms for b images
    assert ctl.admits(0)
    # 29 held: the new request is the 6th of a 4th batch: 3 x 26 + (2 + 3 x 6) = 98 ms
    assert ctl.admits(29)
    assert not ctl.admits(30)  # 3 x 26 + (2 + 3 x 7) = 101 ms
    ctl.slowdown = 2.0  # a machine running slower than calibrated admits fewer
    assert ctl.admits(8) and not ctl.admits(15)  # 2 x (26 + 20) = 92; 2 x (26 + 26) = 104
    # 9 requests: 2 x (26 + 5) = 62 ms here, after time spent in front of the replica
    assert ctl.admits(8, waited_ms=35) and not ctl.admits(8, waited_ms=40)


def test_upstream_wait_reads_the_common_stamp_formats():
    from tocom.serve.upstream import upstream_wait_ms

    now = 1_800_000_000.0
    assert upstream_wait_ms(None, now) == 0 and upstream_wait_ms("", now) == 0
    assert upstream_wait_ms("t=1799999999.750", now) == pytest.approx(250)  # nginx: t=${msec}
    assert upstream_wait_ms("1799999999500", now) == pytest.approx(500)  # milliseconds (Heroku)
    assert upstream_wait_ms("1799999999900000", now) == pytest.approx(100)  # microseconds
    assert upstream_wait_ms("t=1800000005", now) == 0  # in the future: clocks disagree
    assert upstream_wait_ms("t=1799990000", now) == 0  # hours old: not a queue
    assert upstream_wait_ms("soon", now) == 0


def test_arrival_rate_counts_a_sliding_window():
    rate = ArrivalRate(window_s=2.0, min_span_s=0.5)
    for i in range(40):  # 20 per second from t = 0 to 1.95
        rate.add(i * 0.05)
    assert rate.rate(2.0) == pytest.approx(39 / 1.95)  # t = 0 left the window
    assert rate.rate(3.0) == pytest.approx(19 / 1.95)  # 1.05 .. 1.95 remain, 1.95 s before now
    assert rate.rate(10.0) == 0.0
    # A load that starts after a quiet spell reads at its rate at once, not a quarter of it...
    for i in range(23):
        rate.add(20 + i / 45)
    assert rate.rate(20.5) == pytest.approx(23 / 0.5)
    # ...while two close arrivals read as two in min_span_s, not as a flood.
    rate.add(30.0)
    rate.add(30.01)
    assert rate.rate(30.01) == pytest.approx(2 / 0.5)
    with pytest.raises(ValueError, match="min_span_s"):
        ArrivalRate(window_s=1.0, min_span_s=2.0)


@pytest.mark.parametrize("rate, expected", [
    (50, 0),  # r=0: full batches of 8 take 82 ms, 10.25 ms per image: busy 51% of the time
    (100, 8),  # r=0 would be busy 102.5% (it cannot keep up); r=8 (6.25 ms per image) 62.5%
    (200, 16),  # r=8 125%; r=16 (3.25 ms per image) 65%
    (400, 16),  # nothing keeps up: the fastest
])
def test_a_sustained_rate_rules_out_degrees_that_cannot_keep_up(rate, expected):
    ctl = DegreeController(TABLE, slo_ms=100, max_batch=8, margin=0.85)
    assert ctl.choose([0], rate_rps=rate) == expected  # an empty queue would have given r=0


def test_stepping_down_needs_the_rate_inside_the_hysteresis_band():
    ctl = DegreeController(TABLE, slo_ms=100, max_batch=8, margin=0.85, hysteresis=0.25, patience=2)
    assert ctl.choose([0], rate_rps=100) == 8
    # at 70/s r=0 is busy 72% (within the 85% margin, not the 64% band): stay at r=8
    assert [ctl.choose([0], rate_rps=70) for _ in range(4)] == [8, 8, 8, 8]
    assert [ctl.choose([0], rate_rps=50) for _ in range(3)] == [8, 0, 0]  # 51%: down after patience


def test_pinning_checks_the_cores(monkeypatch):
    import os

    from tocom.serve.service import pin_thread

    allowed = os.sched_getaffinity(0)
    with pytest.raises(ValueError, match="cannot pin to cores"):
        pin_thread([os.cpu_count() + 1000])
    pin_thread(sorted(allowed))  # the calling thread keeps exactly the cores it had
    assert os.sched_getaffinity(0) == allowed
    monkeypatch.delattr(os, "sched_setaffinity")
    with pytest.raises(ValueError, match="needs Linux"):
        pin_thread([0])


def test_the_cost_of_switching_is_learned_apart_and_charged_to_other_degrees():
    ctl = DegreeController(TABLE, slo_ms=100, max_batch=8, smoothing=0.2)
    ctl.degree = 16
    waits = [0.0] * 8
    assert ctl.least_fitting(waits, 85) == 0  # 82 ms at r=0, no switching cost known yet
    ctl.observe_switch(10.0)  # the first switch measured is taken as it is
    assert ctl.switch_ms == 10.0
    assert ctl.completion(0, waits) == pytest.approx(92) and ctl.completion(16, waits) == pytest.approx(26)
    assert ctl.least_fitting(waits, 85) == 8  # r=0 no longer fits once the switch is paid: 50 + 10 at r=8
    ctl.observe_switch(20.0)
    assert ctl.switch_ms == pytest.approx(12.0)  # smoothed
    assert ctl.slowdown == 1.0  # switches never read as a slower machine


def test_slowdown_is_learned_per_batch_size():
    ctl = DegreeController(TABLE, slo_ms=100, max_batch=8, smoothing=1.0)
    assert ctl.slowdown_at(1) == ctl.slowdown == 1.0  # nothing measured yet
    ctl.observe(0, 1, 24.0)  # a lone request at 2x its calibrated 12 ms
    assert ctl.slowdown_at(1) == 2.0
    assert ctl.slowdown == 2.0  # full batches not measured yet: they borrow the nearest bucket
    ctl.observe(0, 8, 82.0)  # a full batch as calibrated
    assert ctl.slowdown == 1.0 and ctl.slowdown_at(1) == 2.0
    assert ctl.slowdown_at(3) == 1.0  # bucket 4, unmeasured: the nearest measured one is 8
    assert ctl.forward_ms(0, 8) == 82.0 and ctl.forward_ms(0, 1) == 24.0
    assert ctl.utilisation(0, 50) == pytest.approx(50 * 82 / 8 / 1000)  # full batches' own factor
    ctl.slowdown = 1.5  # sets every bucket
    assert ctl.slowdown_at(1) == ctl.slowdown_at(5) == 1.5
