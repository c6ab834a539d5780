# moorage's default AppArmor profile for containers (RuntimeDefault). moorage loads it with
# apparmor_parser, under the name of the runtime.apparmor_profile setting, when AppArmor is
# enabled and no profile of that name is loaded. @NAME@ is replaced by that name.
#
# The rules follow the default profile that Docker, Podman and CRI-O ship: everything a
# container does normally is allowed; what would reach the host through the kernel's
# global files is denied.

#include <tunables/global>

profile @NAME@ flags=(attach_disconnected,mediate_deleted) {
  #include <abstractions/base>

  # Networking, files and capabilities are governed by namespaces, the rootfs and the
  # capability sets of the container; AppArmor does not narrow them further.
  network,
  capability,
  file,
  umount,

  # Signals: the host (unconfined) may signal container processes, and processes under
  # this profile may signal each other; nothing else.
  signal (receive) peer=unconfined,
  signal (send,receive) peer=@NAME@,

  # ptrace only among processes of this profile (ps inside the container reads them).
  ptrace (trace,read,tracedby,readby) peer=@NAME@,

  # No mounts, whatever the capabilities.
  deny mount,

  # /proc: no writes to files directly in /proc, nor below /proc/<entry> unless it is a
  # process directory (/proc/<pid>/...) or /proc/sys; in /proc/sys only kernel/shm* may
  # be written (the IPC namespace's limits).
  deny @{PROC}/* w,
  deny @{PROC}/{[^1-9],[^1-9][^0-9],[^1-9s][^0-9y][^0-9s],[^1-9][^0-9][^0-9][^0-9/]*}/** w,
  deny @{PROC}/sys/[^k]** w,
  deny @{PROC}/sys/kernel/{?,??,[^s][^h][^m]**} w,
  deny @{PROC}/sysrq-trigger rwklx,
  deny @{PROC}/kcore rwklx,

  # /sys: nothing written, locked, linked or executed outside /sys/fs/cgroup; firmware
  # and the security filesystems not even read.
  deny /sys/[^f]*/** wklx,
  deny /sys/f[^s]*/** wklx,
  deny /sys/fs/[^c]*/** wklx,
  deny /sys/fs/c[^g]*/** wklx,
  deny /sys/fs/cg[^r]*/** wklx,
  deny /sys/firmware/** rwklx,
  deny /sys/kernel/security/** rwklx,
}
