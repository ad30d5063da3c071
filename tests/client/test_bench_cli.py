"""`kv bench` against real servers: the numbers it reports, the keys it writes, the hot set, the
time it takes, REST through the real Envoy, worker processes, bad options and dead servers."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kv.v1 import kv_pb2
from kvclient import Client
from kvclient.cli import _app, _bench, main
from kvclient.cli._loadgen import GrpcDriver, Histogram, WorkerConfig, WorkerResult
from kvtest import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.e2e.conftest: the gateway as `make run` renders it

from tests.e2e.conftest import running_gateway  # noqa: E402

KV = Path(sys.executable).parent / "kv"
MAX_VALUE = 4096  # the server's --max-value-bytes: a bigger --value-size makes every Put fail


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One kv-server (SQLite) for the module; every test uses a key prefix of its own."""
    process = ServerProcess(tmp_path_factory.mktemp("bench"), "--max-value-bytes", str(MAX_VALUE))
    process.start()
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture
def prefix() -> str:
    return f"bench-{uuid.uuid4().hex[:8]}/"


def bench(*args: str, address: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("KV_TOKEN", "KV_ADDRESS")}
    command = [str(KV), *(["--address", address] if address else []), "bench", *args]
    return subprocess.run(  # noqa: S603
        command, capture_output=True, text=True, env=environment, timeout=timeout, check=False
    )


def report_of(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert "Traceback" not in done.stderr, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def quiet(stderr: str) -> bool:
    """Nothing on standard error but warnings (no progress bar when it is not a terminal)."""
    return all(line.startswith("kv bench: warning:") for line in stderr.splitlines()) and "\r" not in stderr


def assert_ordered(latency: dict[str, Any]) -> None:
    ms = [latency[k] for k in ("min_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms")]
    assert ms == sorted(ms), latency
    assert ms[0] > 0


def stored(address: str, prefix: str) -> dict[str, tuple[int, int]]:
    """key -> (value size, version) of every key under prefix."""
    with Client(address) as kv:
        return {e.key: (len(e.value), e.version) for e in kv.list(prefix)}


# --------------------------------------------------------------------------- gRPC


def test_an_ops_run_reports_every_call_and_writes_the_keys(server: ServerProcess, prefix: str) -> None:
    done = bench(
        *("--ops", "500", "--reads", "0.5", "--preload", "--keys", "40", "--key-prefix", prefix),
        *("--value-size", "37", "--concurrency", "16", "--connections", "2", "--seed", "7", "-o", "json"),
        address=server.address,
    )
    assert done.returncode == 0, done.stderr
    assert quiet(done.stderr), done.stderr
    data = report_of(done)
    assert data["ops"] == 500
    assert data["errors"] == 0
    assert data["errors_by_code"] == {}
    assert data["misses"] == 0  # preloaded: every Get finds its key
    assert data["preloaded"] == 40
    latency = data["latency"]
    assert latency["get"]["count"] + latency["put"]["count"] == latency["all"]["count"] == 500
    assert 150 < latency["get"]["count"] < 350  # --reads 0.5
    for name in ("get", "put", "all"):
        assert_ordered(latency[name])
    assert data["throughput"] > 0
    assert data["duration_s"] > 0
    assert data["settings"]["connections"] == 2
    assert data["settings"]["seed"] == 7
    assert data["client"]["cpu_cores"] > 0
    assert len(data["client"]["loop_busy"]) == 1
    keys = stored(server.address, prefix)
    assert sorted(keys) == [f"{prefix}{i:02d}" for i in range(40)]
    assert {size for size, _ in keys.values()} == {37}
    # Preload (version 1) plus the measured Puts: every Put landed once.
    assert sum(version for _, version in keys.values()) == 40 + latency["put"]["count"]


def test_the_hot_set_gets_most_of_the_calls(server: ServerProcess, prefix: str) -> None:
    done = bench(
        *("--ops", "1000", "--reads", "0", "--keys", "100", "--key-prefix", prefix),
        *("--distribution", "hotset", "--hot-keys", "0.1", "--hot-ops", "0.9", "--seed", "3", "-o", "json"),
        address=server.address,
    )
    data = report_of(done)
    assert done.returncode == 0, done.stderr
    assert data["settings"]["hot_keys"] == 10
    versions = {key: version for key, (_, version) in stored(server.address, prefix).items()}
    assert sum(versions.values()) == 1000  # every Put is one version of one key
    hot = sum(versions.get(f"{prefix}{i:02d}", 0) for i in range(10))
    assert 0.85 <= hot / 1000 <= 0.95  # --hot-ops 0.9 on the first 10% of the keys
    assert len(versions) > 50  # the cold keys got the rest, spread out


def test_a_duration_run_stops_in_time(server: ServerProcess, prefix: str) -> None:
    started = time.monotonic()
    done = bench(
        *("--duration", "0.6", "--warmup", "0.3", "--key-prefix", prefix, "--keys", "50", "-o", "json"),
        address=server.address,
    )
    took = time.monotonic() - started
    data = report_of(done)
    assert done.returncode == 0, done.stderr
    assert 0.6 <= data["duration_s"] < 1.1  # the calls in flight at the end finish after it
    assert data["ops"] > 0
    assert took < 8  # start-up, 0.3 s of warm-up, 0.6 s measured


def test_worker_processes_share_the_load(server: ServerProcess, prefix: str) -> None:
    done = bench(
        *("--ops", "301", "--processes", "2", "--concurrency", "8", "--reads", "0.5", "--preload"),
        *("--keys", "30", "--key-prefix", prefix, "-o", "json"),
        address=server.address,
    )
    data = report_of(done)
    assert done.returncode == 0, done.stderr
    assert data["ops"] == 301
    assert data["preloaded"] == 30  # each worker wrote its share
    assert len(data["client"]["loop_busy"]) == 2
    assert data["settings"]["processes"] == 2
    assert len(stored(server.address, prefix)) == 30


def test_failed_calls_are_counted_by_code_and_exit_4(server: ServerProcess, prefix: str) -> None:
    done = bench(
        *("--ops", "100", "--reads", "0.5", "--value-size", str(MAX_VALUE + 1), "--keys", "5"),
        *("--key-prefix", prefix, "-o", "json"),
        address=server.address,
    )
    data = report_of(done)
    assert done.returncode == 4
    assert (
        data["errors"]
        == data["errors_by_code"]["INVALID_ARGUMENT"]
        == data["ops"] - data["latency"]["all"]["count"]
    )
    assert data["errors"] > 20
    assert f"kv: {data['errors']} of 100 calls failed (INVALID_ARGUMENT {data['errors']})" in done.stderr


def test_progress_bar_on_a_terminal_then_the_text_report(server: ServerProcess, prefix: str) -> None:
    primary, secondary = pty.openpty()
    try:
        process = subprocess.Popen(  # noqa: S603
            [str(KV), "--address", server.address, "bench", "--duration", "0.6", "--key-prefix", prefix],
            stdout=subprocess.PIPE,
            stderr=secondary,
        )
        output = b""
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            if select.select([primary], [], [], 0.1)[0]:
                output += os.read(primary, 65536)
        assert process.wait(10) == 0
        while select.select([primary], [], [], 0.1)[0]:
            output += os.read(primary, 65536)
        assert process.stdout is not None
        report = process.stdout.read().decode()
        process.stdout.close()
    finally:
        os.close(primary)
        os.close(secondary)
    text = output.decode()
    assert "\rkv bench: [" in text
    assert "calls" in text
    assert "/s" in text
    assert "\r\x1b[K" in text  # the bar is erased before the report
    # Without --preload most Gets miss: reported (on standard error too), and not failures.
    assert "--preload writes every key first" in text
    lines = report.splitlines()
    assert lines[0] == f"target    gRPC {server.address}, 64 calls in flight over 4 connections, 1 process"
    assert lines[1].startswith(f"workload  90% Get / 10% Put, 10,000 keys under {prefix!r} (uniform)")
    assert any(line.startswith("measured  ") and " calls/s succeeded" in line for line in lines)
    assert "errors    none" in lines
    assert any(line.startswith("misses    ") for line in lines)
    header = next(line for line in lines if "p50 ms" in line)
    assert header.split() == ["calls", "calls/s", "p50", "ms", "p90", "ms", "p99", "ms", "max", "ms"]
    assert [line.split()[0] for line in lines if line.startswith(("Get ", "Put ", "all "))] == [
        "Get",
        "Put",
        "all",
    ]
    assert lines[-1].startswith("client    ")


# --------------------------------------------------------------------------- REST


@pytest.mark.gateway
def test_rest_through_the_gateway(tmp_path: Path) -> None:
    prefix = "rest bench/ä%/"  # a space, a slash, a percent and UTF-8: the key-encoding rule
    with running_gateway(tmp_path / "gateway") as gateway:
        done = bench(
            *("--rest", f"http://{gateway.host}", "--ops", "200", "--reads", "0.5", "--preload"),
            *("--keys", "20", "--key-prefix", prefix, "--value-size", "50", "--concurrency", "8"),
            *("-o", "json"),
        )
        data = report_of(done)
        assert done.returncode == 0, done.stderr
        assert data["target"] == "rest"
        assert data["ops"] == 200
        assert data["errors"] == 0
        assert data["misses"] == 0
        assert data["settings"]["connections"] == 8
        for name in ("get", "put", "all"):
            assert_ordered(data["latency"][name])
        keys = stored(gateway.server.address, prefix)
    assert sorted(keys) == [f"{prefix}{i:02d}" for i in range(20)]
    assert {size for size, _ in keys.values()} == {50}
    assert sum(version for _, version in keys.values()) == 20 + data["latency"]["put"]["count"]


# --------------------------------------------------------------------------- usage and failures


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--reads", "1.5"], "--reads: must be between 0 and 1"),
        (["--keys", "0"], "--keys: must be a whole number"),
        (["--ops", "2.5"], "--ops: must be a whole number"),
        (["--ops", "10", "--duration", "1"], "not allowed with"),
        (["--duration", "0"], "--duration must be more than 0"),
        (["--value-size", "-1"], "--value-size: must be a whole number of bytes"),
        (["--distribution", "zipf"], "invalid choice: 'zipf'"),
        (["--hot-keys", "0.1"], "--hot-keys and --hot-ops go with --distribution hotset"),
        (["--distribution", "hotset", "--hot-keys", "0"], "--hot-keys must be more than 0"),
        (["--concurrency", "4", "--connections", "8"], "--connections (8) must be at most --concurrency (4)"),
        (["--concurrency", "2", "--processes", "3"], "--concurrency (2) must be at least --processes (3)"),
        (["--processes", "65", "--concurrency", "100"], "--processes must be at most 64"),
        (["--rest", "localhost:8080"], "--rest must be an http:// or https:// URL"),
        (["--rest", "http://h:x"], "--rest has a bad port"),
        (["--rest", "http://h:1", "--concurrency", "8", "--connections", "2"], "leave --connections out"),
        (["--warmup", "-1"], "--warmup: must be a number of seconds"),
    ],
)
def test_bad_options_exit_2_with_a_message(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--address", "127.0.0.1:1", "bench", *args])
    assert exit_info.value.code == _app.EXIT_USAGE
    stderr = capsys.readouterr().err
    assert "kv bench: error:" in stderr
    assert message in stderr


def test_a_dead_server_exits_4_with_one_line() -> None:
    done = bench("--ops", "10", "--processes", "2", address="127.0.0.1:1")  # a worker's failure
    assert done.returncode == 4
    assert done.stdout == ""
    assert done.stderr.startswith("kv: cannot reach the server at 127.0.0.1:1: ")
    assert "Connection refused" in done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_a_dead_rest_gateway_exits_4_with_one_line() -> None:
    done = bench("--ops", "10", "--rest", "http://127.0.0.1:1")
    assert done.returncode == 4
    assert done.stderr.startswith("kv: cannot reach the REST gateway at http://127.0.0.1:1: ")
    assert "Traceback" not in done.stderr


def test_help_shows_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:\n  kv bench " in text
    for option in ("--reads", "--distribution", "--hot-keys", "--preload", "--processes", "--rest", "--ops"):
        assert option in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "kv bench --duration 10 --preload" in capsys.readouterr().out


# --------------------------------------------------------------------------- the engine's parts


def test_exit_statuses_match_the_cli() -> None:
    assert (_bench.EXIT_OK, _bench.EXIT_USAGE, _bench.EXIT_SERVER) == (
        _app.EXIT_OK,
        _app.EXIT_USAGE,
        _app.EXIT_SERVER,
    )


def test_histogram_percentiles_are_close_and_its_size_fixed() -> None:
    histogram = Histogram()
    size = len(histogram.counts)
    values = list(range(1, 100_001))  # 1 us .. 100 ms
    for value in values:
        histogram.record(value)
    assert len(histogram.counts) == size
    for fraction in (0.5, 0.9, 0.99):
        exact = values[int(fraction * len(values)) - 1]
        assert abs(histogram.percentile(fraction) - exact) <= exact * 0.005
    assert histogram.percentile(1.0) == histogram.max == 100_000
    assert histogram.min == 1
    assert histogram.count == 100_000
    assert Histogram().percentile(0.5) == 0.0
    copy = Histogram.from_json(json.loads(json.dumps(histogram.to_json())))
    assert copy.percentile(0.9) == histogram.percentile(0.9)
    merged = Histogram()
    merged.merge(copy)
    merged.merge(histogram)
    assert merged.count == 200_000
    assert merged.percentile(0.5) == histogram.percentile(0.5)


def test_put_bytes_are_the_generated_message() -> None:
    config = WorkerConfig(
        target="grpc",
        address="127.0.0.1:1",
        reads=0.5,
        keys=1000,
        key_prefix="k/",
        hot_keys=1000,
        hot_ops=0.0,
        value_size=300,
        concurrency=1,
        connections=1,
        ops=1,
        duration=None,
        warmup=0.0,
        preload=False,
        worker=0,
        workers=1,
        seed=5,
        timeout=1.0,
    )
    driver = GrpcDriver(config)
    get = kv_pb2.GetRequest(key=config.key(7)).SerializeToString()
    put = kv_pb2.PutRequest.FromString(get + driver.value_field)
    assert put == kv_pb2.PutRequest(key="k/007", value_bytes=config.value())
    assert len(config.value()) == 300


def test_a_busy_event_loop_is_reported_as_the_bottleneck() -> None:
    args = _app.build_parser().parse_args(["bench", "--ops", "1000", "--processes", "2"])
    settings = _bench.settings_from(args, False)
    busy, idle = WorkerResult(started=10.0, finished=12.0), WorkerResult(started=10.0, finished=12.0)
    busy.loop_cpu, idle.loop_cpu = 1.9, 0.4  # 95% and 20% of the 2 s
    for result in (busy, idle):
        for micros in (900, 1000, 1100):
            result.gets.record(micros)
    data = _bench.report(settings, _bench.Run([idle, busy], machine_busy=0.5, interrupted=False))
    assert data["client"]["bottleneck"] is True
    assert data["client"]["loop_busy"] == [0.2, 0.95]
    assert any(
        "the load tester was the bottleneck" in w and "worker process 2" in w and "--processes 3" in w
        for w in data["warnings"]
    )
    idle_only = _bench.report(settings, _bench.Run([idle, idle], machine_busy=0.5, interrupted=False))
    assert idle_only["client"]["bottleneck"] is False
    assert idle_only["warnings"] == []
    assert idle_only["throughput"] == 3.0  # 6 calls in the 2 s the workers ran together
