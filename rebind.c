/*
 * rebind.so - move one listening port of a program to loopback (wrap mode).
 *
 * The proxy starts the wrapped program with this library in LD_PRELOAD and
 *
 *     REBIND_OLD_PORT=P   the port the program believes it listens on
 *     REBIND_NEW_PORT=Q   the loopback port it really gets
 *
 * so that the proxy can own P and relay to Q. Both values must be plain
 * decimal numbers from 1 to 65535 (digits only, nothing else). They are read
 * once, when the library is loaded (or at the first bind(), should another
 * library's constructor bind earlier); later changes to the environment have
 * no effect. If either is missing or invalid, nothing is changed at all.
 *
 * bind() of a stream or datagram socket (TCP, UDP) to port P is replaced by:
 *
 *     AF_INET,  any address (0.0.0.0 or specific)        -> 127.0.0.1:Q
 *     AF_INET6, any address (::, specific, v4-mapped)    -> [::1]:Q
 *
 * Every other bind() (other ports, other families such as AF_UNIX, raw
 * sockets) reaches libc untouched. The caller's sockaddr is never written;
 * the return value and errno are those of libc's bind().
 *
 * A dual-stack socket (IPV6_V6ONLY=0) bound to :: therefore ends up on ::1
 * only, and is reachable over IPv6 alone: connect to [::1]:Q, not
 * 127.0.0.1:Q. A program binding 0.0.0.0 and :: (v6-only) gets both.
 *
 * Only calls that go through the dynamic linker are seen: statically linked
 * programs and those issuing raw system calls (Go) are not moved. Children
 * inherit the environment, so their binds of P are moved too.
 *
 *     REBIND_PARENT_PID=N  the proxy's pid (Linux only; optional)
 *
 * makes the program the proxy started, the process whose parent is N, get
 * SIGTERM should the proxy die without stopping it (SIGKILL, a crash), so it
 * does not live on with nobody relaying to it. A program that
 * exec()s keeps this; the processes it starts, and every process when the
 * variable is missing or invalid, are left alone.
 *
 * Build: cc -O2 -Wall -Wextra -Werror -fPIC -shared -o rebind.so rebind.c -ldl
 */

#define _GNU_SOURCE /* RTLD_NEXT */

#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#ifdef __linux__
#include <signal.h>
#include <sys/prctl.h>
#endif

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

/*
 * Filled in by the constructor, or by the first bind() if another library's
 * constructor binds before ours runs. Racing threads compute and store the
 * same values, so the lazy path needs no lock; atomics keep the race defined.
 * next_bind is stored last (release), so a thread that sees it sees ports.
 */
static _Atomic(bind_fn) next_bind;
static _Atomic uint_least32_t ports; /* old << 16 | new, host order; 0: off */

/* The kernel's minimum for AF_INET6: the RFC 2133 struct had no scope id. */
#define SIN6_MIN_LEN ((socklen_t)offsetof(struct sockaddr_in6, sin6_scope_id))

union inet_addr {
	struct sockaddr sa;
	struct sockaddr_in v4;
	struct sockaddr_in6 v6;
};

/* "1".."max" -> the number; anything else (sign, space, junk, 0) -> 0. */
static uint_least32_t parse_number(const char *text, uint_least32_t max)
{
	uint_least32_t number = 0;

	if (!text || !*text)
		return 0;
	for (; *text; text++) {
		if (*text < '0' || *text > '9')
			return 0;
		number = number * 10 + (uint_least32_t)(*text - '0');
		if (number > max) /* also stops overflow on long inputs */
			return 0;
	}
	return number;
}

static uint_least32_t parse_port(const char *text)
{
	return parse_number(text, 65535);
}

static bind_fn setup(void)
{
	uint_least32_t old_port = parse_port(getenv("REBIND_OLD_PORT"));
	uint_least32_t new_port = parse_port(getenv("REBIND_NEW_PORT"));
	bind_fn fn;

	atomic_store_explicit(&ports, old_port && new_port ? old_port << 16 | new_port : 0,
			      memory_order_relaxed);
	fn = (bind_fn)dlsym(RTLD_NEXT, "bind");
	atomic_store_explicit(&next_bind, fn, memory_order_release);
	return fn;
}

/* REBIND_PARENT_PID: the program started by that process dies with it. */
static void die_with_parent(void)
{
#ifdef __linux__
	/* Linux's pid_max is at most 2^22. */
	pid_t parent = (pid_t)parse_number(getenv("REBIND_PARENT_PID"), 1u << 22);

	if (!parent || getppid() != parent)
		return;
	if (prctl(PR_SET_PDEATHSIG, SIGTERM) != 0)
		return;
	/* The parent may have died before prctl(): then the program was adopted. */
	if (getppid() != parent)
		raise(SIGTERM);
#endif
}

/* Resolve before main() so that threads normally only ever read. */
__attribute__((constructor)) static void rebind_init(void)
{
	int saved_errno = errno;

	setup();
	die_with_parent();
	errno = saved_errno;
}

/*
 * Ports only mean something for TCP and UDP; a raw socket moved to loopback
 * would silently stop seeing its traffic.
 */
static int carries_port(int fd)
{
	int type = 0;
	socklen_t len = sizeof(type);

	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0)
		return 0; /* not a socket: libc's bind() will say so */
	return type == SOCK_STREAM || type == SOCK_DGRAM;
}

/*
 * If this bind() is to be moved, build the new address in *out and return
 * its length; otherwise return 0. Lengths the kernel would reject are left
 * for the kernel to reject.
 */
static socklen_t moved_address(int fd, const struct sockaddr *addr, socklen_t len,
			       union inet_addr *out)
{
	uint_least32_t both = atomic_load_explicit(&ports, memory_order_relaxed);
	uint16_t old_port = htons((uint16_t)(both >> 16));
	uint16_t new_port = htons((uint16_t)(both & 0xffff));
	union inet_addr in;

	if (!both || !addr || len < (socklen_t)sizeof(sa_family_t))
		return 0;
	/* Copy what the caller gave: no alignment or aliasing assumptions. */
	memset(&in, 0, sizeof(in));
	memcpy(&in, addr, len < sizeof(in) ? len : sizeof(in));
	memset(out, 0, sizeof(*out));

	if (in.sa.sa_family == AF_INET) {
		if (len < (socklen_t)sizeof(in.v4) || in.v4.sin_port != old_port ||
		    !carries_port(fd))
			return 0;
		out->v4.sin_family = AF_INET;
		out->v4.sin_port = new_port;
		out->v4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		return sizeof(out->v4);
	}
	if (in.sa.sa_family == AF_INET6) {
		if (len < SIN6_MIN_LEN || in.v6.sin6_port != old_port || !carries_port(fd))
			return 0;
		/* ::1 binds on v6-only and dual-stack sockets alike. */
		out->v6.sin6_family = AF_INET6;
		out->v6.sin6_port = new_port;
		out->v6.sin6_addr = in6addr_loopback;
		return sizeof(out->v6);
	}
	return 0;
}

int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
	int saved_errno = errno;
	bind_fn real = atomic_load_explicit(&next_bind, memory_order_acquire);
	union inet_addr moved;
	socklen_t moved_len;

	if (!real && !(real = setup())) {
		errno = ENOSYS; /* no bind() below us: nothing sane to call */
		return -1;
	}
	moved_len = moved_address(fd, addr, len, &moved);
	/* Our own calls may have set errno; the caller sees only libc's. */
	errno = saved_errno;
	if (moved_len)
		return real(fd, &moved.sa, moved_len);
	return real(fd, addr, len);
}
