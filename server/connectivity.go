package server

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Connectivity checks (/server/checkConnectivity, PowerJob 4.3.9 on): at
// start a worker asks, for each of its addresses, whether the server can
// reach it there, and binds to the first that works. The server opens a
// TCP connection and expects the line "pong" from the worker's
// PingPongSocketServer within 2 s, as PowerJob's server does: a
// port that accepts but does not answer "pong" is not reachable, so the
// check tells nothing about other services' open ports.
const (
	connectivityDialTimeout = time.Second
	connectivityIOTimeout   = 2 * time.Second
	// connectivityRate bounds the checks a node makes in any one second,
	// whatever the callers: past it a check answers success:false and
	// dials nothing.
	connectivityRate = 20
)

// handleCheckConnectivity dials the offered target only if it is the
// requester's own IP, unless Config.CheckOfferedAddresses allows any (see
// there for what that exposes).
func (n *Node) handleCheckConnectivity(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	ipStr, err := single(q, "targetIp")
	if err != nil {
		badRequest(w, err.Error())
		return
	}
	portStr, err := single(q, "targetPort")
	if err != nil {
		badRequest(w, err.Error())
		return
	}
	target, err := netip.ParseAddr(ipStr)
	if err != nil {
		badRequest(w, fmt.Sprintf("targetIp %q is not an IP address", truncate(ipStr)))
		return
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 1 || port > 65535 {
		badRequest(w, fmt.Sprintf("targetPort %q is not a port", truncate(portStr)))
		return
	}
	if !n.cfg.CheckOfferedAddresses {
		host, _, err := net.SplitHostPort(r.RemoteAddr)
		caller, perr := netip.ParseAddr(host)
		if err != nil || perr != nil || caller.Unmap() != target.Unmap() {
			failed(w, "checkConnectivity only dials the caller's own address")
			return
		}
	}
	if !n.checks.allow(time.Now()) {
		failed(w, "too many connectivity checks; try again later")
		return
	}
	ok(w, pingPong(r.Context(), netip.AddrPortFrom(target.Unmap(), uint16(port)).String()))
}

// pingPong reports whether a PowerJob PingPongSocketServer answers at addr.
func pingPong(ctx context.Context, addr string) bool {
	d := net.Dialer{Timeout: connectivityDialTimeout}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return false
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(connectivityIOTimeout))
	// PowerJob's worker writes "pong" on accepting, without reading
	// anything, then a line separator (some releases: none) and closes.
	// PowerJob's server writes "ping" first; here the answer is read
	// first, and "ping" sent only after it: a "ping" that reached the
	// closed socket first would make the worker's host reset the
	// connection, and the reset can discard the "pong" not yet read.
	line, _ := bufio.NewReaderSize(io.LimitReader(conn, 64), 64).ReadString('\n')
	conn.Write([]byte("ping"))
	return strings.EqualFold(strings.TrimRight(line, "\r\n"), "pong")
}

// rateLimit allows at most n events in any window of one second: it
// remembers the last n it allowed.
type rateLimit struct {
	mu   sync.Mutex
	last []time.Time // ring of the last n allowed events
	next int
}

func newRateLimit(n int) *rateLimit { return &rateLimit{last: make([]time.Time, n)} }

func (l *rateLimit) allow(now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	oldest := l.last[l.next]
	if !oldest.IsZero() && now.Sub(oldest) < time.Second {
		return false
	}
	l.last[l.next] = now
	l.next = (l.next + 1) % len(l.last)
	return true
}
