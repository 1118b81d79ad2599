package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"maps"
	"math"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/election"
	"github.com/batonhq/baton/internal/hooks"
	"github.com/batonhq/baton/internal/keyspace"
)

// Version is reported in server records and /server/hello.
const Version = "baton/0.1"

// Node is one scheduler server taking part in baton: its guarded etcd
// session and membership key, its elector, and PowerJob's HTTP endpoints.
// It is safe for concurrent use.
type Node struct {
	cfg      Config
	keys     keyspace.Keys
	registry *coord.Registry
	apps     *appCache
	checks   *rateLimit // connectivity checks
	logger   hclog.Logger
	handler  http.Handler
	run      atomic.Pointer[running] // set once Start succeeded

	// stopping is set once a drain, Close or a crash has begun: from then on
	// the node answers /friend/ping as not serving, so that no peer sends
	// workers to a node that will not act.
	stopping atomic.Bool
	// cordoned: placement weight 0 (Cordon).
	cordoned atomic.Bool
	// membership serializes the writes of the membership record (a new
	// lease's registration, Cordon, Uncordon), so that the record etcd
	// ends with is the state set last: a one-slot semaphore.
	membership chan struct{}

	mu      sync.Mutex
	started bool
	closed  bool
	drain   *drainResult // the one drain, once begun
}

// drainResult is the outcome of the node's one drain, shared by every
// caller of Drain and by Close.
type drainResult struct {
	done chan struct{}
	err  error
}

// running is what Start built; handlers read it without locks.
type running struct {
	record    coord.ServerRecord // the membership record, but Cordoned (n.cordoned) and Weight
	weight    atomic.Uint64      // math.Float64bits of the placement weight (SetWeight)
	started   time.Time
	control   coord.Endpoint
	protocols coord.Protocols
	session   *coord.Session
	elector   *election.Elector
	listener  net.Listener
	http      *http.Server
	serveDone chan struct{}
	metrics   *httpMetrics
}

// NewNode validates cfg and returns a node that is not started yet. Its
// Handler can be mounted before Start; it answers "not started" until then.
func NewNode(cfg Config) (*Node, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	keys, _ := keyspace.New(cfg.Prefix)                      // validated by withDefaults
	registry, _ := coord.NewRegistry(cfg.Client, cfg.Prefix) // the same
	n := &Node{
		cfg:        cfg,
		keys:       keys,
		registry:   registry,
		apps:       newAppCache(),
		checks:     newRateLimit(connectivityRate),
		membership: make(chan struct{}, 1),
		logger:     cfg.Logger.Named("server").With("server_id", cfg.ServerID),
	}
	n.handler = n.routes()
	return n, nil
}

// Start opens the listener (if Listen is set), the session with the
// membership key, the elector and the HTTP server. It blocks until etcd
// has confirmed the session or ctx ends; on failure it releases all it
// took. A node starts once.
func (n *Node) Start(ctx context.Context) error {
	n.mu.Lock()
	if n.started || n.closed {
		n.mu.Unlock()
		return errors.New("server: Start called twice or after Close")
	}
	n.started = true
	n.mu.Unlock()

	r, err := n.start(ctx)
	if err != nil {
		n.release(context.Background(), r)
		return err
	}
	n.mu.Lock()
	closed := n.closed
	if !closed {
		n.run.Store(r)
	}
	n.mu.Unlock()
	if closed {
		n.release(context.Background(), r)
		return errors.New("server: closed while starting")
	}
	if r.http != nil {
		go func() {
			defer close(r.serveDone)
			if err := r.http.Serve(r.listener); err != nil && !errors.Is(err, http.ErrServerClosed) {
				n.logger.Error("http server stopped", "error", err)
			}
		}()
	}
	n.logger.Info("started", "control", r.control.Address, "protocols", r.protocols, "ttl", r.session.TTL())
	return nil
}

func (n *Node) start(ctx context.Context) (*running, error) {
	r := &running{started: time.Now(), control: n.cfg.Control, protocols: maps.Clone(n.cfg.Protocols)}
	var err error
	if n.cfg.Listen != "" {
		if r.listener, err = net.Listen("tcp", n.cfg.Listen); err != nil {
			return r, fmt.Errorf("server: listen on %s: %w", n.cfg.Listen, err)
		}
		if r.control.Address == "" {
			r.control.Address = dialable(r.listener.Addr())
		}
		if n.cfg.TLS != nil {
			r.listener = tls.NewListener(r.listener, n.cfg.TLS)
			r.control.TLS = true
		}
	}
	if len(r.protocols) == 0 {
		// The scheduler receives its workers' HTTP traffic where baton's
		// endpoints answer (it mounts Handler in its own server).
		r.protocols = coord.Protocols{coord.ProtocolHTTP: r.control}
	}
	if err := r.protocols.Validate(); err != nil {
		return r, fmt.Errorf("server: %w: Protocols: %v", ErrInvalidConfig, err)
	}
	r.record = coord.ServerRecord{
		ServerID:  n.cfg.ServerID,
		Control:   r.control,
		Protocols: r.protocols,
		StartedAt: time.Now().UTC(),
		Software:  Version,
		Weight:    n.cfg.Weight,
	}
	if _, err := r.record.Encode(); err != nil {
		return r, err
	}
	r.weight.Store(math.Float64bits(n.cfg.Weight))
	// Each new lease registers the record as it is then (cordoned or
	// not), one membership write at a time (see setCordoned).
	register := func(ctx context.Context, lease clientv3.LeaseID) error {
		unlock, err := n.lockMembership(ctx)
		if err != nil {
			return err
		}
		defer unlock()
		reg, err := coord.MembershipOnLease(n.cfg.Client, n.cfg.Prefix, n.record(r))
		if err != nil {
			return err
		}
		return reg(ctx, lease)
	}
	var sessionReg prometheus.Registerer
	if n.cfg.Registerer != nil {
		sessionReg = prometheus.WrapRegistererWith(prometheus.Labels{"server_id": n.cfg.ServerID}, n.cfg.Registerer)
		if r.metrics, err = newHTTPMetrics(sessionReg); err != nil {
			return r, err
		}
	}
	r.session, err = coord.NewSession(ctx, coord.SessionConfig{
		Client:     n.cfg.Client,
		Prefix:     n.cfg.Prefix,
		TTL:        n.cfg.TTL,
		OnLease:    n.registerUnlessStopping(register),
		Logger:     n.cfg.Logger,
		Registerer: sessionReg,
	})
	if err != nil {
		return r, err
	}
	ecfg := election.Config{
		ServerID:   n.cfg.ServerID,
		Control:    r.control,
		Protocols:  r.protocols,
		Tuning:     n.cfg.Election,
		Pinger:     HTTPPinger{Client: n.cfg.HTTPClient},
		Callbacks:  n.cfg.Callbacks,
		Rebalance:  n.cfg.Balance,
		Logger:     n.cfg.Logger,
		Registerer: n.cfg.Registerer,
	}
	if r.elector, err = election.New(ctx, r.session, ecfg); err != nil {
		return r, err
	}
	if err := n.apps.load(ctx, n.registry); err != nil {
		if !errors.Is(err, coord.ErrCorruptRecord) {
			return r, fmt.Errorf("server: load the app registry: %w", err)
		}
		n.logger.Warn("some app records cannot be decoded; assert will not find those apps", "error", err)
	}
	if r.listener != nil {
		t := n.cfg.HTTPTimeouts
		r.http = &http.Server{
			Handler:           n.handler,
			ReadHeaderTimeout: t.ReadHeader,
			ReadTimeout:       t.Read,
			WriteTimeout:      t.Write,
			IdleTimeout:       t.Idle,
			MaxHeaderBytes:    max(t.MaxHeaderBytes, headerHardCap),
			ErrorLog:          n.logger.StandardLogger(&hclog.StandardLoggerOptions{ForceLevel: hclog.Debug}),
		}
		r.serveDone = make(chan struct{})
	}
	return r, nil
}

// registerUnlessStopping wraps the membership registration that runs for
// every new lease: a node that drains, closes or was killed never writes
// its membership key again, even when etcd lost its lease meanwhile and
// the session starts a new one (a drain cut off from etcd past its TTL).
func (n *Node) registerUnlessStopping(register func(context.Context, clientv3.LeaseID) error) func(context.Context, clientv3.LeaseID) error {
	return func(ctx context.Context, lease clientv3.LeaseID) error {
		if n.stopping.Load() {
			n.logger.Info("new lease while stopping: not re-joining membership", "lease", fmt.Sprintf("%x", lease))
			return nil
		}
		return register(ctx, lease)
	}
}

// dialable turns a listener address into one others can dial: an
// unspecified host (":7700", "[::]:7700") becomes loopback.
func dialable(a net.Addr) string {
	tcp, ok := a.(*net.TCPAddr)
	if !ok {
		return a.String()
	}
	ip := tcp.IP
	if ip == nil || ip.IsUnspecified() {
		ip = net.IPv4(127, 0, 0, 1)
	}
	return net.JoinHostPort(ip.String(), fmt.Sprint(tcp.Port))
}

// Handler returns the node's HTTP handler, to mount in an existing server
// instead of (or as well as) listening with Listen.
func (n *Node) Handler() http.Handler { return n.handler }

// Addr returns the node's control address as workers use it (its
// ExternalAddress when set): where baton's endpoints answer, the address
// to list in workers' server lists ("" before Start).
func (n *Node) Addr() string {
	r := n.run.Load()
	if r == nil {
		return ""
	}
	return r.control.ForWorkers()
}

// Protocols returns the node's transport addresses, one per protocol: what
// a worker's acquire is answered with (nil before Start).
func (n *Node) Protocols() coord.Protocols {
	r := n.run.Load()
	if r == nil {
		return nil
	}
	return maps.Clone(r.protocols)
}

// ID returns the server id.
func (n *Node) ID() string { return n.cfg.ServerID }

// Elector returns the node's elector. Before Start it is nil, and every
// method of a nil *Elector is safe: actions answer election.ErrNotReady,
// queries answer nothing.
func (n *Node) Elector() *election.Elector {
	if r := n.run.Load(); r != nil {
		return r.elector
	}
	return nil
}

// Session returns the node's session (nil before Start).
func (n *Node) Session() *coord.Session {
	if r := n.run.Load(); r != nil {
		return r.session
	}
	return nil
}

// Registry returns the app registry the node answers /server/assert from.
func (n *Node) Registry() *coord.Registry { return n.registry }

// Drain takes this node out of service for good: it hands every owned app
// to its successor (waiting for the successors until ctx ends, minus a
// share kept for the revoke), stops electing itself, and revokes its
// lease, so that its membership key and any owner key or displacement
// marker left behind by a handover that failed or was cut short disappear
// at once and other servers take those apps over. If the revoke fails too
// (etcd unreachable), the lease, no longer kept alive, expires within its
// TTL. From the start of the drain the node answers /friend/ping as not
// serving and /server/acquire with an error, so peers and workers move
// on; it keeps answering HTTP until Close. Every call returns the outcome
// of the one drain (waiting for it until ctx ends); it never re-joins
// membership, even after etcd lost its lease.
func (n *Node) Drain(ctx context.Context) error {
	r := n.run.Load()
	if r == nil {
		return errors.New("server: Drain before Start")
	}
	n.mu.Lock()
	if d := n.drain; d != nil {
		n.mu.Unlock()
		select {
		case <-d.done:
			return d.err
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	d := &drainResult{done: make(chan struct{})}
	n.drain = d
	n.mu.Unlock()

	n.stopping.Store(true)
	handover, cancel := leaveRoom(ctx, releaseShare)
	err := r.elector.Close(handover)
	if handover.Err() != nil {
		// Not everything may have been handed over: what is left goes
		// with the revoke below, and the caller should know.
		err = errors.Join(err, fmt.Errorf("server: drain cut short: %w", handover.Err()))
	}
	cancel()
	revoke, cancel := withFloor(ctx, releaseFloor)
	err = errors.Join(err, r.session.Close(revoke))
	cancel()
	if err != nil {
		n.logger.Warn("drain did not complete; what is left goes with the lease", "error", err)
	}
	d.err = err
	close(d.done)
	return err
}

// Close drains (see Drain) and shuts the HTTP server down gracefully,
// bounded by ctx; the revoke and the shutdown each get at least
// releaseFloor even when the drain used up ctx, so that a drain cut short
// still frees the node's keys at once and lets in-flight requests finish.
// It is idempotent.
func (n *Node) Close(ctx context.Context) error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	n.mu.Unlock()
	n.stopping.Store(true)
	return n.release(ctx, n.run.Load())
}

// releaseShare is the share of a Drain's or Close's ctx kept back from
// the handover for the revoke and the HTTP shutdown, at most
// releaseShareMax; releaseFloor is the least time each of them gets.
const (
	releaseShare    = 4 // a quarter
	releaseShareMax = time.Second
	releaseFloor    = 250 * time.Millisecond
)

// leaveRoom returns ctx with its deadline (if any) moved earlier by
// 1/share of the time left, at most releaseShareMax.
func leaveRoom(ctx context.Context, share int) (context.Context, context.CancelFunc) {
	d, ok := ctx.Deadline()
	if !ok {
		return context.WithCancel(ctx)
	}
	return context.WithDeadline(ctx, d.Add(-min(time.Until(d)/time.Duration(share), releaseShareMax)))
}

// withFloor returns a context that ends when ctx does, but not before
// floor from now.
func withFloor(ctx context.Context, floor time.Duration) (context.Context, context.CancelFunc) {
	d, hasDeadline := ctx.Deadline()
	if ctx.Err() == nil && (!hasDeadline || time.Until(d) >= floor) {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(context.WithoutCancel(ctx), floor)
}

// crash stops the node the way a crash would (servertest.Crash): the
// HTTP server and every connection close at once, the session stops
// without revoking its lease (etcd expires it after the TTL, and with it
// the node's keys), and nothing is handed over. Ownership contexts are
// cancelled and OnLose runs with ReasonClosed, since the process lives
// on. Close after crash does nothing.
func (n *Node) crash() {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return
	}
	n.closed = true
	n.mu.Unlock()
	n.stopping.Store(true)
	r := n.run.Load()
	if r == nil {
		return
	}
	if r.http != nil {
		r.http.Close()
		<-r.serveDone
	}
	hooks.AbandonSession(r.session)
	gone, cancel := context.WithCancel(context.Background())
	cancel() // no time to hand anything over or leave membership
	r.elector.Close(gone)
	r.metrics.unregister()
}

// release closes what start opened, in reverse order: for a started node
// the drain (which revokes the lease) and then the HTTP server; for a
// start that failed, whatever it had opened.
func (n *Node) release(ctx context.Context, r *running) error {
	if r == nil {
		return nil
	}
	if n.run.Load() != r {
		var errs []error
		if r.elector != nil {
			errs = append(errs, r.elector.Close(ctx))
		}
		if r.session != nil {
			errs = append(errs, r.session.Close(ctx))
		}
		if r.listener != nil {
			r.listener.Close()
		}
		r.metrics.unregister()
		return errors.Join(errs...)
	}
	drain, cancel := leaveRoom(ctx, releaseShare)
	err := n.Drain(drain)
	cancel()
	if r.http != nil {
		shutdown, cancel := withFloor(ctx, releaseFloor)
		defer cancel()
		if serr := r.http.Shutdown(shutdown); serr != nil {
			r.http.Close()
			err = errors.Join(err, serr)
		}
		<-r.serveDone
	}
	r.metrics.unregister()
	return err
}
