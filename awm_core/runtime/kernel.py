"""Kernel confinement of a sandbox worker that holds without root: a user + network
namespace, a Landlock ruleset and a seccomp-bpf filter, applied through the raw system
calls (no libseccomp or bindings needed).

The in-process layers (audit hook, restricted imports) can be switched off by code that
reaches the worker's own objects; these cannot be undone from inside the process. They
are applied once, at worker start, while the worker is still single-threaded: Landlock
and seccomp bind the calling thread and the threads it starts afterwards.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import threading
from typing import Iterable

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_THREAD = 0x00010000
# Every namespace flag of clone(): a thread may not be started in a new namespace.
CLONE_NEW_ANY = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x00000080

# ---------------------------------------------------------------- user + network namespace


def enter_network_namespace() -> bool:
    """Root's way in (it keeps a separate uid instead of a user namespace)."""
    return _libc.unshare(CLONE_NEWNET) == 0


def enter_namespaces() -> dict[str, bool]:
    """An unprivileged process's own user namespace (same uid mapped) and an empty network
    namespace: no interface but a downed loopback, so no connection leaves the worker."""
    uid, gid = os.getuid(), os.getgid()
    if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        return {"user_namespace": False, "network_namespace": False}
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError:
        pass  # ids show as the overflow id; access checks still use the real ones
    _drop_capabilities()
    return {"user_namespace": True, "network_namespace": True}


def _drop_capabilities() -> None:
    """Creating a user namespace grants every capability inside it; none is needed."""
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = bytes(24)
    _libc.capset(ctypes.c_char_p(header), ctypes.c_char_p(data))


# ---------------------------------------------------------------- Landlock

_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_ABI1 = (1 << 13) - 1
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1
_FILE_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV

# Shared libraries an extension module may load lazily, and the loader's cache.
SYSTEM_READ_ROOTS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/etc/ld.so.cache")


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where Landlock is missing or disabled."""
    v = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(v), 0)


def _fs_rights(abi: int) -> int:
    rights = _FS_ABI1
    if abi >= 2:
        rights |= _FS_REFER
    if abi >= 3:
        rights |= _FS_TRUNCATE
    if abi >= 5:
        rights |= _FS_IOCTL_DEV
    return rights


def apply_landlock(read_only: Iterable[str], read_write: Iterable[str]) -> dict[str, int | bool]:
    """Files: reads under ``read_only``, everything under ``read_write``, nothing else.
    TCP bind/connect denied outright (ABI 4+); signals and abstract UNIX sockets scoped to
    the worker itself (ABI 6+). Returns what is in force."""
    abi = landlock_abi()
    off = {"landlock": 0, "landlock_network": False, "landlock_scoped_signals": False}
    if abi < 1:
        return off
    handled = _fs_rights(abi)
    net = _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0
    scoped = _SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL if abi >= 6 else 0
    attr = struct.pack("QQQ", handled, net, scoped)[: 24 if abi >= 6 else 16 if abi >= 4 else 8]
    fd = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.c_char_p(attr), ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if fd < 0:
        return off
    try:
        for path in dict.fromkeys(read_only):
            _add_path_rule(fd, path, (_FS_READ_FILE | _FS_READ_DIR | _FS_EXECUTE) & handled)
        for path in dict.fromkeys(read_write):
            _add_path_rule(fd, path, handled)
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            return off
        if _libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(fd), ctypes.c_uint32(0)) != 0:
            return off
    finally:
        os.close(fd)
    return {"landlock": abi, "landlock_network": bool(net), "landlock_scoped_signals": bool(scoped)}


def _add_path_rule(ruleset_fd: int, path: str, rights: int) -> None:
    try:
        pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # a folder this machine does not have
    try:
        if not os.path.isdir(path):
            rights &= _FILE_RIGHTS  # directory rights on a file are refused by the kernel
        if path == "/dev/null":
            rights |= _FS_WRITE_FILE
        attr = struct.pack("=Qi", rights, pfd)
        _libc.syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset_fd), ctypes.c_int(1), ctypes.c_char_p(attr),
                      ctypes.c_uint32(0))
    finally:
        os.close(pfd)


# ---------------------------------------------------------------- seccomp

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# System calls the worker never needs; refused with EPERM (kill() and friends are checked
# by target below). Numbers per architecture: x86_64, aarch64 (None: not on that arch).
_DENIED = {
    "execve": (59, 221), "execveat": (322, 281), "fork": (57, None), "vfork": (58, None),
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
    "move_mount": (429, 429), "open_tree": (428, 428), "fsopen": (430, 430), "fsmount": (432, 432),
    "bpf": (321, 280), "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "personality": (135, 92), "unshare": (272, 97), "setns": (308, 268),
    "connect": (42, 203), "bind": (49, 200), "listen": (50, 201), "accept": (43, 202), "accept4": (288, 242),
    "sendmsg": (46, 211), "sendmmsg": (307, 269),
    "tkill": (200, 130), "pidfd_open": (434, 434), "pidfd_send_signal": (424, 424), "pidfd_getfd": (438, 438),
    "process_madvise": (440, 440), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "userfaultfd": (323, 282), "perf_event_open": (298, 241),
    "kexec_load": (246, 104), "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "reboot": (169, 142), "swapon": (167, 224), "swapoff": (168, 225), "syslog": (103, 116), "acct": (163, 89),
    "setuid": (105, 146), "setgid": (106, 144), "setreuid": (113, 145), "setregid": (114, 143),
    "setresuid": (117, 147), "setresgid": (119, 149), "setgroups": (116, 159),
}
_SOCKET, _SOCKETPAIR, _SENDTO = (41, 198), (53, 199), (44, 206)
_CLONE, _CLONE3 = (56, 220), (435, 435)
_KILL, _TGKILL, _RT_SIGQUEUEINFO, _RT_TGSIGQUEUEINFO = (62, 129), (234, 131), (129, 138), (297, 240)
AF_UNIX = 1

_RET_ALLOW, _RET_KILL_PROCESS = 0x7FFF0000, 0x80000000
_RET_EPERM, _RET_ENOSYS = 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
_LD_W_ABS, _JEQ_K, _JSET_K, _RET_K = 0x20, 0x15, 0x45, 0x06
_NR, _ARCH = 0, 4


def _arg(i: int, high: bool = False) -> int:
    return 16 + 8 * i + (4 if high else 0)  # little-endian: low word first


def seccomp_filter(pid: int) -> bytes | None:
    """The BPF program for this machine's architecture; None where it is not supported."""
    arch = platform.machine()
    if arch not in _AUDIT_ARCH:
        return None
    a = 0 if arch == "x86_64" else 1
    prog: list[tuple[int, int, int, int]] = []

    def op(code, k, jt=0, jf=0):
        prog.append((code, jt, jf, k))

    op(_LD_W_ABS, _ARCH)
    op(_JEQ_K, _AUDIT_ARCH[arch], 1, 0)
    op(_RET_K, _RET_KILL_PROCESS)
    op(_LD_W_ABS, _NR)
    if arch == "x86_64":  # the x32 ABI would reach the same calls under other numbers
        op(_JSET_K, 0x40000000, 0, 1)
        op(_RET_K, _RET_EPERM)
    for nums in _DENIED.values():
        if nums[a] is not None:
            op(_JEQ_K, nums[a], 0, 1)
            op(_RET_K, _RET_EPERM)

    def only_if_arg(nr: int, index: int, value: int, *, also_zero: bool = False):
        """nr is allowed when the low word of args[index] is value (or 0); refused otherwise."""
        body: list[tuple] = [(_LD_W_ABS, _arg(index), 0, 0)]
        checks = [value] + ([0] if also_zero else [])
        for n, v in enumerate(checks):
            body.append((_JEQ_K, v, len(checks) - n, 0))
        body += [(_RET_K, _RET_EPERM, 0, 0), (_RET_K, _RET_ALLOW, 0, 0)]
        op(_LD_W_ABS, _NR)
        op(_JEQ_K, nr, 0, len(body))
        for code, k, jt, jf in body:
            op(code, k, jt, jf)

    # Sockets: AF_UNIX only (the event loop's self-pipe); sendto only without an address.
    only_if_arg(_SOCKET[a], 0, AF_UNIX)
    only_if_arg(_SOCKETPAIR[a], 0, AF_UNIX)
    op(_LD_W_ABS, _NR)
    op(_JEQ_K, _SENDTO[a], 0, 6)
    op(_LD_W_ABS, _arg(4))
    op(_JEQ_K, 0, 0, 3)
    op(_LD_W_ABS, _arg(4, True))
    op(_JEQ_K, 0, 0, 1)
    op(_RET_K, _RET_ALLOW)
    op(_RET_K, _RET_EPERM)
    # Signals only to the worker itself (0: its own process group, which is the worker alone).
    only_if_arg(_KILL[a], 0, pid, also_zero=True)
    only_if_arg(_TGKILL[a], 0, pid)
    only_if_arg(_RT_SIGQUEUEINFO[a], 0, pid)
    only_if_arg(_RT_TGSIGQUEUEINFO[a], 0, pid)
    # Threads yes, processes and namespaces no. clone3 hides its flags in memory the filter
    # cannot read: ENOSYS makes the C library fall back to clone().
    op(_LD_W_ABS, _NR)
    op(_JEQ_K, _CLONE3[a], 0, 1)
    op(_RET_K, _RET_ENOSYS)
    op(_JEQ_K, _CLONE[a], 0, 5)
    op(_LD_W_ABS, _arg(0))
    op(_JSET_K, CLONE_NEW_ANY & 0xFFFFFFFF, 2, 0)
    op(_JSET_K, CLONE_THREAD, 0, 1)
    op(_RET_K, _RET_ALLOW)
    op(_RET_K, _RET_EPERM)
    op(_RET_K, _RET_ALLOW)
    for code, jt, jf, k in prog:
        if jt > 255 or jf > 255:
            raise AssertionError("seccomp program jump out of range")
    return b"".join(struct.pack("HBBI", code, jt, jf, k) for code, jt, jf, k in prog)


def apply_seccomp(pid: int) -> bool:
    """Install the filter on every thread of the process (TSYNC)."""
    program = seccomp_filter(pid)
    if program is None:
        return False
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HxxxxxxQ", len(program) // 8, ctypes.addressof(buf))
    nr = {"x86_64": 317, "aarch64": 277}[platform.machine()]
    # SECCOMP_SET_MODE_FILTER with SECCOMP_FILTER_FLAG_TSYNC
    return _libc.syscall(ctypes.c_long(nr), ctypes.c_uint(1), ctypes.c_uint(1), ctypes.c_char_p(fprog)) == 0


def single_threaded() -> bool:
    """Landlock and unshare(CLONE_NEWUSER) bind the calling thread only (or refuse)."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return threading.active_count() == 1


# The layers without which generated code is not confined against deliberate escape: files
# (Landlock) and system calls (seccomp: exec, ptrace, sockets, signals).
REQUIRED = {"landlock": "Landlock (filesystem rules; Linux 5.13+ with landlock among the LSMs)",
            "seccomp": "a seccomp-bpf filter (Linux with CONFIG_SECCOMP_FILTER)"}


def missing_layers(protections: dict) -> list[str]:
    """Human descriptions of the required kernel layers a worker reported as not in force."""
    return [desc for key, desc in REQUIRED.items() if not protections.get(key)]


def describe(protections: dict) -> str:
    """One line for people: the layers in force, strongest first."""
    parts = []
    if protections.get("user_namespace"):
        parts.append("user namespace")
    if protections.get("network_namespace"):
        parts.append("network namespace (no network)")
    if protections.get("landlock"):
        extra = [x for k, x in (("landlock_network", "no TCP"), ("landlock_scoped_signals", "scoped signals"))
                 if protections.get(k)]
        parts.append(f"Landlock ABI {protections['landlock']}" + (f" ({', '.join(extra)})" if extra else ""))
    if protections.get("seccomp"):
        parts.append("seccomp filter")
    if protections.get("separate_uid"):
        parts.append("separate uid")
    for key, name in (("rlimits", "rlimits"), ("audit_hook", "audit hook")):
        if protections.get(key):
            parts.append(name)
    missing = missing_layers(protections)
    line = ", ".join(parts) or "none"
    return line + (f"; WEAK, missing: {'; '.join(missing)}" if missing else "")
