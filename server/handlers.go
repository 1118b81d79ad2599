package server

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/batonhq/baton/coord"
)

// routes builds the node's HTTP API: PowerJob's worker-facing endpoints,
// the server-to-server ping, diagnostics, and the admin routes when an
// admin token is configured.
func (n *Node) routes() http.Handler {
	mux := http.NewServeMux()
	route(mux, "/server/assert", n.needsRunning(n.handleAssert), http.MethodGet)
	route(mux, "/server/assertV2", n.needsRunning(n.handleAssertV2), http.MethodGet)
	route(mux, "/server/acquire", n.needsRunning(n.handleAcquire), http.MethodGet)
	route(mux, "/friend/ping", n.needsRunning(n.handlePing), http.MethodGet, http.MethodPost)
	route(mux, "/server/hello", n.needsRunning(n.handleHello), http.MethodGet)
	route(mux, "/server/checkConnectivity", n.handleCheckConnectivity, http.MethodGet)
	if n.cfg.AdminToken != "" {
		n.adminRoutes(mux)
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeResult(w, http.StatusNotFound, Result{Message: "no such endpoint: " + truncate(r.URL.Path)})
	})
	return n.measured(recoverPanics(n, mux))
}

// route mounts h at the exact path for the given methods; other methods
// get 405 in the usual envelope (ServeMux's own answer is plain text).
func route(mux *http.ServeMux, path string, h http.HandlerFunc, methods ...string) {
	allow := strings.Join(methods, ", ")
	mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
		if !slices.Contains(methods, r.Method) {
			w.Header().Set("Allow", allow)
			writeResult(w, http.StatusMethodNotAllowed, Result{Message: r.Method + " not allowed; use " + allow})
			return
		}
		h(w, r)
	})
}

// recoverPanics turns a handler panic into a 500 with the usual envelope
// rather than a dropped connection; it is logged as a bug.
func recoverPanics(n *Node, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v)
				}
				n.logger.Error("handler panicked", "path", r.URL.Path, "panic", v)
				writeResult(w, http.StatusInternalServerError, Result{Message: "internal error"})
			}
		}()
		next.ServeHTTP(w, r)
	})
}

// needsRunning answers 503 until Start has succeeded.
func (n *Node) needsRunning(h func(http.ResponseWriter, *http.Request, *running)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		run := n.run.Load()
		if run == nil {
			writeResult(w, http.StatusServiceUnavailable, Result{Message: "server not started"})
			return
		}
		h(w, r, run)
	}
}

// handleAssert answers PowerJob's ResultDTO<Long>: data is the app id.
func (n *Node) handleAssert(w http.ResponseWriter, r *http.Request, _ *running) {
	if app, found := n.lookupApp(w, r); found {
		ok(w, app.ID)
	}
}

// appInfo is PowerJob's WorkerAppInfo as /server/assertV2 returns it.
type appInfo struct {
	AppID   int64  `json:"appId"`
	AppName string `json:"appName"`
}

func (n *Node) handleAssertV2(w http.ResponseWriter, r *http.Request, _ *running) {
	if app, found := n.lookupApp(w, r); found {
		ok(w, appInfo{AppID: app.ID, AppName: app.Name})
	}
}

// lookupApp answers the app named by ?appName=, writing the error answer
// itself when there is none.
func (n *Node) lookupApp(w http.ResponseWriter, r *http.Request) (coord.AppRecord, bool) {
	name, err := appNameParam(r.URL.Query())
	if err != nil {
		badRequest(w, err.Error())
		return coord.AppRecord{}, false
	}
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	app, err := n.registry.ByName(ctx, name)
	switch {
	case errors.Is(err, coord.ErrUnknownApp):
		failed(w, fmt.Sprintf("app(%s) is not registered! Please register the app first.", name))
		return coord.AppRecord{}, false
	case err != nil:
		n.logger.Warn("app lookup failed", "app_name", name, "error", err)
		failed(w, "app lookup failed: "+err.Error())
		return coord.AppRecord{}, false
	}
	return app, true
}

func (n *Node) handleAcquire(w http.ResponseWriter, r *http.Request, run *running) {
	q := r.URL.Query()
	app, err := appIDParam(q)
	if err != nil {
		badRequest(w, err.Error())
		return
	}
	protocol, err := protocolParam(q)
	if err != nil {
		badRequest(w, err.Error())
		return
	}
	current, err := hostPortParam(q, "currentServer")
	if err != nil {
		badRequest(w, err.Error())
		return
	}
	// An election can take a few round trips and, at worst, lock waits;
	// keep it inside the listener's write timeout.
	ctx, cancel := context.WithTimeout(r.Context(), n.cfg.HTTPTimeouts.Write*2/3)
	defer cancel()
	addr, err := run.elector.Elect(ctx, app, protocol, current)
	if err != nil {
		failed(w, err.Error())
		return
	}
	ok(w, addr)
}

// handlePing answers the server-to-server ping. A node that is draining,
// closed or killed answers 503: it will not act for any app, and a peer
// that took its answer as "alive" would send workers to it.
func (n *Node) handlePing(w http.ResponseWriter, _ *http.Request, run *running) {
	if n.stopping.Load() {
		writeResult(w, http.StatusServiceUnavailable, Result{Message: "server is draining or stopped"})
		return
	}
	ok(w, run.protocols)
}

// hello is /server/hello's diagnostics.
type hello struct {
	ServerID     string          `json:"serverId"`
	Version      string          `json:"version"`
	Protocols    coord.Protocols `json:"protocols"`
	Owned        []ownedApp      `json:"owned"`
	Lease        leaseState      `json:"lease"`
	Healthy      bool            `json:"healthy"`
	Health       string          `json:"health,omitempty"`
	ServerTime   string          `json:"serverTime"`
	ServerTimeTs int64           `json:"serverTimeTs"`
}

type ownedApp struct {
	AppID int64     `json:"appId"`
	Token int64     `json:"token"`
	Since time.Time `json:"since"`
}

type leaseState struct {
	ID             string    `json:"id"`
	TTLMillis      int64     `json:"ttlMillis"`
	Confirmed      bool      `json:"confirmed"`
	ConfirmedUntil time.Time `json:"confirmedUntil"`
}

func (n *Node) handleHello(w http.ResponseWriter, _ *http.Request, run *running) {
	ep := run.session.Epoch()
	now := time.Now()
	h := hello{
		ServerID:  n.cfg.ServerID,
		Version:   Version,
		Protocols: run.protocols,
		Owned:     []ownedApp{},
		Lease: leaseState{
			ID:             strconv.FormatInt(int64(run.session.Lease()), 16),
			TTLMillis:      run.session.TTL().Milliseconds(),
			Confirmed:      ep.Check() == nil,
			ConfirmedUntil: ep.Deadline().UTC(),
		},
		Healthy:      true,
		ServerTime:   now.UTC().Format(time.RFC3339Nano),
		ServerTimeTs: now.UnixMilli(),
	}
	for _, o := range run.elector.Owned() {
		h.Owned = append(h.Owned, ownedApp{AppID: o.App, Token: o.Token, Since: o.Since.UTC()})
	}
	if err := run.elector.Healthy(); err != nil {
		h.Healthy, h.Health = false, err.Error()
	}
	ok(w, h)
}

// handleCheckConnectivity tells a worker whether this server can open a
// TCP connection back to it. It dials only the requester's own IP, so the
// server cannot be used to probe anything else; behind a reverse proxy the
// requester is the proxy, and other targets are refused.
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
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	caller, perr := netip.ParseAddr(host)
	if err != nil || perr != nil || caller.Unmap() != target.Unmap() {
		failed(w, "checkConnectivity only dials the caller's own address")
		return
	}
	d := net.Dialer{Timeout: time.Second}
	conn, err := d.DialContext(r.Context(), "tcp", net.JoinHostPort(target.String(), strconv.Itoa(port)))
	if err != nil {
		ok(w, false)
		return
	}
	conn.Close()
	ok(w, true)
}
