package server

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/election"
)

// Version is reported in server records and /server/hello.
const Version = "baton/0.1"

// Node is one scheduler server taking part in baton: its guarded etcd
// session and membership key, its elector, and PowerJob's HTTP endpoints.
// It is safe for concurrent use.
type Node struct {
	cfg      Config
	keys     coord.Keys
	registry *coord.Registry
	logger   hclog.Logger
	handler  http.Handler
	run      atomic.Pointer[running] // set once Start succeeded

	mu      sync.Mutex
	started bool
	closed  bool
}

// running is what Start built; handlers read it without locks.
type running struct {
	protocols coord.Protocols
	session   *coord.Session
	elector   *election.Elector
	listener  net.Listener
	http      *http.Server
	serveDone chan struct{}
}

// NewNode validates cfg and returns a node that is not started yet. Its
// Handler can be mounted before Start; it answers "not started" until then.
func NewNode(cfg Config) (*Node, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	keys, _ := coord.NewKeys(cfg.Prefix)
	n := &Node{
		cfg:      cfg,
		keys:     keys,
		registry: coord.NewRegistry(cfg.Client, keys),
		logger:   cfg.Logger.Named("server").With("server_id", cfg.ServerID),
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
	n.logger.Info("started", "http", r.protocols[coord.ProtocolHTTP].Address, "ttl", r.session.TTL())
	return nil
}

func (n *Node) start(ctx context.Context) (*running, error) {
	r := &running{protocols: maps.Clone(n.cfg.Protocols)}
	if r.protocols == nil {
		r.protocols = coord.Protocols{}
	}
	var err error
	if n.cfg.Listen != "" {
		if r.listener, err = net.Listen("tcp", n.cfg.Listen); err != nil {
			return r, fmt.Errorf("server: listen on %s: %w", n.cfg.Listen, err)
		}
		if _, ok := r.protocols[coord.ProtocolHTTP]; !ok {
			r.protocols[coord.ProtocolHTTP] = coord.Endpoint{Address: dialable(r.listener.Addr())}
		}
	}
	if err := r.protocols.Validate(); err != nil {
		return r, fmt.Errorf("%w: Protocols: %v", ErrInvalidConfig, err)
	}
	register, err := coord.RegisterServer(n.cfg.Client, n.keys, coord.ServerRecord{
		ServerID:  n.cfg.ServerID,
		Protocols: r.protocols,
		StartedAt: time.Now().UTC(),
		Software:  Version,
	})
	if err != nil {
		return r, err
	}
	r.session, err = coord.NewSession(ctx, coord.SessionConfig{
		Client:  n.cfg.Client,
		Keys:    n.keys,
		TTL:     n.cfg.TTL,
		OnLease: register,
		Logger:  n.cfg.Logger,
	})
	if err != nil {
		return r, err
	}
	ecfg := n.cfg.Election
	ecfg.ServerID = n.cfg.ServerID
	ecfg.Protocols = r.protocols
	ecfg.Pinger = HTTPPinger{}
	ecfg.Callbacks = n.cfg.Callbacks
	ecfg.Logger = n.cfg.Logger
	ecfg.Registerer = n.cfg.Registerer
	if r.elector, err = election.New(ctx, r.session, ecfg); err != nil {
		return r, err
	}
	if r.listener != nil {
		t := n.cfg.HTTPTimeouts
		r.http = &http.Server{
			Handler:           n.handler,
			ReadHeaderTimeout: t.ReadHeader,
			ReadTimeout:       t.Read,
			WriteTimeout:      t.Write,
			IdleTimeout:       t.Idle,
			MaxHeaderBytes:    t.MaxHeaderBytes,
			ErrorLog:          n.logger.StandardLogger(&hclog.StandardLoggerOptions{ForceLevel: hclog.Debug}),
		}
		r.serveDone = make(chan struct{})
	}
	return r, nil
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

// Addr returns the HTTP address workers are given ("" before Start).
func (n *Node) Addr() string {
	r := n.run.Load()
	if r == nil {
		return ""
	}
	ep := r.protocols[coord.ProtocolHTTP]
	if ep.ExternalAddress != "" {
		return ep.ExternalAddress
	}
	return ep.Address
}

// ID returns the server id.
func (n *Node) ID() string { return n.cfg.ServerID }

// Elector returns the node's elector (nil before Start).
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

// Drain hands every owned app to its successor and stops electing this
// server, waiting for the handover until ctx ends. The node keeps
// answering HTTP (acquire then fails, so workers move on) until Close.
func (n *Node) Drain(ctx context.Context) error {
	if el := n.Elector(); el != nil {
		return el.Close(ctx)
	}
	return nil
}

// Close drains (see Drain), revokes the lease — so the membership key and
// any key left behind disappear at once — and shuts the HTTP server down
// gracefully, all bounded by ctx. It is idempotent.
func (n *Node) Close(ctx context.Context) error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	n.mu.Unlock()
	return n.release(ctx, n.run.Load())
}

// Kill stops the node the way a crash would, for tests and demos: the
// HTTP server and every connection close at once, the session stops
// without revoking its lease (etcd expires it after the TTL, and with it
// the node's keys), and nothing is handed over. Ownership contexts are
// cancelled and OnLose runs with ReasonClosed, since the process lives
// on. Close after Kill does nothing.
func (n *Node) Kill() {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return
	}
	n.closed = true
	n.mu.Unlock()
	r := n.run.Load()
	if r == nil {
		return
	}
	if r.http != nil {
		r.http.Close()
		<-r.serveDone
	}
	r.session.Abandon()
	gone, cancel := context.WithCancel(context.Background())
	cancel() // no time to hand anything over or leave membership
	r.elector.Close(gone)
}

// release closes what start opened, in reverse order.
func (n *Node) release(ctx context.Context, r *running) error {
	if r == nil {
		return nil
	}
	var errs []error
	if r.elector != nil {
		errs = append(errs, r.elector.Close(ctx))
	}
	if r.session != nil {
		errs = append(errs, r.session.Close(ctx))
	}
	switch {
	case r.http != nil && r.serveDone != nil && n.run.Load() == r:
		if err := r.http.Shutdown(ctx); err != nil {
			r.http.Close()
			errs = append(errs, err)
		}
		<-r.serveDone
	case r.listener != nil:
		r.listener.Close()
	}
	return errors.Join(errs...)
}
