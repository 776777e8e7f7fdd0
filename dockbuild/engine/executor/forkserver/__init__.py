"""The fork server: the single-threaded process that makes and starts every container.

dockbuild's main process runs solver threads, and forking Python code out of a
multi-threaded process is unsafe (locks held by other threads stay locked in the child,
and ``unshare(CLONE_NEWUSER)`` fails with EINVAL). So :mod:`.namespace` starts this package
once per build as a script (``python -I -S forkserver/__main__.py FD SANDBOX``). It
imports nothing from dockbuild and few standard modules (every page it holds makes each
fork dearer), so it starts fast and stays single-threaded. The runc executor imports
the same modules for what both executors share (the /etc files, USER lookups, the
default capabilities and masked paths).

Modules: ``syscalls`` (libc calls and their constants), ``mounts`` (a container's mount
tree), ``users`` (USER lookups), ``container`` (becoming the container, from namespaces
to execve), ``server`` (the select loop, spare PID 1s, the probe).

Per run, the main process sends one SOCK_SEQPACKET message on the control socket: a JSON
spec plus three descriptors (the stdout and stderr pipe write ends, and a per-run status
socket), and memfds for secrets. The server passes it on to a spare PID 1: a child it
forked in advance (into a new PID namespace: unshare, fork, then setns back to its own),
which has already made the parts of a container that need no request (its namespaces,
the scratch tmpfs, /proc, /dev and /sys) and waits on a socket of its own. The server
then forks the next spare while this run goes on, and goes back to its select loop,
which also reaps exited PID 1s::

    fork server ── spare PID 1 (unshare NS|IPC|UTS, scratch tmpfs, /proc, /dev, /sys;
                   wait for a request; [unshare NET,] overlay and RUN mounts, pivot_root,
                   drop to USER, execve the RUN command)

Messages on the status socket, one JSON object each: ``{"pid": N}`` with a pidfd for
PID 1 (so the main process can kill it), ``{"error": "..."}`` when setup failed, and
finally ``{"exit": N}`` (128+N for signal N), sent after the mount stubs are cleaned.

Its first message on the control socket says it is ready and, for the namespace
sandbox, whether namespaces work here (``probe``): the executor choice reads it, and a
server whose answer is yes is the one the build then uses (``choice.py``).
"""
