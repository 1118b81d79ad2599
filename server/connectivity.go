package server

import (
	"bufio"
	"context"
	"fmt"
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
// TCP connection, writes "ping" and expects the line "pong" from the
// worker's PingPongSocketServer within 2 s, as PowerJob's server does: a
// port that accepts but does not answer "pong" is not reachable, so the
// check tells nothing about other services' open ports.
const (
	connectivityDialTimeout = time.Second
	connectivityIOTimeout   = 2 * time.Second
	// connectivityRate bounds the checks a node makes per second (with a
	// burst of as many), whatever the callers: past it a check answers
	// success:false and dials nothing.
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
	if _, err := conn.Write([]byte("ping")); err != nil {
		return false
	}
	line, err := bufio.NewReaderSize(conn, 64).ReadString('\n')
	if err != nil {
		return false
	}
	return strings.EqualFold(strings.TrimRight(line, "\r\n"), "pong")
}

// rateLimit is a token bucket: rate tokens a second, at most rate held.
type rateLimit struct {
	mu     sync.Mutex
	rate   float64
	tokens float64
	last   time.Time
}

func newRateLimit(rate float64) *rateLimit { return &rateLimit{rate: rate, tokens: rate} }

func (l *rateLimit) allow(now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.last.IsZero() {
		l.tokens = min(l.rate, l.tokens+now.Sub(l.last).Seconds()*l.rate)
	}
	l.last = now
	if l.tokens < 1 {
		return false
	}
	l.tokens--
	return true
}
