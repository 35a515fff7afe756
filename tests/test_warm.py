"""The completion run once before the pause (labkit.vm.migration.warm), the vmdesc kept from it, and the
device sections in section id order.

The warm-up must be invisible: the scratch stream is a valid QEMU 10 stream of what the completion would
send, and nothing of it reaches a socket; a device that fails there is left for the real save to report.
"""

from __future__ import annotations

import json
from io import BytesIO

import pytest

from labkit.vm.devices import CPUDevice, DeviceError, GlobalState, SerialDevice, TimerDevice
from labkit.vm.guest import Guest
from labkit.vm.memory import ram_blocks_create
from labkit.vm.migration import savevm
from labkit.vm.migration.qemu_file import QEMUFileIn, QEMUFileOut
from labkit.vm.migration.stream import Q35_MACHINE_NAME, qemu_loadvm_state
from labkit.vm.migration.vmstate import vmdesc_section_size, vmstate_load_state
from labkit.vm.migration.warm import savevm_completion_stream, warm_savevm_completion
from labkit.vm.options import parse_args

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def ram():
    ram = ram_blocks_create(parse_args(["-m", "4M", "-nodefaults", "-x-guest", "seed=7"]))
    yield ram
    ram.close()


@pytest.fixture
def devices(ram, tmp_path):
    guest = Guest(ram.system, parse_args(["-m", "4M", "-x-guest", "seed=7"]).guest)
    for _ in range(5):
        guest.tick(0.001)
    guest.serial_line("hello from the guest")
    serial = SerialDevice(guest, str(tmp_path / "serial.log"))
    yield [TimerDevice(guest), CPUDevice(guest), serial, GlobalState()]
    serial.close()


def _blocks(ram) -> list[tuple[str, int]]:
    return [(b.idstr, b.size) for b in ram]


def _load_into(devices, ram):
    """qemu_loadvm_state with a destination's callbacks: RAM views, devices loaded by name."""

    def on_device(name: str, instance: int, version: int, f: QEMUFileIn) -> None:
        dev = next(d for d in devices if d.name == name)
        dev.load(vmstate_load_state(f.get_bytes, f.peek, dev.vmsd, version))

    def load(f: QEMUFileIn):
        return qemu_loadvm_state(
            f,
            ram=lambda name: ram.find(name).view(),
            on_device=on_device,
            machine=Q35_MACHINE_NAME,
            require_configuration=True,
        )

    return load


def test_completion_stream_is_a_stream_of_devices_and_no_page(ram, devices):
    raw = savevm_completion_stream(_blocks(ram), devices)
    stats = _load_into(devices, ram)(QEMUFileIn(BytesIO(raw)))
    # RAM START lists every block, the END carries no page, then the devices in section id order
    assert stats.sections == ["ram", "ram", "timer", "cpu", "serial", "globalstate"]
    assert stats.ram_blocks == _blocks(ram)
    assert stats.normal_pages == stats.zero_pages == 0
    assert [r.kind for r in stats.records] == [
        "CONFIGURATION", "START", "COMMAND", "END", "FULL", "FULL", "FULL", "FULL", "EOF", "VMDESCRIPTION",
    ]  # fmt: skip
    assert [d["name"] for d in json.loads(stats.vmdesc or b"")["devices"]] == [
        "timer", "cpu", "serial", "globalstate",
    ]  # fmt: skip


def test_warm_savevm_survives_a_device_that_fails(ram, devices):
    class Broken:
        name = "cpu"
        vmsd = devices[1].vmsd

        def save(self):
            raise DeviceError("cpu", "cannot save")

        def load(self, values):
            raise AssertionError("not loaded")

    warm_savevm_completion(_blocks(ram), [devices[0], Broken()])  # left for the real save to report


def test_vmdesc_kept_from_the_scratch_stream_is_the_one_sent(ram, devices):
    raw = savevm_completion_stream(_blocks(ram), devices)
    devices[0].guest.tick(0.001)  # the values move on; the layout does not
    again = savevm_completion_stream(_blocks(ram), devices)
    tail = raw[raw.rindex(b"\x00\x06") :]  # EOF, then QEMU_VM_VMDESCRIPTION and the JSON
    assert again.endswith(tail) and raw != again


def test_vmdesc_cache_follows_a_changed_layout_and_is_not_changed_under_it():
    cache = savevm._VMDescCache()
    desc = {"page_size": 4096, "devices": [{"name": "serial", "fields": [{"name": "lines", "size": 10}]}]}
    first = cache.encode(desc)
    assert first == json.dumps(desc).encode()
    assert cache.encode(json.loads(first)) is first  # an equal description: the same bytes, not encoded again
    desc["devices"][0]["fields"][0]["size"] = 11  # the caller's dict changes: the cache kept its own copy
    second = cache.encode(desc)
    assert second == json.dumps(desc).encode() and second != first


def test_device_sections_go_in_section_id_order(devices):
    f = QEMUFileOut(BytesIO())
    size = savevm.qemu_savevm_state_complete_non_iterable(f, list(reversed(devices)))
    assert [d["name"] for d in f.savevm.vmdesc.devices] == ["timer", "cpu", "serial", "globalstate"]
    payload = sum(vmdesc_section_size(d) for d in f.savevm.vmdesc.devices)
    assert size == payload
