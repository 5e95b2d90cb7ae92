"""Can this host's KVM run a stock x86-64 kernel? Probed, not assumed from /dev/kvm existing.

Two checks: a vCPU really runs ring-0 64-bit code to HLT through the KVM ioctls (in a child
process, so a hung vCPU cannot hang the shim), and the kernel's KVM backend is hardware
virtualisation (kvm_intel, kvm_amd). PVM (kvm_pvm, pagetable-based nested virtualisation, as
on these CI machines) passes the first but runs only PVM-enabled guest kernels.

`python -m bitbuilder.hostshim.capabilities.kvm` runs the vCPU check: exit 0 when it halted.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

KVM_DEVICE = Path("/dev/kvm")
HARDWARE_BACKENDS = ("kvm_intel", "kvm_amd")
SOFTWARE_BACKENDS = {"kvm_pvm": "PVM (pagetable-based nested virtualisation)"}
PROBE_TIMEOUT = 10.0

# ioctl numbers (linux/kvm.h, x86-64)
_CREATE_VM = 0xAE01
_GET_VCPU_MMAP_SIZE = 0xAE04
_CREATE_VCPU = 0xAE41
_SET_USER_MEMORY_REGION = 0x4020AE46
_RUN = 0xAE80
_GET_SREGS = 0x8138AE83
_SET_SREGS = 0x4138AE84
_SET_REGS = 0x4090AE82
_EXIT_IO, _EXIT_HLT = 2, 5
_MEMORY = 0x200000  # one 2 MiB page, identity-mapped
_CODE_AT = 0x1000
# mov rax, cr3; mov dx, 0x3f8; mov al, 'K'; out dx, al; hlt  (a privileged read, then a port)
_CODE = bytes.fromhex("0f20d866baf803b04beef4")


@dataclass(frozen=True)
class KvmProbe:
    usable: bool
    backend: str | None
    reason: str | None


def _segment(sregs: bytearray, index: int, selector: int, type_: int, long: int) -> None:
    # struct kvm_segment: base, limit, selector, type, present, dpl, db, s, l, g, avl, ...
    fields = (0, 0xFFFFFFFF, selector, type_, 1, 0, 0, 1, long, 1, 0, 0, 0)
    struct.pack_into("QIHBBBBBBBBBB", sregs, index * 24, *fields)


def run_vcpu() -> str | None:
    """Run the probe guest; None when it wrote its byte and halted, else what went wrong."""
    kvm = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    vm = fcntl.ioctl(kvm, _CREATE_VM, 0)
    memory = mmap.mmap(-1, _MEMORY)
    memory[_CODE_AT : _CODE_AT + len(_CODE)] = _CODE
    present_rw, large = 0x3, 0x80  # page tables: PML4 at 0x2000 -> PDPT 0x3000 -> PD 0x4000
    struct.pack_into("Q", memory, 0x2000, 0x3000 | present_rw)
    struct.pack_into("Q", memory, 0x3000, 0x4000 | present_rw)
    struct.pack_into("Q", memory, 0x4000, present_rw | large)
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    region = struct.pack("IIQQQ", 0, 0, 0, _MEMORY, address)
    fcntl.ioctl(vm, _SET_USER_MEMORY_REGION, region)
    vcpu = fcntl.ioctl(vm, _CREATE_VCPU, 0)
    size = fcntl.ioctl(kvm, _GET_VCPU_MMAP_SIZE, 0)
    run = mmap.mmap(vcpu, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    sregs = bytearray(312)
    fcntl.ioctl(vcpu, _GET_SREGS, sregs, True)
    _segment(sregs, 0, 8, 11, 1)  # cs: 64-bit code
    for index in range(1, 6):  # ds, es, fs, gs, ss
        _segment(sregs, index, 16, 3, 0)
    # cr0 (PE, PG, ...), cr2, cr3, cr4 (PAE), cr8, efer (LME, LMA)
    struct.pack_into("QQQQQQ", sregs, 224, 0x80050033, 0, 0x2000, 0x20, 0, 0x500)
    fcntl.ioctl(vcpu, _SET_SREGS, bytes(sregs))
    regs = [0] * 18
    regs[6], regs[16], regs[17] = _MEMORY, _CODE_AT, 0x2  # rsp, rip, rflags
    fcntl.ioctl(vcpu, _SET_REGS, struct.pack("18Q", *regs))
    wrote = b""
    for _ in range(4):
        fcntl.ioctl(vcpu, _RUN, 0)
        reason = struct.unpack_from("I", run, 8)[0]
        if reason == _EXIT_IO:
            width, port, offset = struct.unpack_from("xBHxxxxQ", run, 32)
            wrote += run[offset : offset + width] if port == 0x3F8 else b""
            continue
        if reason == _EXIT_HLT and wrote == b"K":
            return None
        return f"the probe vCPU stopped with KVM exit reason {reason}"
    return "the probe vCPU did not halt"


def _backend() -> str | None:
    for name in (*HARDWARE_BACKENDS, *SOFTWARE_BACKENDS):
        if Path("/sys/module", name).is_dir():
            return name
    return None


def probe() -> KvmProbe:
    if not KVM_DEVICE.exists():
        return KvmProbe(
            False,
            None,
            "/dev/kvm does not exist (no KVM module loaded, or not passed into this container)",
        )
    backend = _backend()
    try:
        result = subprocess.run(
            [sys.executable, "-m", __name__], capture_output=True, text=True, timeout=PROBE_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        return KvmProbe(False, backend, f"a probe vCPU did not halt within {PROBE_TIMEOUT:.0f}s")
    if result.returncode != 0:
        said = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return KvmProbe(False, backend, f"a probe vCPU could not run: {said}")
    if backend in SOFTWARE_BACKENDS:
        return KvmProbe(
            False,
            backend,
            f"/dev/kvm is {SOFTWARE_BACKENDS[backend]}, which runs only guest kernels built for it, not a stock kernel",
        )
    if backend is None:
        return KvmProbe(False, None, "no hardware KVM module (kvm_intel, kvm_amd) is loaded")
    return KvmProbe(True, backend, None)


def main() -> int:
    try:
        problem = run_vcpu()
    except OSError as exc:
        problem = str(exc)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
