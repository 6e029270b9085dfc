#!/usr/bin/env python3
"""Does reading another process's memory copy it? (root: page frame numbers)

A parent fills 4 pages and forks; the child maps the same 4 frames. A
reader then copies the parent's pages, either with process_vm_readv (which
pins them, FOLL_PIN) or with a pread of /proc/PID/mem (FOLL_GET). Prints
the distinct frames the parent and child map before and after each way:
4 means still shared; 8 means the read made the kernel unshare them (a
read-only pin of a possibly shared anonymous page unshares it since 5.19).

    sudo /usr/bin/python3 scripts/estimate/fork_frames.py
"""
import ctypes, mmap, os, struct, sys, time

PAGE, N = 4096, 4
libc = ctypes.CDLL(None, use_errno=True)


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def frames(pid, addr):
    with open(f"/proc/{pid}/pagemap", "rb") as pm:
        pm.seek(addr // PAGE * 8)
        return [e & ((1 << 55) - 1) for (e,) in struct.iter_unpack("<Q", pm.read(N * 8))]


def trial(how):
    m = mmap.mmap(-1, N * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(N):
        m[i * PAGE:(i + 1) * PAGE] = struct.pack("<Q", i + 1) * (PAGE // 8)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    child = os.fork()
    if child == 0:
        time.sleep(30)
        os._exit(0)
    try:
        time.sleep(0.2)
        parent = os.getpid()
        before = len(set(frames(parent, addr) + frames(child, addr)))
        # Read the parent's pages from this process, as `samepage estimate` would.
        buf = ctypes.create_string_buffer(N * PAGE)
        if how == "process_vm_readv":
            local, remote = IoVec(ctypes.addressof(buf), N * PAGE), IoVec(addr, N * PAGE)
            if libc.process_vm_readv(parent, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) != N * PAGE:
                sys.exit(f"process_vm_readv: {os.strerror(ctypes.get_errno())}")
        else:
            with open(f"/proc/{parent}/mem", "rb") as mem:
                mem.seek(addr)
                mem.read(N * PAGE)
        after = len(set(frames(parent, addr) + frames(child, addr)))
        print(f"{how:18} distinct frames of parent and child: before {before}, after {after}")
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("needs root (page frame numbers)")
    trial("process_vm_readv")
    trial("/proc/PID/mem")
