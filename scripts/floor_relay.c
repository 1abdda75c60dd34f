/* The least work a DERP relay can do per hop: the floor that bench_mesh.py measures ours against.
 *
 * One epoll thread in C. It answers the raw upgrade (101 + ServerKey), takes the client's key
 * from ClientInfo without opening the box and sends no ServerInfo (the benchmark client does not
 * wait for one), then routes SendPacket to a local RecvPacket or, for keys it does not hold, to a
 * ForwardPacket on its one mesh link; a ForwardPacket from the mesh is delivered locally, never
 * forwarded again. Output is flushed once per read, like the real relay. No queues, limits,
 * keepalives, watchers or checks: never deploy it.
 *
 *   floor_relay [MESH_PORT]   listens on a free 127.0.0.1 port and prints "READY <port>";
 *                             with MESH_PORT it dials that floor relay as its mesh peer.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

enum { HDR = 5, KEY = 32, MAXCONN = 4096, LISTENER = -1 };
enum { ST_HTTP, ST_CLIENT_INFO, ST_DERP, ST_MESH };
enum { SERVER_KEY = 0x01, CLIENT_INFO = 0x02, SEND_PACKET = 0x04, RECV_PACKET = 0x05,
       FORWARD_PACKET = 0x0a, PING = 0x12, PONG = 0x13 };

typedef struct {
    int fd, state, dirty, want_out;
    unsigned char key[KEY];
    unsigned char *in, *out;
    size_t ilen, icap, olen, ocap;
} conn_t;

static conn_t *conns[MAXCONN];
static conn_t *mesh;
static unsigned long gen = 1;   /* bumped whenever a key comes or goes: invalidates cached routes */
static int ep, dirty[MAXCONN], ndirty;
static unsigned char server_key_frame[HDR + 8 + KEY] = {
    SERVER_KEY, 0, 0, 0, 8 + KEY, 0x44, 0x45, 0x52, 0x50, 0xf0, 0x9f, 0x94, 0x91};
static const char upgrade[] =
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: 2\r\n\r\n";

static void die(const char *what) { perror(what); exit(1); }

static void reserve(unsigned char **buf, size_t *cap, size_t need) {
    if (need <= *cap) return;
    size_t c = *cap ? *cap : 65536;
    while (c < need) c *= 2;
    if (!(*buf = realloc(*buf, c))) die("realloc");
    *cap = c;
}

static void watch(conn_t *c) {
    struct epoll_event e = {.events = EPOLLIN | (c->want_out ? EPOLLOUT : 0), .data.fd = c->fd};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
}

static conn_t *add_conn(int fd, int state) {
    int one = 1;
    if (fd >= MAXCONN) { close(fd); return NULL; }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    conn_t *c = calloc(1, sizeof *c);
    c->fd = fd;
    c->state = state;
    conns[fd] = c;
    struct epoll_event e = {.events = EPOLLIN, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
    return c;
}

static void drop_conn(conn_t *c) {
    if (c == mesh) mesh = NULL;
    gen++;
    c->dirty = 0;
    conns[c->fd] = NULL;
    close(c->fd);
    free(c->in);
    free(c->out);
    free(c);
}

/* Append a frame: header, then a, b and c (any may be empty). */
static void put(conn_t *c, int type, const void *a, size_t na, const void *b, size_t nb,
                const void *d, size_t nd) {
    size_t n = na + nb + nd;
    reserve(&c->out, &c->ocap, c->olen + HDR + n);
    unsigned char *p = c->out + c->olen;
    p[0] = type; p[1] = n >> 24; p[2] = n >> 16; p[3] = n >> 8; p[4] = n;
    memcpy(p + HDR, a, na);
    memcpy(p + HDR + na, b, nb);
    memcpy(p + HDR + na + nb, d, nd);
    c->olen += HDR + n;
    if (!c->dirty) { c->dirty = 1; dirty[ndirty++] = c->fd; }
}

static void flush(conn_t *c) {
    size_t off = 0;
    while (off < c->olen) {
        ssize_t w = send(c->fd, c->out + off, c->olen - off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN) { c->olen = 0; return; }  /* the read side sees the close */
            break;
        }
        off += (size_t)w;
    }
    memmove(c->out, c->out + off, c->olen - off);
    c->olen -= off;
    int want = c->olen > 0;
    if (want != c->want_out) { c->want_out = want; watch(c); }
}

static void flush_dirty(void) {
    for (int i = 0; i < ndirty; i++) {
        conn_t *c = conns[dirty[i]];
        if (c && c->dirty) { c->dirty = 0; flush(c); }
    }
    ndirty = 0;
}

static conn_t *find(const unsigned char *key) {
    for (int fd = 0; fd < MAXCONN; fd++) {
        conn_t *c = conns[fd];
        if (c && c->state == ST_DERP && memcmp(c->key, key, KEY) == 0) return c;
    }
    return NULL;
}

/* One cached route per sender: the benchmark's pairs each talk to one peer. */
typedef struct { unsigned char key[KEY]; unsigned long gen; conn_t *to; } route_t;
static route_t routes[MAXCONN];

static conn_t *route(conn_t *from, const unsigned char *dst) {
    route_t *r = &routes[from->fd];
    if (r->gen == gen && memcmp(r->key, dst, KEY) == 0) return r->to;
    r->to = find(dst);
    r->gen = gen;
    memcpy(r->key, dst, KEY);
    return r->to;
}

static void on_frame(conn_t *c, int type, const unsigned char *p, size_t n) {
    if (c->state == ST_CLIENT_INFO) {
        if (type != CLIENT_INFO || n < KEY) { c->state = -1; return; }
        memcpy(c->key, p, KEY);
        c->state = ST_DERP;
        gen++;
    } else if (type == SEND_PACKET && n >= KEY && c->state == ST_DERP) {
        conn_t *to = route(c, p);
        if (to) put(to, RECV_PACKET, c->key, KEY, p + KEY, n - KEY, NULL, 0);
        else if (mesh) put(mesh, FORWARD_PACKET, c->key, KEY, p, KEY, p + KEY, n - KEY);
    } else if (type == FORWARD_PACKET && n >= 2 * KEY && c->state == ST_MESH) {
        conn_t *to = route(c, p + KEY);
        if (to) put(to, RECV_PACKET, p, KEY, p + 2 * KEY, n - 2 * KEY, NULL, 0);
    } else if (type == PING && n == 8) {
        put(c, PONG, p, 8, NULL, 0, NULL, 0);
    }
}

static void on_readable(conn_t *c) {
    reserve(&c->in, &c->icap, c->ilen + 262144);
    ssize_t r = recv(c->fd, c->in + c->ilen, c->icap - c->ilen, 0);
    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) { drop_conn(c); return; }
    if (r < 0) return;
    c->ilen += (size_t)r;
    size_t off = 0;
    if (c->state == ST_HTTP) {
        unsigned char *end = memmem(c->in, c->ilen, "\r\n\r\n", 4);
        if (!end) return;
        off = (size_t)(end + 4 - c->in);
        if (c->ilen >= 4 && memcmp(c->in, "MESH", 4) == 0) {
            c->state = ST_MESH;
            mesh = c;
        } else {
            c->state = ST_CLIENT_INFO;
            reserve(&c->out, &c->ocap, sizeof upgrade + sizeof server_key_frame);
            memcpy(c->out, upgrade, sizeof upgrade - 1);
            memcpy(c->out + sizeof upgrade - 1, server_key_frame, sizeof server_key_frame);
            c->olen = sizeof upgrade - 1 + sizeof server_key_frame;
            flush(c);
        }
    }
    while (c->ilen - off >= HDR) {
        const unsigned char *h = c->in + off;
        size_t n = ((size_t)h[1] << 24) | ((size_t)h[2] << 16) | ((size_t)h[3] << 8) | h[4];
        if (n > (1 << 20)) { drop_conn(c); return; }
        if (c->ilen - off < HDR + n) break;
        on_frame(c, h[0], h + HDR, n);
        if (c->state < 0) { drop_conn(c); return; }
        off += HDR + n;
    }
    memmove(c->in, c->in + off, c->ilen - off);
    c->ilen -= off;
}

int main(int argc, char **argv) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    int one = 1, ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    /* Never outlive the benchmark, even when it is killed. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) || getppid() == 1) return 1;
    if ((ep = epoll_create1(0)) < 0) die("epoll_create1");
    for (int i = 0; i < KEY; i++) server_key_frame[HDR + 8 + i] = (unsigned char)(i * 37 + 11);
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096) || getsockname(ls, (struct sockaddr *)&a, &alen))
        die("listen");
    struct epoll_event e = {.events = EPOLLIN, .data.fd = LISTENER};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &e);
    if (argc > 1) {  /* dial the mesh peer: a "MESH" preface instead of an HTTP upgrade */
        struct sockaddr_in m = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1])),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(fd, (struct sockaddr *)&m, sizeof m)) die("connect mesh peer");
        if (send(fd, "MESH\r\n\r\n", 8, 0) != 8) die("send");
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        mesh = add_conn(fd, ST_MESH);
    }
    printf("READY %d\n", ntohs(a.sin_port));
    fflush(stdout);
    struct epoll_event ev[256];
    for (;;) {
        int n = epoll_wait(ep, ev, 256, -1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            if (ev[i].data.fd == LISTENER) {
                int fd;
                while ((fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) add_conn(fd, ST_HTTP);
                continue;
            }
            conn_t *c = conns[ev[i].data.fd];
            if (c && (ev[i].events & EPOLLOUT)) flush(c);
            if (c && (ev[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) on_readable(c);
            flush_dirty();
        }
    }
}
