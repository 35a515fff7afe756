"""The subset of qemu-system-x86_64's command line that the lab uses, parsed the way QEMU parses it.

QEMU options take one argument each (`-m 1G`), accept `--opt` for `-opt`, and describe objects as keyval
lists whose first bare word is an implied key (`-machine q35,...` means type=q35). `-machine` may be given many
times and its properties merge; for `-incoming` the last value per channel type wins (system/vl.c).
Lab-only options start with `-x-`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from labkit.errors import LabkitError
from labkit.qemu_syntax import GUEST_PATTERNS, MEMORY_BACKENDS, GuestConfig, SizeError, parse_size

PROG = "labkit-vm"
MIN_RAM_SIZE = 1 << 20  # the guest's header page, its generation table and its data pages need at least this

USAGE = """\
usage: labkit-vm [options]   (also: python -m labkit.vm, labkit vm)

One emulated VM in its own process, started with the subset of qemu-system-x86_64's options the lab uses.
Each option takes QEMU's syntax; bad input is refused with QEMU's text where QEMU has one.

QEMU's options:
  -m SIZE                        guest RAM (QEMU size syntax, default unit M; at least 1M)
  -machine q35[,aux-ram-share=on|off][,memory-backend=ID]
  -object memory-backend-{memfd,ram,file,epc},id=ID,size=SIZE[,share=on|off][,mem-path=PATH]
                                 memfd also: [,hugetlb=on|off][,hugetlbsize=SIZE] (MFD_HUGETLB)
  -qmp unix:PATH,server=on,wait=off    the QMP monitor (drive it with qmp-shell PATH; `quit` stops the VM)
  -incoming URI | defer | '{"channel-type": "cpr", ...}'   wait for a migration
  -S                             stay paused until `cont`
  -name NAME   -serial file:PATH|stdio|none   -nodefaults   -accel tcg
  (-display, -kernel, -append, -cpu, -chardev, -mon, -no-reboot, -no-shutdown: accepted, inert)
Refused, because the emulator has no such hardware: -enable-kvm, -accel kvm, -smp N with N > 1.

Lab-only options:
  -x-guest dirty-rate=SIZE,pattern=sequential|random|hotset,working-set=SIZE,seed=N,prefill=on
  -x-hold POINT,...              hold migration at cpr-load, cpr-hup, switchover, main-connected, loaded
                                 (continue with the QMP command x-labkit-continue)

Example:
  labkit-vm -m 256M -machine q35,aux-ram-share=on,memory-backend=ram0 \\
     -object memory-backend-memfd,id=ram0,size=256M,share=on -qmp unix:/tmp/q.sock,server=on,wait=off
  qmp-shell /tmp/q.sock          # then: query-status, x-labkit-guest-stats, quit
"""


class OptionError(LabkitError):
    """A command-line error, printed as one line `labkit-vm: -opt value: what is wrong` and exit status 1.

    ``option`` is the option as given (`-m`, `--object`), once parse_args() knows which one it was."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


class HelpRequested(LabkitError):
    """-h / --help / -help: not a failure, but how parse_args() stops: print USAGE and exit 0, as
    qemu-system-x86_64 -h does."""


def _check_ram_size(size: int) -> None:
    """QEMU would round a tiny -m up; the emulated guest needs room for its own tables, so refuse instead."""
    if size < MIN_RAM_SIZE:
        from labkit.qemu_syntax import human_size

        raise OptionError(f"RAM size {human_size(size)} is below the emulator's minimum of 1 MiB")


@dataclass
class BackendOptions:
    """One `-object memory-backend-*` (QEMU's HostMemoryBackend properties that the lab uses)."""

    qom_type: str
    id: str
    size: int
    share: bool
    mem_path: str | None = None
    hugetlb: bool = False  # memory-backend-memfd only: MFD_HUGETLB (labkit.vm.memfd)
    hugetlbsize: int | None = None  # None: not given (the kernel's default huge page size)
    prealloc: bool = False  # prealloc=on: host_memory_backend_memory_complete() faults every page in


@dataclass
class MachineOptions:
    """Everything parsed from argv, before any object is created."""

    name: str = "vm"
    ram_size: int = 128 << 20  # QEMU's default -m
    ram_size_given: bool = False
    machine_type: str = "q35"
    aux_ram_share: bool = False
    memory_backend: str | None = None
    objects: dict[str, BackendOptions] = field(default_factory=dict)
    qmp: list[str] = field(default_factory=list)  # unix socket paths
    incoming: dict[str, str | None] = field(
        default_factory=dict
    )  # channel type -> raw value ("defer" -> main: None)
    start_paused: bool = False
    serial_file: str | None = None
    guest: GuestConfig = field(default_factory=GuestConfig)
    accel: str | None = None
    nodefaults: bool = False  # -nodefaults: no default devices, so no VGA and no vga.vram block
    holds: set[str] = field(
        default_factory=set
    )  # -x-hold: named points where migration waits for x-labkit-continue


# Options that take an argument, and those that do not (system/vl.c's QEMU_OPTION_* table, lab subset).
_WITH_ARG = {
    "name",
    "m",
    "machine",
    "M",
    "object",
    "qmp",
    "incoming",
    "display",
    "accel",
    "serial",
    "x-guest",
    "x-hold",
    "kernel",
    "append",
    "cpu",
    "smp",
    "chardev",
    "mon",
}
_NO_ARG = {"S", "nodefaults", "enable-kvm", "no-reboot", "no-shutdown"}


def parse_bool(text: str, what: str) -> bool:
    """QEMU's qapi_bool_parse(): on/yes/true/y and off/no/false/n."""
    low = text.lower()
    if low in ("on", "yes", "true", "y"):
        return True
    if low in ("off", "no", "false", "n"):
        return False
    raise OptionError(f"Parameter '{what}' expects 'on' or 'off'")


def parse_keyval(text: str, implied_key: str | None) -> dict[str, str]:
    """Split QEMU keyval syntax: `a=1,b=2`; ',,' escapes a comma; a leading bare word is the implied key."""
    items: list[str] = []
    cur = ""
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if i + 1 < len(text) and text[i + 1] == ",":
                cur += ","
                i += 2
                continue
            items.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    items.append(cur)
    out: dict[str, str] = {}
    for n, item in enumerate(items):
        if "=" in item:
            key, _, value = item.partition("=")
            if not key:
                raise OptionError(f"Invalid parameter '{item}'")
            out[key] = value
        elif n == 0 and implied_key and item:
            out[implied_key] = item
        elif item == "":
            raise OptionError("Expected parameter name")
        else:
            raise OptionError(f"Expected '=' after parameter '{item}'")
    return out


def _machine(opts: MachineOptions, value: str) -> None:
    kv = parse_keyval(value, "type")
    for key, val in kv.items():
        if key == "type":
            if val not in ("q35", "pc", "pc-q35-10.0", "none"):
                raise OptionError(f"unsupported machine type: {val}")
            opts.machine_type = val
        elif key == "aux-ram-share":
            opts.aux_ram_share = parse_bool(val, "aux-ram-share")
        elif key == "memory-backend":
            opts.memory_backend = val
        elif key in ("accel", "usb", "vmport", "smm"):
            pass  # accepted, inert in the emulator
        else:
            raise OptionError(f"Property '{opts.machine_type}-machine.{key}' not found")


def _object(opts: MachineOptions, value: str) -> None:
    kv = parse_keyval(value, "qom-type")
    qom_type = kv.pop("qom-type", None)
    if not qom_type:
        raise OptionError("Parameter 'qom-type' is missing")
    if qom_type not in MEMORY_BACKENDS:
        raise OptionError(f"invalid object type: {qom_type}")
    oid = kv.pop("id", None)
    if not oid:
        raise OptionError("Parameter 'id' is missing")
    if oid in opts.objects:
        raise OptionError(f"attempt to add duplicate property '{oid}' to object (type 'container')")
    if "size" not in kv:
        raise OptionError("can't create backend with size 0")
    try:
        size = parse_size(kv.pop("size"))
    except SizeError as e:
        raise OptionError(f"Parameter 'size' expects a non-negative number below 2^64 ({e})") from None
    if size == 0:
        raise OptionError("can't create backend with size 0")
    _check_ram_size(size)
    # QEMU's defaults: memory-backend-memfd shares (share=on), the others do not
    share = parse_bool(kv.pop("share"), "share") if "share" in kv else qom_type == "memory-backend-memfd"
    mem_path = kv.pop("mem-path", None)
    prealloc = parse_bool(kv.pop("prealloc"), "prealloc") if "prealloc" in kv else False
    if qom_type == "memory-backend-file" and not mem_path:
        raise OptionError("mem-path property not set")
    hugetlb, hugetlbsize = _hugetlb(qom_type, kv)
    for key in kv:
        if key not in ("prealloc", "merge", "dump", "reserve", "host-nodes", "policy"):
            raise OptionError(f"Property '{qom_type}.{key}' not found")
    opts.objects[oid] = BackendOptions(
        qom_type, oid, size, share, mem_path, prealloc=prealloc, hugetlb=hugetlb, hugetlbsize=hugetlbsize
    )


def _hugetlb(qom_type: str, kv: dict[str, str]) -> tuple[bool, int | None]:
    """memory-backend-memfd's hugetlb= and hugetlbsize= (other backends have neither). Only the syntax is
    judged here, as QEMU's option parser does; the values are judged when the memfd is made."""
    if qom_type != "memory-backend-memfd":
        return False, None
    hugetlb = parse_bool(kv.pop("hugetlb"), "hugetlb") if "hugetlb" in kv else False
    if "hugetlbsize" not in kv:
        return hugetlb, None
    try:
        return hugetlb, parse_size(kv.pop("hugetlbsize"))
    except SizeError:
        raise OptionError("Parameter 'hugetlbsize' expects a size value") from None


def _qmp(opts: MachineOptions, value: str) -> None:
    if not value.startswith("unix:"):
        raise OptionError(f"'{value}' is not a unix socket address (the emulator serves QMP on unix sockets)")
    path, *rest = value[5:].split(",")
    for item in rest:
        key, _, val = item.partition("=")
        if key in ("server", "wait"):
            parse_bool(val or "on", key)
        else:
            raise OptionError(f"Invalid parameter '{key}'")
    if not path:
        raise OptionError("Parameter 'path' is missing")
    opts.qmp.append(path)


def _incoming(opts: MachineOptions, value: str) -> None:
    # Local import: the channel parser belongs to the migration package, which sits below the VM.
    from labkit.vm.migration.channels import parse_incoming_option

    try:
        ctype, channel = parse_incoming_option(value)
    except ValueError as e:
        raise OptionError(str(e)) from None
    # "New incoming spec replaces the previous" (incoming_option_parse): keep the raw text, last one wins.
    opts.incoming[ctype] = None if channel is None else value


def _guest(opts: MachineOptions, value: str) -> None:
    kv = parse_keyval(value, None)
    g = GuestConfig()
    try:
        for key, val in kv.items():
            if key == "dirty-rate":
                g.dirty_rate = parse_size(val)
            elif key == "pattern":
                if val not in GUEST_PATTERNS:
                    raise OptionError(f"Parameter 'pattern' does not accept value '{val}'")
                g.pattern = val
            elif key == "working-set":
                g.working_set = parse_size(val)
            elif key == "seed":
                g.seed = int(val)
            elif key == "prefill":
                g.prefill = parse_bool(val, "prefill")
            else:
                raise OptionError(f"Invalid parameter '{key}'")
    except (SizeError, ValueError) as e:
        if isinstance(e, OptionError):
            raise
        raise OptionError(str(e)) from None
    opts.guest = g


def parse_args(argv: list[str]) -> MachineOptions:
    """Parse argv (without the program name) into MachineOptions; raise OptionError with QEMU-style text."""
    opts = MachineOptions()
    i = 0
    while i < len(argv):
        raw = argv[i]
        if not raw.startswith("-") or raw == "-":
            raise OptionError(
                f"{raw}: disk images are not supported by the emulator"
            )  # QEMU would take it as -hda
        name = raw.lstrip("-") if raw.startswith("--") else raw[1:]
        if name in ("h", "help"):
            raise HelpRequested()
        if name == "enable-kvm":
            raise OptionError(f"{raw}: the emulator has no KVM (use the qemu backend for a real vCPU)")
        if name in _NO_ARG:
            if name == "S":
                opts.start_paused = True
            elif name == "nodefaults":
                opts.nodefaults = True
            i += 1
            continue
        if name not in _WITH_ARG:
            raise OptionError(f"{raw}: invalid option")
        if i + 1 >= len(argv):
            raise OptionError(f"{raw}: requires an argument")
        value = argv[i + 1]
        try:
            _apply(opts, name, value)
        except OptionError as e:
            raise OptionError(f"{raw} {value}: {e}", option=raw) from None
        i += 2
    _finish(opts)
    return opts


def _apply(opts: MachineOptions, name: str, value: str) -> None:
    if name == "name":
        opts.name = parse_keyval(value, "guest").get("guest", value)
    elif name == "m":
        kv = parse_keyval(value, "size")
        try:
            opts.ram_size = parse_size(kv.get("size", ""), default_suffix="m")
        except SizeError:
            raise OptionError("Parameter 'size' expects a non-negative number below 2^64") from None
        _check_ram_size(opts.ram_size)
        opts.ram_size_given = True
    elif name in ("machine", "M"):
        _machine(opts, value)
    elif name == "object":
        _object(opts, value)
    elif name == "qmp":
        _qmp(opts, value)
    elif name == "incoming":
        _incoming(opts, value)
    elif name == "x-guest":
        _guest(opts, value)
    elif name == "x-hold":
        from labkit.vm.migration.holds import HOLD_POINTS

        for point in filter(None, value.split(",")):
            if point not in HOLD_POINTS:
                raise OptionError(f"unknown hold point '{point}' (known: {', '.join(HOLD_POINTS)})")
            opts.holds.add(point)
    elif name == "serial":
        if value.startswith("file:"):
            opts.serial_file = value[5:]
        elif value not in ("none", "null", "stdio"):
            raise OptionError("the emulator's serial port supports file:PATH, stdio or none")
    elif name == "accel":
        opts.accel = parse_keyval(value, "accel").get("accel")
        if opts.accel not in (None, "tcg", "qtest"):
            raise OptionError("the emulator has no KVM (use the qemu backend for a real vCPU)")
    elif name == "smp":
        cpus = parse_keyval(value, "cpus").get("cpus", "1")
        if cpus != "1":
            raise OptionError("the emulated guest has exactly one vCPU")
    # -display, -kernel, -append, -cpu, -chardev, -mon: accepted and inert in the emulator


def _finish(opts: MachineOptions) -> None:
    """Cross-option checks QEMU makes when it creates the machine."""
    if opts.memory_backend is not None:
        backend = opts.objects.get(opts.memory_backend)
        if backend is None:
            raise OptionError(f"Memory backend '{opts.memory_backend}' not found")
        if opts.ram_size_given and backend.size != opts.ram_size:
            raise OptionError("backend memory size must match the RAM size given with -m")
        opts.ram_size = backend.size
    ws = opts.guest.working_set
    if ws and ws > opts.ram_size:
        raise OptionError(
            f"-x-guest working-set={ws}: larger than guest RAM ({opts.ram_size} bytes); "
            "choose a working set no larger than -m"
        )
