package server

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
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
	route(mux, "/server/assert", n.abortsUnlessRunning(n.handleAssert), http.MethodGet)
	route(mux, "/server/assertV2", n.abortsUnlessRunning(n.handleAssertV2), http.MethodGet)
	route(mux, "/server/acquire", n.abortsUnlessRunning(n.handleAcquire), http.MethodGet)
	route(mux, "/friend/ping", n.needsRunning(n.handlePing), http.MethodGet, http.MethodPost)
	route(mux, "/server/hello", n.needsRunning(n.handleHello), http.MethodGet)
	route(mux, "/server/checkConnectivity", n.handleCheckConnectivity, http.MethodGet)
	if n.cfg.AdminToken != "" {
		n.adminRoutes(mux)
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeResult(w, http.StatusNotFound, Result{Message: "no such endpoint: " + truncate(r.URL.Path)})
	})
	return n.measured(recoverPanics(n, n.bounded(mux)))
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

// abortsUnlessRunning drops the connection, without an answer, until
// Start has succeeded. A PowerJob worker takes any answer to assert that
// is not a success — a 503 included — as fatal and stops starting, but
// moves on to its next server on a connection error: for the worker
// endpoints a transient condition must look like one.
func (n *Node) abortsUnlessRunning(h func(http.ResponseWriter, *http.Request, *running)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		run := n.run.Load()
		if run == nil {
			abort()
		}
		h(w, r, run)
	}
}

// abort ends the request by closing its connection without an answer
// (see abortsUnlessRunning).
func abort() { panic(http.ErrAbortHandler) }

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

// lookupApp answers the app named by ?appName=, writing the answer itself
// when there is none. Apps already known answer without etcd. An app
// that is not registered — a name baton could never register included —
// gets PowerJob's own answer (200, success:false, so the worker reports
// it and stops). When etcd cannot tell within half the answer budget,
// the connection is dropped so that the worker asks its next server.
func (n *Node) lookupApp(w http.ResponseWriter, r *http.Request) (coord.AppRecord, bool) {
	name, err := rawAppName(r.URL.RawQuery)
	if err != nil {
		badRequest(w, err.Error())
		return coord.AppRecord{}, false
	}
	unknown := func() (coord.AppRecord, bool) {
		failed(w, fmt.Sprintf("app(%s) is not registered! Please register the app first.", truncate(name)))
		return coord.AppRecord{}, false
	}
	if coord.ValidateName(name) != nil {
		return unknown()
	}
	ctx, cancel := context.WithTimeout(r.Context(), n.cfg.HTTPTimeouts.Answer/2)
	defer cancel()
	app, err := n.apps.lookup(ctx, n.registry, name)
	switch {
	case errors.Is(err, coord.ErrUnknownApp):
		return unknown()
	case err != nil:
		n.logger.Warn("app lookup failed; dropping the request so the worker asks another server", "app_name", name, "error", err)
		abort()
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
	// An election can take a few round trips and, at worst, lock waits.
	// A PowerJob worker reads for 5 s: past the answer budget it is
	// better told "no" (and asks its next server) than left to time out.
	ctx, cancel := context.WithTimeout(r.Context(), n.cfg.HTTPTimeouts.Answer)
	defer cancel()
	elect := run.elector.Elect
	if n.cfg.Balance {
		elect = run.elector.Place
	}
	addr, err := elect(ctx, app, protocol, current)
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
	ok(w, pingAnswer{ServerID: n.cfg.ServerID, Protocols: run.protocols, Unconfirmed: run.session.Check() != nil})
}

// hello is /server/hello's diagnostics: PowerJob's fields first, then
// baton's own.
type hello struct {
	LocalHost      string         `json:"localHost"`
	ServerInfo     serverInfo     `json:"serverInfo"`
	ServerTime     string         `json:"serverTime"` // "2006-01-02 15:04:05", local time
	ServerTimeTs   int64          `json:"serverTimeTs"`
	ServerTimeZone string         `json:"serverTimeZone"`
	AppIDs         []int64        `json:"appIds"`
	DefaultAddress defaultAddress `json:"defaultAddress"`

	ServerID  string          `json:"serverId"`
	Version   string          `json:"version"`
	Control   coord.Endpoint  `json:"control"`
	Protocols coord.Protocols `json:"protocols"`
	Owned     []ownedApp      `json:"owned"`
	Lease     leaseState      `json:"lease"`
	Healthy   bool            `json:"healthy"`
	Health    string          `json:"health,omitempty"`
}

// serverInfo is PowerJob's ServerInfo; Id is baton's server id (PowerJob's
// is a number).
type serverInfo struct {
	ID       string `json:"id"`
	IP       string `json:"ip"`
	BornTime int64  `json:"bornTime"` // Unix ms, when the node started
	Version  string `json:"version"`
}

// defaultAddress is PowerJob's ProtocolInfo of the default protocol: HTTP
// when the node offers it, else the first name in order.
type defaultAddress struct {
	Protocol        string `json:"protocol"`
	Address         string `json:"address"`
	ExternalAddress string `json:"externalAddress,omitempty"`
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
	zone, _ := now.Zone()
	host, _, _ := net.SplitHostPort(run.control.Address)
	h := hello{
		LocalHost:      host,
		ServerInfo:     serverInfo{ID: n.cfg.ServerID, IP: host, BornTime: run.started.UnixMilli(), Version: Version},
		ServerTime:     now.Format(time.DateTime),
		ServerTimeTs:   now.UnixMilli(),
		ServerTimeZone: zone,
		AppIDs:         []int64{},
		DefaultAddress: defaultProtocol(run.protocols),
		ServerID:       n.cfg.ServerID,
		Version:        Version,
		Control:        run.control,
		Protocols:      run.protocols,
		Owned:          []ownedApp{},
		Lease: leaseState{
			ID:             strconv.FormatInt(int64(run.session.Lease()), 16),
			TTLMillis:      run.session.TTL().Milliseconds(),
			Confirmed:      ep.Check() == nil,
			ConfirmedUntil: ep.Deadline().UTC(),
		},
		Healthy: true,
	}
	for _, o := range run.elector.Owned() {
		h.AppIDs = append(h.AppIDs, o.App)
		h.Owned = append(h.Owned, ownedApp{AppID: o.App, Token: o.Token, Since: o.Since.UTC()})
	}
	if err := run.elector.Healthy(); err != nil {
		h.Healthy, h.Health = false, err.Error()
	}
	ok(w, h)
}

func defaultProtocol(p coord.Protocols) defaultAddress {
	name := coord.ProtocolHTTP
	if _, ok := p[name]; !ok {
		name = slices.Sorted(maps.Keys(p))[0] // Protocols are never empty
	}
	return defaultAddress{Protocol: name, Address: p[name].Address, ExternalAddress: p[name].ExternalAddress}
}
