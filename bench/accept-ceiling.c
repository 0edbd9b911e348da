/* accept-ceiling: the honest bound for a process-per-connection server. It does only what any
 * nowait superserver must do per connection and nothing else: accept4() on a non-blocking
 * listener polled with epoll, start CHILD with the connection on fds 0 and 1 and the same
 * small environment the superserver's nowait children get, close its copy of the connection,
 * and reap on SIGCHLD (signalfd + waitpid(WNOHANG) until nothing is left). No limits, no
 * access rules, no logging, no counters. Pin it like the servers (taskset -c 1).
 *
 * usage: accept-ceiling [-m spawn|fork] [-b BACKLOG] IP PORT CHILD
 *   -m spawn  posix_spawn() (default; glibc uses clone(CLONE_VM|CLONE_VFORK), as the
 *             superserver does)
 *   -m fork   fork() + execve() in the child (what a classic inetd does)
 *   -b N      listen backlog (default 4096, the superserver's default)
 *
 * The child's environment is what the superserver builds for a nowait TCP child with its
 * default `pass_env` (PATH, LANG, LC_ALL, TZ, RUST_LOG, when set here) and the per-connection
 * variables first: PROTO, TCPREMOTEIP, TCPREMOTEPORT, REMOTE_ADDR, REMOTE_PORT, TCPLOCALIP,
 * TCPLOCALPORT. Its signal mask is cleared (SIGCHLD is blocked here for the signalfd).
 * Runs until SIGTERM or SIGINT. IPv4 only (the bench is on 127.0.0.1). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *const PASS[] = {"PATH", "LANG", "LC_ALL", "TZ", "RUST_LOG"};
#define NPASS (sizeof PASS / sizeof PASS[0])
#define NCONN 7 /* per-connection variables */

static void die(const char *what) {
    perror(what);
    exit(111);
}

int main(int argc, char **argv) {
    int use_fork = 0, backlog = 4096, opt;
    while ((opt = getopt(argc, argv, "m:b:")) != -1) {
        switch (opt) {
        case 'm':
            if (strcmp(optarg, "fork") == 0) use_fork = 1;
            else if (strcmp(optarg, "spawn") == 0) use_fork = 0;
            else { fprintf(stderr, "accept-ceiling: -m spawn|fork\n"); return 100; }
            break;
        case 'b': backlog = atoi(optarg); break;
        default: fprintf(stderr, "usage: accept-ceiling [-m spawn|fork] [-b BACKLOG] IP PORT CHILD\n"); return 100;
        }
    }
    if (argc - optind != 3) {
        fprintf(stderr, "usage: accept-ceiling [-m spawn|fork] [-b BACKLOG] IP PORT CHILD\n");
        return 100;
    }
    const char *ip = argv[optind], *child = argv[optind + 2];
    int port = atoi(argv[optind + 1]);

    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (inet_pton(AF_INET, ip, &sa.sin_addr) != 1) { fprintf(stderr, "accept-ceiling: bad IP %s\n", ip); return 100; }
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (lfd < 0) die("socket");
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    if (listen(lfd, backlog) < 0) die("listen");

    sigset_t chld, empty;
    sigemptyset(&empty);
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigaddset(&chld, SIGTERM);
    sigaddset(&chld, SIGINT);
    if (sigprocmask(SIG_BLOCK, &chld, NULL) < 0) die("sigprocmask");
    int sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0) die("signalfd");
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) < 0) die("epoll_ctl");
    ev.data.fd = sfd;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, sfd, &ev) < 0) die("epoll_ctl");

    /* The environment: per-connection variables first (rewritten per connection into fixed
     * buffers), then the passed ones, prepared once. */
    static char proto[] = "PROTO=TCP";
    static char rip[64], rport[32], raddr[64], rrport[32], lip[64], lport[32];
    char *envp[NCONN + NPASS + 1];
    envp[0] = proto;
    envp[1] = rip;
    envp[2] = rport;
    envp[3] = raddr;
    envp[4] = rrport;
    envp[5] = lip;
    envp[6] = lport;
    size_t ne = NCONN;
    for (size_t i = 0; i < NPASS; i++) {
        const char *v = getenv(PASS[i]);
        if (!v) continue;
        size_t n = strlen(PASS[i]) + strlen(v) + 2;
        char *s = malloc(n);
        if (!s) die("malloc");
        snprintf(s, n, "%s=%s", PASS[i], v);
        envp[ne++] = s;
    }
    envp[ne] = NULL;
    snprintf(lip, sizeof lip, "TCPLOCALIP=%s", ip);
    snprintf(lport, sizeof lport, "TCPLOCALPORT=%d", port);
    char *cargv[] = {(char *)child, NULL};

    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    posix_spawnattr_setsigmask(&attr, &empty);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);

    struct epoll_event evs[8];
    for (;;) {
        int n = epoll_wait(ep, evs, 8, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int e = 0; e < n; e++) {
            if (evs[e].data.fd == sfd) {
                struct signalfd_siginfo si;
                while (read(sfd, &si, sizeof si) == (ssize_t)sizeof si) {
                    if (si.ssi_signo == SIGTERM || si.ssi_signo == SIGINT) return 0;
                }
                while (waitpid(-1, NULL, WNOHANG) > 0) {
                }
                continue;
            }
            for (;;) {
                struct sockaddr_in peer;
                socklen_t plen = sizeof peer;
                int c = accept4(lfd, (struct sockaddr *)&peer, &plen, SOCK_CLOEXEC);
                if (c < 0) {
                    if (errno == EINTR || errno == ECONNABORTED) continue;
                    break; /* EAGAIN: the queue is empty (or EMFILE: retried on the next event) */
                }
                char a[INET_ADDRSTRLEN];
                inet_ntop(AF_INET, &peer.sin_addr, a, sizeof a);
                int pp = ntohs(peer.sin_port);
                snprintf(rip, sizeof rip, "TCPREMOTEIP=%s", a);
                snprintf(rport, sizeof rport, "TCPREMOTEPORT=%d", pp);
                snprintf(raddr, sizeof raddr, "REMOTE_ADDR=%s", a);
                snprintf(rrport, sizeof rrport, "REMOTE_PORT=%d", pp);
                if (use_fork) {
                    pid_t pid = fork();
                    if (pid == 0) {
                        dup2(c, 0);
                        dup2(c, 1);
                        sigprocmask(SIG_SETMASK, &empty, NULL);
                        execve(child, cargv, envp);
                        _exit(127);
                    }
                } else {
                    posix_spawn_file_actions_t fa;
                    posix_spawn_file_actions_init(&fa);
                    posix_spawn_file_actions_adddup2(&fa, c, 0);
                    posix_spawn_file_actions_adddup2(&fa, c, 1);
                    pid_t pid;
                    posix_spawn(&pid, child, &fa, &attr, cargv, envp);
                    posix_spawn_file_actions_destroy(&fa);
                }
                close(c);
            }
        }
    }
}
