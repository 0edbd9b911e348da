/* spawn-ceiling: a bound for any process-per-connection server. Back to back, with no
 * accept(): socketpair, spawn CHILD with the socket on fds 0 and 1, write a line, read it
 * back, close, reap. Pin it like the servers (taskset -c 1).
 *
 * usage: spawn-ceiling [-m fork|spawn] [-n COUNT] [-t SECONDS] [-p WORKERS] [-l LABEL] CHILD
 *   -m fork   fork() + execve() in the child (default; what a classic inetd does)
 *   -m spawn  posix_spawn() (glibc uses clone(CLONE_VM|CLONE_VFORK); what Rust's Command uses)
 *   -p N      N worker processes, each doing the sequential loop (default 1)
 * Prints one JSON line: spawns, errors, seconds, spawns_per_s, latency p50/p99/max. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static const char *child;
static int use_spawn;

/* One spawn cycle; returns 0 on success. */
static int once(const char *line, size_t len) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) return -1;
    pid_t pid;
    char *argv[] = {(char *)child, NULL};
    if (use_spawn) {
        posix_spawn_file_actions_t fa;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_adddup2(&fa, sv[1], 0);
        posix_spawn_file_actions_adddup2(&fa, sv[1], 1);
        int rc = posix_spawn(&pid, child, &fa, NULL, argv, environ);
        posix_spawn_file_actions_destroy(&fa);
        if (rc != 0) { close(sv[0]); close(sv[1]); return -1; }
    } else {
        pid = fork();
        if (pid < 0) { close(sv[0]); close(sv[1]); return -1; }
        if (pid == 0) {
            dup2(sv[1], 0);
            dup2(sv[1], 1);
            execve(child, argv, environ);
            _exit(127);
        }
    }
    close(sv[1]);
    int ok = -1;
    if (write(sv[0], line, len) == (ssize_t)len) {
        char buf[256];
        size_t got = 0;
        while (got < len) {
            ssize_t n = read(sv[0], buf + got, sizeof buf - got);
            if (n <= 0) { if (n < 0 && errno == EINTR) continue; break; }
            got += (size_t)n;
        }
        if (got == len && memcmp(buf, line, len) == 0) ok = 0;
    }
    close(sv[0]);
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
    return ok;
}

int main(int argc, char **argv) {
    long count = 2000;
    double secs = 10;
    int workers = 1;
    const char *label = "";
    int o;
    while ((o = getopt(argc, argv, "m:n:t:p:l:")) != -1) {
        switch (o) {
        case 'm': use_spawn = strcmp(optarg, "spawn") == 0; break;
        case 'n': count = atol(optarg); break;
        case 't': secs = atof(optarg); break;
        case 'p': workers = atoi(optarg); break;
        case 'l': label = optarg; break;
        default: fprintf(stderr, "usage: %s [-m fork|spawn] [-n N] [-t S] [-p W] [-l LABEL] CHILD\n", argv[0]); return 2;
        }
    }
    if (optind >= argc || count < 1 || workers < 1 || workers > 256) {
        fprintf(stderr, "usage: %s [-m fork|spawn] [-n N] [-t S] [-p W] [-l LABEL] CHILD\n", argv[0]);
        return 2;
    }
    child = argv[optind];
    signal(SIGPIPE, SIG_IGN);
    static const char line[] = "abcdefghijklmnopqrstuvwxyzabcde\n"; /* 32 bytes */
    size_t len = sizeof line - 1;
    long per = count / workers;
    if (per < 1) per = 1;
    int pfd[2];
    if (pipe(pfd) < 0) return 1;
    double t0 = now();
    for (int w = 0; w < workers; w++) {
        pid_t p = workers == 1 ? 0 : fork();
        if (p < 0) return 1;
        if (p > 0) continue;
        double *lat = malloc(sizeof(double) * (size_t)per);
        long ok = 0, err = 0;
        double start = now();
        for (long i = 0; i < per && now() - start < secs; i++) {
            double a = now();
            if (once(line, len) == 0) lat[ok++] = now() - a;
            else err++;
        }
        qsort(lat, (size_t)ok, sizeof(double), cmp);
        double r[5] = {(double)ok, (double)err, ok ? lat[(ok - 1) / 2] : 0,
                       ok ? lat[(long)((ok - 1) * 0.99)] : 0, ok ? lat[ok - 1] : 0};
        if (write(pfd[1], r, sizeof r) != sizeof r) _exit(1);
        if (workers == 1) break;
        _exit(0);
    }
    double ok = 0, err = 0, p50 = 0, p99 = 0, mx = 0;
    for (int w = 0; w < workers; w++) {
        double r[5];
        if (read(pfd[0], r, sizeof r) != sizeof r) break;
        ok += r[0]; err += r[1];
        if (r[2] > p50) p50 = r[2];
        if (r[3] > p99) p99 = r[3];
        if (r[4] > mx) mx = r[4];
    }
    if (workers > 1) while (wait(NULL) > 0) {}
    double wall = now() - t0;
    printf("{\"mode\":\"spawn-ceiling\",\"label\":\"%s\",\"method\":\"%s\",\"workers\":%d,\"spawns\":%.0f,"
           "\"errors\":%.0f,\"wall_s\":%.4f,\"spawns_per_s\":%.1f,\"lat_ms\":{\"p50\":%.3f,\"p99\":%.3f,\"max\":%.3f}}\n",
           label, use_spawn ? "posix_spawn" : "fork+exec", workers, ok, err, wall, wall > 0 ? ok / wall : 0,
           p50 * 1e3, p99 * 1e3, mx * 1e3);
    return 0;
}
