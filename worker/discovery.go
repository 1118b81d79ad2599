package worker

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/backoff"
	"github.com/batonhq/baton/internal/keyspace"
)

// Server is the scheduler server a worker should talk to.
type Server struct {
	// Address is the server's transport address (host:port) for the
	// configured protocol: where the worker sends its traffic.
	Address string
	// ServerID and Token (the ownership's fencing token) are known when
	// the server was learned from etcd; from HTTP they are empty.
	ServerID string
	Token    int64
}

// Change is one change of the current server.
type Change struct {
	Old, New Server
}

// Discovery keeps a worker pointed at its app's owner. With an etcd
// client it watches the app's owner key and switches the moment it
// changes; without one, or while etcd is out of reach, it polls the
// servers over HTTP as PowerJob's worker does. It is safe for concurrent
// use; Current never blocks.
type Discovery struct {
	cfg      Config
	keys     keyspace.Keys
	logger   hclog.Logger
	api      *httpAPI
	registry *coord.Registry // nil without a client
	metrics  *metrics
	servers  []string     // Config.Servers as base URLs, shuffled once
	ownHTTP  *http.Client // the HTTP client the Discovery made (no Config.HTTPClient), closed with it
	controls sync.Map     // a server's transport address → its control address, from owner records

	current atomic.Pointer[Server]
	appID   atomic.Int64
	reports chan string

	changeMu sync.Mutex
	changes  chan Change

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	started bool
	closed  bool
}

// New validates cfg and returns a Discovery that has not started.
func New(cfg Config) (*Discovery, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	keys, _ := keyspace.New(cfg.Prefix)
	m, err := newMetrics(cfg.Registerer, cfg.AppName)
	if err != nil {
		return nil, err
	}
	d := &Discovery{
		cfg:     cfg,
		keys:    keys,
		logger:  cfg.Logger.Named("worker").With("app_name", cfg.AppName),
		metrics: m,
		servers: serverURLs(cfg.Servers),
		reports: make(chan string, 16),
		changes: make(chan Change, 1),
	}
	rand.Shuffle(len(d.servers), func(i, j int) { d.servers[i], d.servers[j] = d.servers[j], d.servers[i] })
	client := cfg.HTTPClient
	if client == nil {
		client = newHTTPClient(cfg.PingTimeout)
		d.ownHTTP = client
	}
	d.api = &httpAPI{client: client, timeout: cfg.RequestTimeout, tries: cfg.Tries, pause: cfg.TryPause, protocol: cfg.Protocol, requests: m.request}
	if cfg.Client != nil {
		d.registry, _ = coord.NewRegistry(cfg.Client, cfg.Prefix) // validated by withDefaults
	}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	return d, nil
}

// Start resolves the app id and finds the first server, then keeps
// following the owner until Close. Without AllowLazyConnect it keeps
// trying, with jittered pauses, until both are found or ctx ends — a fleet
// of workers started at once, or servers still starting, only delays it —
// and fails at once only when the app is unknown (the server's refusal, or
// etcd's registry); when ctx ends first it fails with ErrNoServer and the
// last round's error. With an etcd client it asks the servers over HTTP
// only once etcd's connection is down, or etcd has failed it for
// EtcdGrace: a slow etcd is waited for, not worked around. With AllowLazyConnect, Start succeeds at once and
// the worker keeps trying in the background.
func (d *Discovery) Start(ctx context.Context) error {
	d.mu.Lock()
	if d.started || d.closed {
		d.mu.Unlock()
		return errors.New("worker: Start called twice or after Close")
	}
	d.started = true
	d.mu.Unlock()

	if d.cfg.AllowLazyConnect {
		// Nothing to wait for: the first round runs in the background,
		// however long unreachable servers take to time out.
		return d.goRun(func() { d.run(d.initialState(d.ctx, always)) })
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(d.ctx, cancel)()

	// While etcd's connection is up, a Start that etcd failed waits for
	// etcd, up to EtcdGrace, rather than asking the servers: a fleet
	// started at once, etcd late for many of its requests, would
	// otherwise send the servers an election's etcd read and a ping for
	// each worker on top of those requests, and keep etcd overloaded.
	began := d.cfg.clock.Now()
	poll := func() bool {
		return !d.etcdConnected() || d.cfg.clock.Now().Sub(began) >= d.cfg.EtcdGrace
	}
	for attempt := 0; ; attempt++ {
		st := d.initialState(ctx, poll)
		if st.err == nil {
			if _, found := d.Current(); found {
				return d.goRun(func() { d.run(st) })
			}
			st.err = fmt.Errorf("%w for app %q (asked %v)", ErrNoServer, d.cfg.AppName, d.servers)
		}
		if errors.Is(st.err, errRefused) || errors.Is(st.err, coord.ErrUnknownApp) {
			return st.err
		}
		pause := backoff.Jittered(attempt, startPauseMin, startPauseMax)
		log := d.logger.Debug
		if attempt == 0 {
			log = d.logger.Info
		}
		log("no server found yet; trying again until Start's ctx ends", "app_name", d.cfg.AppName, "attempt", attempt+1, "pause", pause, "error", st.err)
		if err := backoff.Sleep(ctx, pause); err != nil {
			if !errors.Is(st.err, ErrNoServer) {
				st.err = fmt.Errorf("%w: %w", ErrNoServer, st.err)
			}
			return fmt.Errorf("%w (gave up after %d attempts: %w)", st.err, attempt+1, err)
		}
	}
}

func always() bool { return true }

// The pauses between Start's attempts: short at first (a server that is
// just starting), then up to a few seconds, jittered so that a fleet
// started at once spreads out.
const (
	startPauseMin = 100 * time.Millisecond
	startPauseMax = 3 * time.Second
)

// goRun starts the discovery goroutine unless Close has begun (it may run
// while Start was resolving): Close then waits for it, or it never starts.
func (d *Discovery) goRun(f func()) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return errors.New("worker: closed while starting")
	}
	d.wg.Go(f)
	return nil
}

// Current returns the server to talk to now, and false while there is
// none. It never blocks.
func (d *Discovery) Current() (Server, bool) {
	if s := d.current.Load(); s != nil {
		return *s, true
	}
	return Server{}, false
}

// AppID returns the app's id, or 0 while it is not resolved yet.
func (d *Discovery) AppID() int64 { return d.appID.Load() }

// Changes returns a channel that receives each change of the current
// server. It keeps only the latest change: a reader that falls behind
// sees the newest one, never a stale one, and the discovery never blocks
// on it. It is never closed; stop reading after Close.
func (d *Discovery) Changes() <-chan Change { return d.changes }

// ReportUnreachable tells the discovery that the worker's own traffic to
// addr failed; if addr is the current server, a discovery round starts
// at once. It never blocks.
func (d *Discovery) ReportUnreachable(addr string) {
	select {
	case d.reports <- addr:
	default: // a round is coming anyway
	}
}

// Close stops the discovery and waits for its goroutines. It is
// idempotent; the etcd client stays open.
func (d *Discovery) Close() {
	d.mu.Lock()
	d.closed = true
	d.mu.Unlock()
	d.cancel()
	d.wg.Wait()
	d.metrics.unregister()
	if d.ownHTTP != nil {
		d.ownHTTP.CloseIdleConnections()
	}
}

// setCurrent switches to s (a zero Server means none), publishing the
// change when there is one. Called only from the discovery's goroutine
// (and from Start before it runs).
func (d *Discovery) setCurrent(s Server) {
	old, _ := d.Current()
	if old.Address == s.Address && old.ServerID == s.ServerID && old.Token == s.Token {
		return
	}
	if s.Address == "" {
		d.current.Store(nil)
	} else {
		d.current.Store(&s)
	}
	if old.Address == s.Address {
		return // same server, better known (its id or token): not a change
	}
	d.logger.Info("current server changed", "old", old.Address, "new", s.Address, "server_id", s.ServerID, "token", s.Token)
	d.metrics.changed()
	if d.cfg.OnChange != nil {
		d.cfg.OnChange(old, s)
	}
	d.changeMu.Lock()
	defer d.changeMu.Unlock()
	select {
	case <-d.changes: // drop the unread older change
	default:
	}
	d.changes <- Change{Old: old, New: s}
}

// serverFromRecord is where the owner in rec answers the configured
// protocol; ok is false if it does not speak it.
func (d *Discovery) serverFromRecord(rec coord.OwnerRecord, token int64) (Server, bool) {
	ep, ok := rec.Protocols[d.cfg.Protocol]
	if !ok {
		return Server{}, false
	}
	d.controls.Store(ep.ForWorkers(), rec.Control.URL())
	return Server{Address: ep.ForWorkers(), ServerID: rec.ServerID, Token: token}, true
}

// ownerKeyRead is one read of the app's owner key.
type ownerKeyRead struct {
	rev    int64  // the read's revision: watch from rev+1
	modRev int64  // the key's ModRevision, 0 when there is no key
	owner  Server // zero when there is no usable owner
}

// readOwnerKey reads the app's owner key, linearizably: the answer is at
// least as new as anything the watch has delivered.
func (d *Discovery) readOwnerKey(ctx context.Context) (ownerKeyRead, error) {
	ctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), d.cfg.RequestTimeout)
	defer cancel()
	resp, err := d.cfg.Client.Get(ctx, d.keys.Owner(d.AppID()))
	if err != nil {
		return ownerKeyRead{}, err
	}
	r := ownerKeyRead{rev: resp.Header.Revision}
	if len(resp.Kvs) == 0 {
		return r, nil
	}
	r.modRev = resp.Kvs[0].ModRevision
	rec, err := coord.DecodeOwnerRecord(resp.Kvs[0].Value)
	if err != nil {
		d.logger.Warn("owner key holds a corrupt record", "error", err)
		return r, nil
	}
	r.owner, _ = d.serverFromRecord(rec, resp.Kvs[0].ModRevision)
	return r, nil
}

// resolveApp finds the app's id through etcd when it answers, else
// through /server/assert on the configured servers.
func (d *Discovery) resolveApp(ctx context.Context, viaEtcd bool) error {
	if d.AppID() != 0 {
		return nil
	}
	if viaEtcd && d.registry != nil {
		err := d.resolveAppInEtcd(ctx)
		if err == nil || errors.Is(err, coord.ErrUnknownApp) {
			return err
		}
		d.logger.Debug("etcd did not resolve the app; asking the servers", "error", err)
	}
	var last error = errors.New("no server configured")
	for _, s := range d.servers {
		id, err := d.api.assert(ctx, s, d.cfg.AppName)
		if err == nil {
			d.appID.Store(id)
			return nil
		}
		if errors.Is(err, errRefused) {
			return fmt.Errorf("worker: app %q: %w", d.cfg.AppName, err)
		}
		last = err
	}
	return fmt.Errorf("%w: resolve app %q: %v", ErrNoServer, d.cfg.AppName, last)
}

// resolveAppInEtcd finds the app's id in etcd's registry.
func (d *Discovery) resolveAppInEtcd(ctx context.Context) error {
	if d.AppID() != 0 {
		return nil
	}
	// Require a leader: a member cut off from it fails the read at once
	// instead of holding it for RequestTimeout.
	ctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), d.cfg.RequestTimeout)
	defer cancel()
	app, err := d.registry.ByName(ctx, d.cfg.AppName)
	if errors.Is(err, coord.ErrUnknownApp) {
		return fmt.Errorf("worker: app %q is not registered: %w", d.cfg.AppName, err)
	}
	if err != nil {
		return err
	}
	d.appID.Store(app.ID)
	return nil
}

// serverURLs are the base URLs of Config.Servers (validated by
// withDefaults).
func serverURLs(servers []string) []string {
	out := make([]string, len(servers))
	for i, s := range servers {
		out[i], _ = serverURL(s)
	}
	return out
}
