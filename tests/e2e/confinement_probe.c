/* The probe of tests/e2e/test_confinement.py, built there with gcc -static and put into a
 * test image (plain and setuid-root). It tries one operation and prints what the kernel
 * answered ("<op> ok" or "<op> errno=<n>"), or prints its user ids. Busybox has no keyctl
 * applet, and its sh runs applets without exec, so the checks need a program of their own.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define KEYCTL_GET_KEYRING_ID 0
#define KEY_SPEC_SESSION_KEYRING -3

static int report(const char *op, long rc) {
    if (rc < 0) {
        printf("%s errno=%d\n", op, errno);
        return 1;
    }
    printf("%s ok\n", op);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2)
        return 2;
    const char *op = argv[1];
    if (strcmp(op, "ids") == 0) {
        printf("uid=%d euid=%d\n", (int)getuid(), (int)geteuid());
        return 0;
    }
    if (strcmp(op, "keyctl") == 0)
        return report(op, syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0));
    if (strcmp(op, "unshare") == 0)
        return report(op, unshare(CLONE_NEWUSER));
    if (strcmp(op, "mount") == 0)
        return report(op, mount("none", "/tmp", "tmpfs", 0, NULL));
    if (strcmp(op, "mkdir") == 0 && argc > 2)
        return report(op, mkdir(argv[2], 0755));
    return 2;
}
