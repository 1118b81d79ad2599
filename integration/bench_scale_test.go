package integration

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/etcdcluster"
	"github.com/batonhq/baton/internal/keyspace"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
	"github.com/batonhq/baton/server/servertest"
	"github.com/batonhq/baton/worker"
)

// BenchmarkScale: 10 servers on an embedded 3-member etcd with etcd's own
// timings (100 ms heartbeat, 1 s election timeout, fsync), one watching
// worker Discovery per app. "proxied": the workers share 100 etcd clients
// that reach etcd through 10 in-process gRPC proxies (10 clients each), the
// large-fleet deployment; "direct": the same 100 clients dial the members.
// Reports, per size: etcd's watch streams and watchers (its own gauges),
// cold start apps/s, heap bytes per app on the servers and per Discovery,
// the whole process's CPU seconds per second while idle (etcd, servers
// and workers share this process), and for the crash of one server and
// then the drain of another: the time until every one of its apps acts
// elsewhere (p100, from the crash or the start of Close) and until its
// apps' workers follow (p99, p100). Run with -benchtime=1x.
//
// By default it runs 1,000 apps; BATON_BENCH_SCALE=10k, 30k (10k and 30k)
// or 100k (all three) runs the sizes, which a 2-core machine does
// not carry (README, "Scale"). Each phase prints its duration to stderr
// as it ends; with BATON_BENCH_LOG=warn (or debug) the servers log to
// stderr and a failover prints its progress every second.
//
// Why etcd's own timings: the tests' fast ones (a 100 ms election
// timeout) made the members, sharing 2 cores with 10,000 workers, lose
// their leader over and over; each loss cancels every require-leader
// watch, and 10,000 workers watching again at once kept etcd from ever
// settling. A production etcd does not run with such timings.
func BenchmarkScale(b *testing.B) {
	var sizes []int
	switch os.Getenv("BATON_BENCH_SCALE") {
	case "":
		sizes = []int{1000}
	case "10k":
		sizes = []int{10000}
	case "30k":
		sizes = []int{10000, 30000}
	default:
		sizes = []int{10000, 30000, 100000}
	}
	for _, apps := range sizes {
		for _, mode := range []string{"proxied", "direct"} {
			b.Run(fmt.Sprintf("apps=%d/%s", apps, mode), func(b *testing.B) {
				for range b.N {
					scaleRun(b, apps, mode == "proxied")
				}
			})
		}
	}
}

const (
	scaleServers = 10
	scaleProxies = 10
	scaleClients = 100
)

func scaleRun(b *testing.B, apps int, proxied bool) {
	phase := time.Now()
	done := func(what string) {
		fmt.Fprintf(os.Stderr, "scale: apps=%d proxied=%v: %s in %v\n", apps, proxied, what, time.Since(phase).Round(time.Millisecond))
		phase = time.Now()
	}
	e := testutil.EtcdWith(b, etcdcluster.Config{Members: 3})
	bc := newBenchClusterOn(b, e, scaleServers)
	ids := registerMany(b, bc, apps)
	done("etcd, servers and registration")

	heap0, _ := heapAndGoroutines()
	start := time.Now()
	placeFromAll(b, bc.nodes, ids)
	b.ReportMetric(float64(apps)/time.Since(start).Seconds(), "cold-apps/s")
	done("cold start")
	heap1, _ := heapAndGoroutines()
	b.ReportMetric(float64(heap1-heap0)/float64(apps), "server-B/app")

	var endpoints [][]string
	for range scaleProxies {
		if !proxied {
			endpoints = append(endpoints, e.Endpoints())
			continue
		}
		p, err := e.StartGRPCProxy()
		if err != nil {
			b.Fatal(err)
		}
		endpoints = append(endpoints, []string{p.Endpoint()})
	}
	var clients []*clientv3.Client
	for i := range scaleClients {
		clients = append(clients, testutil.Client(b, e, endpoints[i%len(endpoints)]...))
	}
	w0, s0 := etcdWatchGauges(b)
	// One HTTP client for all: a connection of its own per worker, as
	// worker processes have, would take two of this process's file
	// descriptors each (both ends are here).
	tr := &http.Transport{MaxConnsPerHost: 64, MaxIdleConnsPerHost: 64}
	b.Cleanup(tr.CloseIdleConnections)
	// The workers start spread over one polling interval (10 s), as a
	// fleet's processes do, with the worker's default RequestTimeout
	// (3 s). All at once they do not start on this machine: 10,000
	// linearizable reads sent together take about 1.7 s through the
	// proxies on 2 cores, and etcd answers such a batch together, so with
	// the 1 s timeout the other benchmarks use every one of them failed
	// (10,000 of 10,000), and with 3 s the retries and the servers' lease
	// rounds starved each other for minutes.
	fc := fleetConfig{N: apps, App: func(i int) string { return fmt.Sprintf("app-%d", i) }, Clients: clients, Servers: bc.addrs(),
		HTTPClient: &http.Client{Transport: tr}, RequestTimeout: worker.DefaultConfig().RequestTimeout, Stagger: true}
	// The workers' metrics, only for BATON_BENCH_LOG's picture of a
	// failover: they would count in the workers' bytes.
	workers := prometheus.NewRegistry()
	if os.Getenv("BATON_BENCH_LOG") != "" {
		fc.Registerer = workers
	}
	f := startFleet(b, fc)
	done("fleet start")
	heap2, _ := heapAndGoroutines()
	b.ReportMetric(float64(heap2-heap1)/float64(apps), "worker-B/app")
	b.ReportMetric(idleCPU(b, 10*time.Second), "idle-cpu-s/s")
	done("idle window")
	// After the idle window, not right after the starts: a Start returns
	// once the worker has read its owner key, and its watch follows in
	// the background, later through a proxy than direct.
	watchers, streams := etcdWatchGauges(b)
	b.ReportMetric(watchers-w0, "etcd-watchers")
	b.ReportMetric(streams-s0, "etcd-watch-streams")

	byApp := map[int64]int{} // app id → worker index
	for i, id := range ids {
		byApp[id] = i
	}
	crashed, drained, others := bc.nodes[0], bc.nodes[1], bc.nodes[2:]
	scaleFailover(b, e.Client(), f, workers, byApp, crashed, append([]*server.Node{drained}, others...), "crash", func() { servertest.Crash(crashed) })
	done("crash")
	scaleFailover(b, e.Client(), f, workers, byApp, drained, others, "drain", func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := drained.Close(ctx); err != nil {
			b.Errorf("drain: %v", err)
		}
	})
}

// placeFromAll asks for every app once, app i of nodes[i%len(nodes)], with 16
// callers per node, as workers listing the servers in different orders
// do: each app is placed on its preferred server (Balance is on), so
// rebalancing has nothing to move. It waits until every app is acted for.
func placeFromAll(b *testing.B, nodes []*server.Node, ids []int64) {
	work := make(chan int, len(ids))
	for i := range ids {
		work <- i
	}
	close(work)
	var wg sync.WaitGroup
	for range 16 * len(nodes) {
		wg.Go(func() {
			for i := range work {
				if _, err := nodes[i%len(nodes)].Elector().Place(context.Background(), ids[i], coord.ProtocolHTTP, ""); err != nil {
					b.Errorf("place app %d: %v", ids[i], err)
				}
			}
		})
	}
	wg.Wait()
	deadline := time.Now().Add(60 * time.Second)
	for {
		total := 0
		for _, n := range nodes {
			total += len(n.Elector().Owned())
		}
		if total == len(ids) {
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("%d of %d apps acted for", total, len(ids))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// scaleFailover takes gone's apps away (stop: a crash or a drain) and
// reports when the last of them acts on one of others and when their
// workers follow, both measured from the start of stop.
func scaleFailover(b *testing.B, cli *clientv3.Client, f *fleet, workers prometheus.Gatherer, byApp map[int64]int, gone *server.Node, others []*server.Node, name string, stop func()) {
	var affected []int64
	for _, o := range gone.Elector().Owned() {
		affected = append(affected, o.App)
	}
	if len(affected) == 0 {
		scaleFail(b, "%s: %s owns no app", name, gone.ID())
		return
	}
	owned := func() int {
		total := 0
		for _, n := range others {
			for _, app := range affected {
				if _, ok := n.Elector().Ownership(app); ok {
					total++
				}
			}
		}
		return total
	}
	start := time.Now()
	var acting time.Duration
	var wg sync.WaitGroup
	trace := os.Getenv("BATON_BENCH_LOG") != ""
	wg.Go(func() {
		lastTrace := start
		for owned() < len(affected) {
			if trace && time.Since(lastTrace) >= time.Second {
				lastTrace = time.Now()
				fmt.Fprintf(os.Stderr, "scale: %s +%v: %s\n", name, time.Since(start).Round(time.Millisecond), scaleProgress(b, workers, others, owned(), len(affected)))
			}
			if time.Since(start) > 60*time.Second {
				scaleFail(b, "%s: %d of %d apps act elsewhere after 60 s; %s", name, owned(), len(affected), notActing(cli, others, affected))
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
		acting = time.Since(start)
	})
	stop()
	wg.Wait()
	b.ReportMetric(float64(len(affected)), name+"-apps")
	b.ReportMetric(acting.Seconds(), name+"-p100-acting-s")

	var follow []time.Duration
	deadline := time.Now().Add(60 * time.Second)
	for _, app := range affected {
		i := byApp[app]
		for {
			f.mu.Lock()
			now := f.now[i]
			f.mu.Unlock()
			if now.addr != "" && now.addr != gone.Addr() {
				follow = append(follow, now.at.Sub(start))
				break
			}
			if time.Now().After(deadline) {
				scaleFail(b, "%s: worker of app %d still at %s after 60 s", name, app, now.addr)
				return
			}
			time.Sleep(time.Millisecond)
		}
	}
	b.ReportMetric(percentile(follow, 0.99).Seconds(), name+"-p99-workers-s")
	b.ReportMetric(percentile(follow, 1).Seconds(), name+"-p100-workers-s")
}

// scaleProgress is a one-line picture of a failover in progress, for
// BATON_BENCH_LOG: apps acting elsewhere, etcd's leader changes so far,
// the servers whose guard is unconfirmed, and the workers watching etcd
// and their HTTP requests so far.
func scaleProgress(b *testing.B, workers prometheus.Gatherer, nodes []*server.Node, owned, affected int) string {
	var unconfirmed []string
	for _, n := range nodes {
		if n.Elector().Healthy() != nil {
			unconfirmed = append(unconfirmed, n.ID())
		}
	}
	return fmt.Sprintf("%d of %d acting; etcd leader changes %v; unconfirmed %v; workers watching %v, HTTP requests %v, rounds found %v failed %v",
		owned, affected,
		testutil.Metric(b, prometheus.DefaultGatherer, "etcd_server_leader_changes_seen_total", ""),
		unconfirmed,
		testutil.Metric(b, workers, "baton_worker_watching", ""),
		testutil.Metric(b, workers, "baton_worker_http_requests_total", ""),
		testutil.Metric(b, workers, "baton_worker_rounds_total", "found"),
		testutil.Metric(b, workers, "baton_worker_rounds_total", "failed"))
}

// notActing describes the first few of apps that act on none of nodes:
// what each node's table shows for the app, and whether it holds an
// ownership that is not acting.
func notActing(cli *clientv3.Client, nodes []*server.Node, apps []int64) string {
	keys, _ := keyspace.New(prefix)
	var out []string
	for _, app := range apps {
		acting := false
		for _, n := range nodes {
			if _, ok := n.Elector().Ownership(app); ok {
				acting = true
			}
		}
		if acting {
			continue
		}
		var views []string
		for _, n := range nodes {
			succ, _ := n.Elector().Successor(app)
			views = append(views, fmt.Sprintf("%s: successor %s, healthy %v", n.ID(), succ.ServerID, n.Elector().Healthy()))
		}
		key := "no key"
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if resp, err := cli.Get(ctx, keys.Owner(app)); err != nil {
			key = err.Error()
		} else if len(resp.Kvs) > 0 {
			key = fmt.Sprintf("key at %d lease %x: %s", resp.Kvs[0].ModRevision, resp.Kvs[0].Lease, resp.Kvs[0].Value)
		}
		cancel()
		out = append(out, fmt.Sprintf("app %d (%s; %s)", app, key, strings.Join(views, "; ")))
		if len(out) == 3 {
			break
		}
	}
	return strings.Join(out, " | ")
}

// scaleFail reports a failure on stderr as well: a benchmark's log is
// cut short when the servers' and etcd's warnings fill it.
func scaleFail(b *testing.B, format string, args ...any) {
	fmt.Fprintf(os.Stderr, "scale: FAILED: "+format+"\n", args...)
	b.Errorf(format, args...)
}

// etcdWatchGauges reads etcd's own watcher and watch-stream gauges, summed
// over the members in this process.
func etcdWatchGauges(b *testing.B) (watchers, streams float64) {
	return testutil.Metric(b, prometheus.DefaultGatherer, "etcd_debugging_mvcc_watcher_total", ""),
		testutil.Metric(b, prometheus.DefaultGatherer, "etcd_debugging_mvcc_watch_stream_total", "")
}

// idleCPU is this process's CPU seconds per second of wall time over
// window, with nothing happening but the servers' rounds, keepalives and
// the workers' re-checks.
func idleCPU(b *testing.B, window time.Duration) float64 {
	cpu := func() time.Duration {
		var ru syscall.Rusage
		if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
			b.Fatal(err)
		}
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	c0, t0 := cpu(), time.Now()
	<-time.After(window) // the window itself is the measurement
	return (cpu() - c0).Seconds() / time.Since(t0).Seconds()
}
