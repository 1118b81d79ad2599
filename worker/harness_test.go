package worker_test

import (
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/etcdcluster"
	"github.com/batonhq/baton/internal/keyspace"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
	"github.com/batonhq/baton/worker"
)

// startNode starts a server node with TTL 1 s, listening on listen
// ("127.0.0.1:0" for any port).
func startNode(t testing.TB, e *etcdcluster.Cluster, id, listen string) *server.Node {
	t.Helper()
	cfg := server.DefaultConfig()
	cfg.Client = testutil.Client(t, e)
	cfg.ServerID = id
	cfg.TTL = time.Second
	cfg.Listen = listen
	cfg.Logger = testutil.Logger(t).Named(id)
	cfg.Election.PingTimeout = 300 * time.Millisecond
	n, err := server.NewNode(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := n.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { closeNode(n) })
	return n
}

func closeNode(n *server.Node) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	n.Close(ctx)
}

// recorder collects a worker's changes and isolations.
type recorder struct {
	mu        sync.Mutex
	changes   []change
	isolated  int
	notify    chan struct{}
	registry  *prometheus.Registry
	discovery *worker.Discovery
}

type change struct {
	old, new worker.Server
	at       time.Time
}

func (r *recorder) wait(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		r.mu.Lock()
		ch := r.notify
		r.mu.Unlock()
		if cond() {
			return
		}
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
	}
}

func (r *recorder) event() {
	close(r.notify)
	r.notify = make(chan struct{})
}

// startWorker starts a discovery for app with the given config edits.
func startWorker(t testing.TB, app string, edit func(*worker.Config)) *recorder {
	t.Helper()
	r := &recorder{notify: make(chan struct{}), registry: prometheus.NewRegistry()}
	cfg := worker.DefaultConfig()
	cfg.AppName = app
	cfg.Logger = testutil.Logger(t).Named("worker")
	cfg.Registerer = r.registry
	cfg.RequestTimeout = 500 * time.Millisecond
	cfg.PingTimeout = 300 * time.Millisecond
	cfg.TryPause = 10 * time.Millisecond
	cfg.OnChange = func(old, new worker.Server) {
		r.mu.Lock()
		defer r.mu.Unlock()
		r.changes = append(r.changes, change{old, new, time.Now()})
		r.event()
	}
	cfg.OnIsolated = func() {
		r.mu.Lock()
		defer r.mu.Unlock()
		r.isolated++
		r.event()
	}
	edit(&cfg)
	d, err := worker.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := d.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Close)
	r.discovery = d
	return r
}

// keepsServer fails the test if the worker's Current differs from want
// at any moment during window (checked every 5 ms): a round's result is
// applied just after it is counted, so a test that waited for the count
// looks a little longer.
func (r *recorder) keepsServer(t testing.TB, want worker.Server, window time.Duration, what string) {
	t.Helper()
	end := time.After(window)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if cur, _ := r.discovery.Current(); cur != want {
			t.Fatalf("%s: %+v → %+v", what, want, cur)
		}
		select {
		case <-tick.C:
		case <-end:
			return
		}
	}
}

func (r *recorder) current() string {
	s, _ := r.discovery.Current()
	return s.Address
}

func (r *recorder) isolations() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.isolated
}

// metric sums the worker's metric name (with label value, if given).
func (r *recorder) metric(t testing.TB, name, label string) float64 {
	t.Helper()
	return testutil.Metric(t, r.registry, name, label)
}

// deadAddr returns a loopback address nothing listens on.
func deadAddr(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

func register(t testing.TB, cli *clientv3.Client, name string) int64 {
	keys, _ := keyspace.New("")
	app, err := testutil.Must(coord.NewRegistry(cli, keys.Prefix())).Register(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	return app.ID
}

func elect(t testing.TB, n *server.Node, app int64) string {
	t.Helper()
	addr, err := n.Elector().Elect(context.Background(), app, coord.ProtocolHTTP, "")
	if err != nil {
		t.Fatal(err)
	}
	return addr
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }
