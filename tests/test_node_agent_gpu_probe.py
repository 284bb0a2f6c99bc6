"""The node agent's GPU seam: fake spec parsing and accounting, CPU-only hosts, NVML where present."""

from __future__ import annotations

import asyncio

import pytest

from meshserve.node_agent.gpu_probe import (
    FakeProbe,
    GpuLoad,
    NoGpuProbe,
    NvmlProbe,
    parse_fake_spec,
    parse_size,
    select_probe,
)
from meshserve.node_agent.replica import DEFAULT_GPU_MEMORY_BYTES, ReplicaSpec

GiB = 1 << 30


def nvml_available() -> bool:
    try:
        probe = NvmlProbe.open()
    except Exception:
        return False
    probe.close()
    return True


def test_sizes():
    assert parse_size("80GiB") == 80 * GiB
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("1.5GiB") == 3 * GiB // 2
    assert parse_size("4096") == 4096
    for bad in ("", "GiB", "80 parsecs", "-1GiB"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_fake_spec_parses_counts_and_sizes_in_order():
    gpus = parse_fake_spec("1x24GiB,2x80GiB")
    assert [g.memory_total_bytes for g in gpus] == [24 * GiB, 80 * GiB, 80 * GiB]
    assert [g.memory_total_bytes for g in parse_fake_spec("2x80GiB")] == [80 * GiB] * 2
    assert [g.memory_total_bytes for g in parse_fake_spec("16GiB")] == [16 * GiB]  # count defaults to 1
    assert len(parse_fake_spec(" 2 X 1GiB ")) == 2


@pytest.mark.parametrize("spec, bad_part", [
    ("2x80GiB,2x", "2x"),
    ("x80GiB", "x80GiB"),
    ("2x80XB", "2x80XB"),
    ("0x80GiB", "0x80GiB"),
    ("1x24GiB,,2x80GiB", "''"),
    ("2x0GiB", "2x0GiB"),
])
def test_fake_spec_errors_name_the_bad_part(spec, bad_part):
    with pytest.raises(ValueError, match=f"'{bad_part}'" if bad_part != "''" else "empty part ''"):
        parse_fake_spec(spec)


def test_fake_probe_used_memory_follows_declared_loads():
    probe = FakeProbe("1x24GiB,2x80GiB", seed="node-a")
    assert probe.source == "fake"
    idle = probe.sample_now()
    assert [g.index for g in idle] == [0, 1, 2]
    assert all(g.memory_used_bytes == 0 and g.memory_free_bytes == g.memory_total_bytes for g in idle)
    assert all(g.uuid.startswith("GPU-fake-") for g in idle)
    assert len({g.uuid for g in idle}) == 3
    assert "Fake" in idle[0].name

    loads = [GpuLoad(pid=100, gpu_indices=(1,), memory_bytes=10 * GiB),
             GpuLoad(pid=101, gpu_indices=(1, 2), memory_bytes=30 * GiB),
             GpuLoad(pid=102, gpu_indices=(7,), memory_bytes=GiB)]  # no such GPU: ignored
    gpus = asyncio.run(probe.sample(loads))
    assert gpus[0].memory_used_bytes == 0
    assert gpus[1].memory_used_bytes == 40 * GiB and gpus[1].memory_free_bytes == 40 * GiB
    assert gpus[2].memory_used_bytes == 30 * GiB
    assert [(p.pid, p.used_memory_bytes) for p in gpus[1].processes] == [(100, 10 * GiB), (101, 30 * GiB)]
    assert all(g.utilization_percent == 0 for g in gpus)

    over = probe.sample_now([GpuLoad(1, (0,), 30 * GiB)])[0]
    assert over.memory_used_bytes == 24 * GiB and over.memory_free_bytes == 0  # capped, never negative


def test_fake_uuids_are_stable_per_seed():
    assert FakeProbe("2x1GiB", seed="a").uuids == FakeProbe("2x1GiB", seed="a").uuids
    assert FakeProbe("2x1GiB", seed="a").uuids != FakeProbe("2x1GiB", seed="b").uuids


def test_replica_declares_gpu_memory_through_env():
    assert ReplicaSpec.create("r", env={"MESHSERVE_GPU_MEMORY_BYTES": "8GiB"}).gpu_memory_bytes == 8 * GiB
    assert ReplicaSpec.create("r", env={"MESHSERVE_GPU_MEMORY_BYTES": str(5 * GiB)}).gpu_memory_bytes == 5 * GiB
    assert ReplicaSpec.create("r").gpu_memory_bytes == DEFAULT_GPU_MEMORY_BYTES
    assert ReplicaSpec.create("r", env={"MESHSERVE_GPU_MEMORY_BYTES": "lots"}).gpu_memory_bytes \
        == DEFAULT_GPU_MEMORY_BYTES


def test_no_gpu_probe_says_so():
    probe = NoGpuProbe("NVML is not available: NVML Shared Library Not Found")
    assert probe.source == "none"
    assert asyncio.run(probe.sample([GpuLoad(1, (0,), GiB)])) == []
    assert "NVML" in probe.reason


def test_select_probe_fakes_only_when_asked():
    assert isinstance(select_probe("2x80GiB"), FakeProbe)
    with pytest.raises(ValueError, match="'3xBIG'"):
        select_probe("3xBIG")
    probe = select_probe(None)
    try:
        if nvml_available():
            assert isinstance(probe, NvmlProbe) and probe.source == "nvml"
        else:
            # This machine has no GPU: CPU-only, said so, and never a fake.
            assert isinstance(probe, NoGpuProbe)
            assert probe.source == "none" and probe.reason
    finally:
        probe.close()


def test_nvml_probe_reads_real_gpus():
    pytest.importorskip("pynvml")
    if not nvml_available():
        pytest.skip("no NVML (no GPU or driver) on this machine")
    probe = NvmlProbe.open()
    try:
        gpus = asyncio.run(probe.sample())
    finally:
        probe.close()
    assert len(gpus) == probe.count >= 1
    for index, gpu in enumerate(gpus):
        assert gpu.index == index
        assert gpu.uuid.startswith(("GPU-", "MIG-")) and gpu.name
        assert gpu.memory_total_bytes > 0
        assert gpu.memory_used_bytes <= gpu.memory_total_bytes
        assert 0 <= gpu.utilization_percent <= 100
        assert gpu.power_watts >= 0   # 0 where the device does not report power
