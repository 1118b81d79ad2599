package integration

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/etcdcluster"
	"github.com/batonhq/baton/internal/keyspace"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
	"github.com/batonhq/baton/server/servertest"
	"github.com/batonhq/baton/worker"
)

// Benchmarks run servers in this process (server.Node; a crash is
// Node.Kill: HTTP closed, lease not revoked) so that many trials fit in a
// few minutes; integration/bench.sh runs them all. Each reports its own
// figures with b.ReportMetric; compare ratios, not absolute times. They
// use b.Loop so that their expensive setup runs once per -count.

// benchCluster is an embedded etcd and in-process server nodes.
type benchCluster struct {
	b     *testing.B
	etcd  *etcdcluster.Cluster
	keys  keyspace.Keys
	nodes []*server.Node
	seq   int
	edit  func(*server.Config) // applied to every node's config, if set
}

func newBenchCluster(b *testing.B, nodes int) *benchCluster {
	return newBenchClusterOn(b, testutil.Etcd(b, 1), nodes)
}

// newBenchClusterOn starts nodes servers on the given etcd, with Balance
// off: the benchmarks written before balancing place apps themselves
// (electAll: app i on node i%n) and time trials longer than the settle
// delay, which rebalancing would disturb by moving apps mid-trial.
// Elector.Place places by preference all the same.
func newBenchClusterOn(b *testing.B, e *etcdcluster.Cluster, nodes int) *benchCluster {
	return newBenchClusterWith(b, e, nodes, func(c *server.Config) { c.Balance = false })
}

// newBenchClusterWith starts nodes servers on the given etcd, each
// configured by server.DefaultConfig and then edit (if set), which sees
// the node's ServerID ("s1", "s2", … in start order). Nodes added later
// (addNode, replace) get the same edit.
func newBenchClusterWith(b *testing.B, e *etcdcluster.Cluster, nodes int, edit func(*server.Config)) *benchCluster {
	keys, _ := keyspace.New(prefix)
	bc := &benchCluster{b: b, etcd: e, keys: keys, edit: edit}
	for range nodes {
		bc.addNode("127.0.0.1:0")
	}
	return bc
}

// addNode starts a server listening on listen (a crashed server's address,
// to replace it where workers expect a server).
func (bc *benchCluster) addNode(listen string) *server.Node {
	bc.seq++
	cfg := server.DefaultConfig()
	cfg.Client = testutil.Client(bc.b, bc.etcd)
	cfg.Prefix, cfg.ServerID, cfg.TTL, cfg.Listen = prefix, fmt.Sprintf("s%d", bc.seq), ttl, listen
	cfg.Logger = benchLogger(cfg.ServerID)
	if bc.edit != nil {
		bc.edit(&cfg)
	}
	n, err := server.NewNode(cfg)
	if err != nil {
		bc.b.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := n.Start(ctx); err != nil {
		bc.b.Fatal(err)
	}
	bc.b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		n.Close(ctx)
	})
	bc.nodes = append(bc.nodes, n)
	return n
}

// benchLogger is a server's logger in a benchmark: silent, unless
// BATON_BENCH_LOG names a level (debug, info, warn, error); then that
// server logs at that level to stderr, to explain a failed or slow run.
func benchLogger(name string) hclog.Logger {
	level := os.Getenv("BATON_BENCH_LOG")
	if level == "" {
		return hclog.NewNullLogger()
	}
	return hclog.New(&hclog.LoggerOptions{Name: name, Level: hclog.LevelFromString(level), Output: os.Stderr})
}

// replace removes old from the cluster and starts a new server (new id)
// listening on listen.
func (bc *benchCluster) replace(old *server.Node, listen string) {
	bc.remove(old)
	bc.addNode(listen)
	// Every server sees every other before the next trial, so that the
	// successor is chosen among all of them.
	bc.awaitMembers()
}

// awaitMembers waits until every node's view of the live servers holds
// exactly the cluster's nodes.
func (bc *benchCluster) awaitMembers() {
	deadline := time.Now().Add(10 * time.Second)
	for _, n := range bc.nodes {
		for !sameMembers(n.Elector().Members().Servers(), bc.nodes) {
			if time.Now().After(deadline) {
				bc.b.Fatal("membership did not settle")
			}
			time.Sleep(time.Millisecond)
		}
	}
}

func sameMembers(view []coord.ServerRecord, nodes []*server.Node) bool {
	if len(view) != len(nodes) {
		return false
	}
	for _, n := range nodes {
		if !slices.ContainsFunc(view, func(r coord.ServerRecord) bool { return r.ServerID == n.ID() }) {
			return false
		}
	}
	return true
}

// remove takes n out of the cluster's nodes (after it crashed or
// closed).
func (bc *benchCluster) remove(n *server.Node) {
	bc.nodes = slices.DeleteFunc(bc.nodes, func(x *server.Node) bool { return x == n })
}

// wipe crashes every node and revokes its lease, so that its membership
// key, owner keys and locks go at once: the etcd is left with the app
// registry only, for the next cluster to start on. Close after a crash
// does nothing, so the nodes' cleanups cost nothing either.
func (bc *benchCluster) wipe() {
	for _, n := range bc.nodes {
		lease := n.Session().Lease()
		servertest.Crash(n)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := bc.etcd.Client().Revoke(ctx, lease)
		cancel()
		if err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
			bc.b.Fatal(err)
		}
	}
	bc.nodes = nil
}

func (bc *benchCluster) addrs() []string {
	var out []string
	for _, n := range bc.nodes {
		out = append(out, n.Addr())
	}
	return out
}

// owner reads the app's owner from etcd (nil when none).
func (bc *benchCluster) owner(app int64) *server.Node {
	resp, err := bc.etcd.Client().Get(context.Background(), bc.keys.Owner(app))
	if err != nil || len(resp.Kvs) == 0 {
		return nil
	}
	rec, _ := coord.DecodeOwnerRecord(resp.Kvs[0].Value)
	for _, n := range bc.nodes {
		if n.ID() == rec.ServerID {
			return n
		}
	}
	return nil
}

// settledOwner returns app's owner once every worker of f points at it:
// the state each trial starts from.
func (bc *benchCluster) settledOwner(app int64, f *fleet) *server.Node {
	owner := bc.owner(app)
	if owner == nil {
		bc.b.Fatal("no owner")
	}
	if _, ok := f.followedAt(owner.Addr(), 30*time.Second); !ok {
		bc.b.Fatal("workers not at the owner before the trial")
	}
	return owner
}

// newOwner waits until someone other than old owns app in etcd.
func (bc *benchCluster) newOwner(app int64, old *server.Node) *server.Node {
	deadline := time.Now().Add(30 * time.Second)
	for {
		if n := bc.owner(app); n != nil && n != old {
			return n
		}
		if time.Now().After(deadline) {
			bc.b.Fatal("no new owner")
		}
		time.Sleep(time.Millisecond)
	}
}

// registerOne registers one app and has the cluster's first node own it.
func (bc *benchCluster) registerOne(name string) int64 {
	reg := testutil.Must(coord.NewRegistry(bc.etcd.Client(), bc.keys.Prefix()))
	app, err := reg.Register(context.Background(), name)
	if err != nil {
		bc.b.Fatal(err)
	}
	if _, err := bc.nodes[0].Elector().Elect(context.Background(), app.ID, coord.ProtocolHTTP, ""); err != nil {
		bc.b.Fatal(err)
	}
	return app.ID
}

// registerMany registers app-0 … app-(n-1), one after another (the
// registry's sequence is a CAS loop: concurrent registrations would only
// retry).
func registerMany(b *testing.B, bc *benchCluster, n int) []int64 {
	reg := testutil.Must(coord.NewRegistry(bc.etcd.Client(), bc.keys.Prefix()))
	var ids []int64
	for i := range n {
		app, err := reg.Register(context.Background(), fmt.Sprintf("app-%d", i))
		if err != nil {
			b.Fatal(err)
		}
		ids = append(ids, app.ID)
	}
	return ids
}

// electAll asks for every app once, app i of nodes[i%len(nodes)], with 16
// callers per node (each server's ElectionConcurrency bounds how many
// elections it runs at a time), and waits until each node acts for all it
// was asked about.
func electAll(b *testing.B, nodes []*server.Node, ids []int64) {
	type ask struct {
		node *server.Node
		app  int64
	}
	work := make(chan ask, len(ids))
	for i, id := range ids {
		work <- ask{nodes[i%len(nodes)], id}
	}
	close(work)
	var failed atomic.Int64
	var wg sync.WaitGroup
	for range 16 * len(nodes) {
		wg.Go(func() {
			for a := range work {
				if _, err := a.node.Elector().Elect(context.Background(), a.app, coord.ProtocolHTTP, ""); err != nil {
					failed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if failed.Load() > 0 {
		b.Fatalf("%d elections failed", failed.Load())
	}
	deadline := time.Now().Add(30 * time.Second)
	for i, n := range nodes {
		want := len(ids) / len(nodes)
		if i < len(ids)%len(nodes) {
			want++
		}
		for len(n.Elector().Owned()) < want {
			if time.Now().After(deadline) {
				b.Fatalf("%s owns %d of %d", n.ID(), len(n.Elector().Owned()), want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// fleet is a set of workers that records when each one's server last
// changed, so that "the last worker followed" is stamped exactly, in the
// workers' own goroutines, not by a poller.
type fleet struct {
	ws      []*worker.Discovery
	clients []*clientv3.Client // each worker's own, if it has one

	mu  sync.Mutex
	now []lastChange // by worker
}

type lastChange struct {
	addr string
	at   time.Time
}

// fleetConfig says which workers startFleet starts.
type fleetConfig struct {
	N   int
	App func(i int) string // the app worker i discovers
	// Etcd, if set, has each worker dial a client of its own, as worker
	// processes do (workers sharing a client share one watch stream, and
	// etcd delivers an event to a stream's watchers in batches of its
	// send buffer). Shared instead gives them all one client. With
	// neither, workers poll with PowerJob's defaults (10 s interval, 1 s
	// timeout, 3 tries).
	Etcd   *etcdcluster.Cluster
	Shared *clientv3.Client
	// Clients, if set, are shared round-robin: worker i uses
	// Clients[i%len(Clients)].
	Clients []*clientv3.Client
	Servers []string
	// HTTPClient, if set, sends every worker's requests.
	HTTPClient *http.Client
	// Stagger starts each worker at a random moment over one polling
	// interval, as real workers start at different times: their rounds
	// then fall at uniformly spread phases instead of in lockstep.
	Stagger    bool
	Registerer prometheus.Registerer // each worker's metrics, labelled worker=i
	// RequestTimeout is every worker's; zero means 1 s (with PingTimeout
	// 1 s), which the failover benchmarks time their polling by.
	RequestTimeout time.Duration
}

func oneApp(name string) func(int) string { return func(int) string { return name } }

// startFleet starts cfg.N discoveries, concurrently, and closes them when
// the benchmark ends.
func startFleet(b *testing.B, fc fleetConfig) *fleet {
	f := &fleet{ws: make([]*worker.Discovery, fc.N), clients: make([]*clientv3.Client, fc.N), now: make([]lastChange, fc.N)}
	errs := make(chan error, fc.N)
	for i := range fc.N {
		var delay time.Duration
		if fc.Stagger {
			delay = time.Duration(rand.Int64N(int64(worker.DefaultConfig().Interval)))
		}
		go func() {
			time.Sleep(delay)
			cfg := worker.DefaultConfig()
			cfg.AppName, cfg.Prefix, cfg.Client, cfg.Servers = fc.App(i), prefix, fc.Shared, fc.Servers
			cfg.HTTPClient = fc.HTTPClient
			if len(fc.Clients) > 0 {
				cfg.Client = fc.Clients[i%len(fc.Clients)]
			}
			if fc.Etcd != nil {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				cli, err := fc.Etcd.NewClient(ctx)
				cancel()
				if err != nil {
					errs <- err
					return
				}
				f.clients[i], cfg.Client = cli, cli
			}
			cfg.PingTimeout, cfg.RequestTimeout = time.Second, time.Second
			if fc.RequestTimeout > 0 {
				cfg.RequestTimeout = fc.RequestTimeout
			}
			cfg.OnChange = func(_, s worker.Server) {
				f.mu.Lock()
				f.now[i] = lastChange{s.Address, time.Now()}
				f.mu.Unlock()
			}
			if fc.Registerer != nil {
				cfg.Registerer = prometheus.WrapRegistererWith(prometheus.Labels{"worker": fmt.Sprint(i)}, fc.Registerer)
			}
			d, err := worker.New(cfg)
			if err == nil {
				if err = d.Start(context.Background()); err != nil {
					d.Close()
				}
			}
			if err == nil {
				f.ws[i] = d
			}
			errs <- err
		}()
	}
	var first error
	for range fc.N {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	b.Cleanup(f.close)
	if first != nil {
		b.Fatal(first)
	}
	return f
}

func (f *fleet) close() {
	for _, d := range f.ws {
		if d != nil {
			d.Close()
		}
	}
	for _, c := range f.clients {
		if c != nil {
			c.Close()
		}
	}
}

// followedAt waits until every worker points at addr and returns when the
// last of them changed to it.
func (f *fleet) followedAt(addr string, timeout time.Duration) (time.Time, bool) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		f.mu.Lock()
		var last time.Time
		all := true
		for _, w := range f.now {
			if w.addr != addr {
				all = false
				break
			}
			if w.at.After(last) {
				last = w.at
			}
		}
		f.mu.Unlock()
		if all {
			return last, true
		}
		time.Sleep(time.Millisecond)
	}
	return time.Time{}, false
}

func percentile(samples []time.Duration, p float64) time.Duration {
	s := slices.Clone(samples)
	slices.Sort(s)
	return s[int(p*float64(len(s)-1))]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// reportLatencies reports the median and p99 of samples in milliseconds.
func reportLatencies(b *testing.B, samples []time.Duration) {
	b.ReportMetric(ms(percentile(samples, 0.5)), "p50-ms")
	b.ReportMetric(ms(percentile(samples, 0.99)), "p99-ms")
}

// putP50 is the median of n plain etcd puts, one at a time: the unit in
// which the same run's latencies are read.
func putP50(b *testing.B, cli *clientv3.Client, n int) time.Duration {
	var samples []time.Duration
	for range n {
		start := time.Now()
		if _, err := cli.Put(context.Background(), "/bench/put", "x"); err != nil {
			b.Fatal(err)
		}
		samples = append(samples, time.Since(start))
	}
	return percentile(samples, 0.5)
}

// fanOutP50 is the median, over n puts, of the time from a plain put
// until every one of clients' watches of the key has received it: what
// any write costs to reach that many watchers on this machine, measured
// in the same run as the figures it explains.
func fanOutP50(b *testing.B, writer *clientv3.Client, clients []*clientv3.Client, n int) time.Duration {
	return percentile(fanOut(b, writer, clients, n), 0.5)
}

// fanOut returns, for each of n plain puts, the time from the put until
// every one of clients' watches of the key has received it.
func fanOut(b *testing.B, writer *clientv3.Client, clients []*clientv3.Client, n int) []time.Duration {
	const key = "/bench/fanout"
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	got := make(chan struct{}, len(clients))
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	for _, cli := range clients {
		wch := cli.Watch(ctx, key, clientv3.WithCreatedNotify())
		if resp := <-wch; !resp.Created {
			b.Fatal("fan-out watch not created")
		}
		wg.Go(func() {
			for resp := range wch {
				for range resp.Events {
					got <- struct{}{}
				}
			}
		})
	}
	var samples []time.Duration
	for i := range n {
		start := time.Now()
		if _, err := writer.Put(ctx, key, fmt.Sprint(i)); err != nil {
			b.Fatal(err)
		}
		for range clients {
			<-got
		}
		samples = append(samples, time.Since(start))
	}
	return samples
}
