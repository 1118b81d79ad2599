package integration

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
	"github.com/batonhq/baton/worker"
)

// Benchmarks run servers in this process (server.Node; a crash is
// Node.Kill: HTTP closed, lease not revoked) so that many trials fit in a
// few minutes; integration/bench.sh runs them all. Each reports its own
// figures with b.ReportMetric; compare ratios, not absolute times.

// benchCluster is an embedded etcd and in-process server nodes.
type benchCluster struct {
	b     *testing.B
	etcd  *coord.Embedded
	keys  coord.Keys
	nodes []*server.Node
	seq   int
}

func newBenchCluster(b *testing.B, nodes int) *benchCluster {
	e := testutil.Etcd(b, 1)
	keys, _ := coord.NewKeys(prefix)
	bc := &benchCluster{b: b, etcd: e, keys: keys}
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

func (bc *benchCluster) addrs() []string {
	var out []string
	for _, n := range bc.nodes {
		out = append(out, n.Addr())
	}
	return out
}

// ownerAddr reads the app's owner from etcd ("" when none).
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

// startWorkers starts n discoveries of app: with etcd (baton) or polling
// with PowerJob's defaults (10 s, 1 s timeout, 3 tries) when cli is nil.
func startWorkers(b *testing.B, n int, app string, cli *clientv3.Client, servers []string) []*worker.Discovery {
	var ws []*worker.Discovery
	for range n {
		ws = append(ws, startWorker(b, app, cli, servers))
	}
	return ws
}

// startStaggered starts n workers at random moments over one polling
// interval, as real workers start at different times: their rounds then
// fall at uniformly spread phases instead of in lockstep.
func startStaggered(b *testing.B, n int, app string, cli *clientv3.Client, servers []string) []*worker.Discovery {
	ws := make([]*worker.Discovery, n)
	errs := make(chan error, n)
	for i := range n {
		delay := time.Duration(rand.Int64N(int64(worker.DefaultConfig().Interval)))
		go func() {
			time.Sleep(delay)
			d, err := newWorker(app, cli, servers)
			ws[i] = d
			errs <- err
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			b.Fatal(err)
		}
	}
	for _, d := range ws {
		b.Cleanup(d.Close)
	}
	return ws
}

func startWorker(b *testing.B, app string, cli *clientv3.Client, servers []string) *worker.Discovery {
	d, err := newWorker(app, cli, servers)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(d.Close)
	return d
}

// newWorker starts a discovery: with etcd (baton) or polling with
// PowerJob's defaults (10 s, 1 s timeout, 3 tries) when cli is nil.
func newWorker(app string, cli *clientv3.Client, servers []string) (*worker.Discovery, error) {
	cfg := worker.DefaultConfig()
	cfg.AppName, cfg.Prefix, cfg.Client, cfg.Servers = app, prefix, cli, servers
	cfg.PingTimeout, cfg.RequestTimeout = time.Second, time.Second
	d, err := worker.New(cfg)
	if err != nil {
		return nil, err
	}
	if err := d.Start(context.Background()); err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

// allAt waits until every worker points at addr and says how long it took.
func allAt(ws []*worker.Discovery, addr string, timeout time.Duration) (time.Duration, bool) {
	start := time.Now()
	for time.Since(start) < timeout {
		all := true
		for _, w := range ws {
			if s, _ := w.Current(); s.Address != addr {
				all = false
				break
			}
		}
		if all {
			return time.Since(start), true
		}
		time.Sleep(time.Millisecond)
	}
	return 0, false
}

func percentile(samples []time.Duration, p float64) time.Duration {
	s := slices.Clone(samples)
	slices.Sort(s)
	return s[int(p*float64(len(s)-1))]
}

// BenchmarkCrashFailover: three servers, one app, N workers; the owner
// crashes (no revoke); time until the last worker points at the new
// owner. baton workers watch etcd; the baseline is the same workers
// polling with PowerJob's defaults. Run with -benchtime=20x.
func BenchmarkCrashFailover(b *testing.B) {
	for _, n := range []int{10, 1000} {
		var batonP50 time.Duration
		for _, mode := range []string{"baton", "baseline"} {
			b.Run(fmt.Sprintf("workers=%d/%s", n, mode), func(b *testing.B) {
				samples := crashTrials(b, n, mode == "baton")
				p50, p99 := percentile(samples, 0.5), percentile(samples, 0.99)
				b.ReportMetric(float64(p50.Milliseconds()), "p50-ms")
				b.ReportMetric(float64(p99.Milliseconds()), "p99-ms")
				if mode == "baton" {
					batonP50 = p50
				} else if batonP50 > 0 {
					b.ReportMetric(float64(batonP50)/float64(p50), "baton/baseline-p50")
				}
			})
		}
	}
}

func crashTrials(b *testing.B, n int, withEtcd bool) []time.Duration {
	bc := newBenchCluster(b, 3)
	reg := coord.NewRegistry(bc.etcd.Client(), bc.keys)
	app, err := reg.Register(context.Background(), "bench")
	if err != nil {
		b.Fatal(err)
	}
	if _, err := bc.nodes[0].Elector().Elect(context.Background(), app.ID, coord.ProtocolHTTP, ""); err != nil {
		b.Fatal(err)
	}
	var cli *clientv3.Client
	if withEtcd {
		cli = testutil.Client(b, bc.etcd)
	}
	// Polling workers know the three original addresses; the server
	// started to replace each crashed one is new to them, but they always
	// know two live servers, which is all PowerJob's loop needs.
	ws := startStaggered(b, n, "bench", cli, bc.addrs())
	var samples []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		owner := bc.owner(app.ID)
		if owner == nil {
			b.Fatal("no owner")
		}
		if _, ok := allAt(ws, owner.Addr(), 30*time.Second); !ok {
			b.Fatal("workers not at the owner before the crash")
		}
		b.StartTimer()
		start := time.Now()
		owner.Kill()
		var next *server.Node
		deadline := time.Now().Add(30 * time.Second)
		for next == nil || next == owner {
			if time.Now().After(deadline) {
				b.Fatal("no new owner")
			}
			next = bc.owner(app.ID)
			time.Sleep(time.Millisecond)
		}
		if _, ok := allAt(ws, next.Addr(), 30*time.Second); !ok {
			b.Fatal("workers did not follow")
		}
		samples = append(samples, time.Since(start))
		b.StopTimer()
		// Keep three servers: a new one (new id) where the dead one was,
		// so that the polling workers' server list stays right.
		bc.nodes = slices.DeleteFunc(bc.nodes, func(x *server.Node) bool { return x == owner })
		bc.addNode(owner.Addr())
		b.StartTimer()
	}
	return samples
}

// BenchmarkMemory reports heap bytes and goroutines per owned app on one
// server, and per watched app in workers (one Discovery each).
func BenchmarkMemory(b *testing.B) {
	for _, apps := range []int{1000, 10000} {
		b.Run(fmt.Sprintf("node/apps=%d", apps), func(b *testing.B) {
			for range b.N {
				bc := newBenchCluster(b, 1)
				ids := registerMany(b, bc, apps)
				n := bc.nodes[0]
				heap0, g0 := heapAndGoroutines()
				electMany(b, n, ids)
				heap1, g1 := heapAndGoroutines()
				b.ReportMetric(float64(heap1-heap0)/float64(apps), "B/app")
				b.ReportMetric(float64(g1-g0)/float64(apps), "goroutines/app")
			}
		})
	}
	b.Run("worker/apps=1000", func(b *testing.B) {
		for range b.N {
			bc := newBenchCluster(b, 1)
			ids := registerMany(b, bc, 1000)
			electMany(b, bc.nodes[0], ids)
			cli := testutil.Client(b, bc.etcd)
			heap0, g0 := heapAndGoroutines()
			for i := range ids {
				startWorkers(b, 1, fmt.Sprintf("app-%d", i), cli, bc.addrs())
			}
			heap1, g1 := heapAndGoroutines()
			b.ReportMetric(float64(heap1-heap0)/1000, "B/app")
			b.ReportMetric(float64(g1-g0)/1000, "goroutines/app")
		}
	})
}

func registerMany(b *testing.B, bc *benchCluster, n int) []int64 {
	reg := coord.NewRegistry(bc.etcd.Client(), bc.keys)
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

// electMany has n elect itself for every app, 32 at a time, and waits
// until it acts for all.
func electMany(b *testing.B, n *server.Node, ids []int64) {
	work := make(chan int64, len(ids))
	for _, id := range ids {
		work <- id
	}
	close(work)
	var failed atomic.Int64
	done := make(chan struct{})
	for range 32 {
		go func() {
			defer func() { done <- struct{}{} }()
			for id := range work {
				if _, err := n.Elector().Elect(context.Background(), id, coord.ProtocolHTTP, ""); err != nil {
					failed.Add(1)
				}
			}
		}()
	}
	for range 32 {
		<-done
	}
	if failed.Load() > 0 {
		b.Fatalf("%d elections failed", failed.Load())
	}
	deadline := time.Now().Add(30 * time.Second)
	for len(n.Elector().Owned()) < len(ids) {
		if time.Now().After(deadline) {
			b.Fatalf("owns %d of %d", len(n.Elector().Owned()), len(ids))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func heapAndGoroutines() (uint64, int) {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc, runtime.NumGoroutine()
}

// BenchmarkSteadyState: three servers owning 10,000 apps, 1,000 workers
// watching, then an idle window (BATON_BENCH_IDLE, default 2m): etcd RPCs
// per second by method (from etcd's own gRPC metrics), and HTTP requests
// per worker per minute.
func BenchmarkSteadyState(b *testing.B) {
	idle := 2 * time.Minute
	if v := os.Getenv("BATON_BENCH_IDLE"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			b.Fatal(err)
		}
		idle = d
	}
	for range b.N {
		bc := newBenchCluster(b, 3)
		ids := registerMany(b, bc, 10000)
		for i, id := range ids {
			// Spread ownership over the three servers.
			if _, err := bc.nodes[i%3].Elector().Elect(context.Background(), id, coord.ProtocolHTTP, ""); err != nil {
				b.Fatal(err)
			}
		}
		cli := testutil.Client(b, bc.etcd)
		reg := prometheus.NewRegistry()
		var ws []*worker.Discovery
		for i := range 1000 {
			cfg := worker.DefaultConfig()
			cfg.AppName, cfg.Prefix, cfg.Client, cfg.Servers, cfg.Registerer = fmt.Sprintf("app-%d", i*10), prefix, cli, bc.addrs(), prometheus.WrapRegistererWith(prometheus.Labels{"w": fmt.Sprint(i)}, reg)
			d, err := worker.New(cfg)
			if err != nil {
				b.Fatal(err)
			}
			if err := d.Start(context.Background()); err != nil {
				b.Fatal(err)
			}
			b.Cleanup(d.Close)
			ws = append(ws, d)
		}
		rpc0, http0 := etcdRPCs(b), sumMetric(b, reg, "baton_worker_http_requests_total")
		time.Sleep(idle) // the idle window being measured
		rpc1, http1 := etcdRPCs(b), sumMetric(b, reg, "baton_worker_http_requests_total")
		secs := idle.Seconds()
		var total float64
		for method, v := range rpc1 {
			if d := v - rpc0[method]; d > 0 {
				b.ReportMetric(d/secs, method+"/s")
				total += d
			}
		}
		b.ReportMetric(total/secs, "etcd-rpcs/s")
		b.ReportMetric(total/secs/3, "etcd-rpcs/s/node")
		b.ReportMetric((http1-http0)/float64(len(ws))/(secs/60), "http-req/worker/min")
	}
}

// etcdRPCs reads etcd's own counters (default registry): RPCs started by
// method, and messages received on streams by method.
func etcdRPCs(b *testing.B) map[string]float64 {
	fams, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		b.Fatal(err)
	}
	out := map[string]float64{}
	for _, f := range fams {
		kind := map[string]string{"grpc_server_started_total": "rpc", "grpc_server_msg_received_total": "msg"}[f.GetName()]
		if kind == "" {
			continue
		}
		for _, m := range f.GetMetric() {
			var method, typ string
			for _, l := range m.GetLabel() {
				switch l.GetName() {
				case "grpc_method":
					method = l.GetValue()
				case "grpc_type":
					typ = l.GetValue()
				}
			}
			// Unary messages equal unary RPCs; count stream messages only.
			if kind == "msg" && typ == "unary" {
				continue
			}
			out[kind+"-"+method] += m.GetCounter().GetValue()
		}
	}
	return out
}

func sumMetric(b testing.TB, reg *prometheus.Registry, name string) float64 {
	fams, err := reg.Gather()
	if err != nil {
		b.Fatal(err)
	}
	var sum float64
	for _, f := range fams {
		if f.GetName() == name {
			for _, m := range f.GetMetric() {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}
