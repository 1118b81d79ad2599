package election_test

// A reviewer's attempts to break the re-sent progress requests and the
// owner watch's stream handling, on real embedded etcd. The two
// namespaced-client tests broke an intermediate version (010d4ff) that
// gave each watch generation a raw clientv3.NewWatcher, bypassing the
// client's wrapped Watcher; the owner watch uses the client's own again.

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/namespace"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/testutil"
)

// nsClient is a node's client in etcd's own multi-tenant idiom: KV,
// Watcher and Lease wrapped by go.etcd.io/etcd/client/v3/namespace, so
// that every key the node reads, writes or watches lives under ns.
func nsClient(t testing.TB, c *cluster, ns string) func([]string) *clientv3.Client {
	return func(endpoints []string) *clientv3.Client {
		cli := testutil.Client(t, c.etcd, endpoints...)
		cli.KV = namespace.NewKV(cli.KV, ns)
		cli.Watcher = namespace.NewWatcher(cli.Watcher, ns)
		cli.Lease = namespace.NewLease(cli.Lease, ns)
		return cli
	}
}

// registerAndElect registers an app through n's own client (a namespaced
// one writes under its namespace) and elects n for it.
func registerAndElect(t *testing.T, c *cluster, n *node, name string) coord.AppRecord {
	t.Helper()
	reg := testutil.Must(coord.NewRegistry(n.cli, c.keys.Prefix()))
	app, err := reg.Register(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := n.el.Elect(ctx, app.ID, coord.ProtocolHTTP, ""); err != nil {
		t.Fatalf("elect: %v", err)
	}
	return app
}

// A server whose client is namespaced (etcd's documented way to share a
// cluster between tenants) reads, writes, leases and watches everything
// through that client. An owner watch from clientv3.NewWatcher(cli) — a
// raw Watcher on the client's connection — bypasses cli.Watcher and with
// it the namespace: the watch covers the un-prefixed range, sees none of
// the server's owner keys, yet answers progress requests, so rounds
// confirm.
//
// Liveness: the server's own election writes its key, but the owner watch
// never shows it, so the ownership never acts.
func TestBreakProgressNamespacedServerActsAfterItsElection(t *testing.T) {
	c := newCluster(t, 1, time.Second)
	a := c.addNode("a", withClient(nsClient(t, c, "/tenant")))
	app := registerAndElect(t, c, a, "ns-app")
	if !c.rec.wait(5*time.Second, func([]event) bool { return len(a.el.Owned()) == 1 }) {
		t.Fatalf("a wrote its owner key (app %d) but does not act for it 5 s later; guard confirmed: %v", app.ID, a.session.Check())
	}
}

// Safety: a namespaced server that does act (its table read by a fresh
// watch generation, as after its guard fired) is displaced by another
// server; its owner watch never shows the overwrite, its rounds confirm
// on progress notifications, and it acts on with a confirmed guard while
// its key names another server.
func TestBreakProgressNamespacedServerSeesItsDeposition(t *testing.T) {
	c := newCluster(t, 1, time.Second)
	a := c.addNode("a", withClient(nsClient(t, c, "/tenant")))
	b := c.addNode("b", withClient(nsClient(t, c, "/tenant")))
	app := registerAndElect(t, c, a, "ns-app")
	// Whatever makes a's table show its key: its watch, or a restart.
	if !c.rec.wait(2*time.Second, func([]event) bool { return len(a.el.Owned()) == 1 }) {
		t.Log("a does not act after its election; restarting its owner watch (as its guard firing would)")
		a.el.Rewatch()
		if !c.rec.wait(5*time.Second, func([]event) bool { return len(a.el.Owned()) == 1 }) {
			t.Fatal("a does not act even after a fresh owner watch")
		}
	}
	// a stops answering pings: b overwrites its live key.
	c.pinger.setDown(a.addr, true)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := b.el.Elect(ctx, app.ID, coord.ProtocolHTTP, ""); err != nil {
		t.Fatalf("b's takeover: %v", err)
	}
	resp, err := b.cli.Get(ctx, c.keys.Owner(app.ID))
	if err != nil || len(resp.Kvs) == 0 {
		t.Fatalf("owner key after the takeover: %v %v", resp, err)
	}
	rec, _ := coord.DecodeOwnerRecord(resp.Kvs[0].Value)
	if rec.ServerID != "b" {
		t.Fatalf("owner key names %q after b's takeover", rec.ServerID)
	}
	deposedAt := time.Now()
	// a's watch must show the overwrite: a stops acting (well within a
	// TTL — its next confirmed round is past the write).
	if !c.rec.wait(3*time.Second, func([]event) bool { return len(a.el.Owned()) == 0 }) {
		t.Fatalf("%v after b overwrote its key (token %d), a still acts for app %d and its guard confirms (Check: %v, deadline in %v)",
			time.Since(deposedAt).Round(time.Millisecond), resp.Kvs[0].ModRevision, app.ID, a.session.Check(), time.Until(a.session.Epoch().Deadline()).Round(time.Millisecond))
	}
}

// etcd leader loss cancels every require-leader watch: each owner watch
// generation breaks and is replaced while rounds re-send progress
// requests into it every ~80 ms (hammered here from outside as well).
// Afterwards every app acts on its owner again, ownerships never
// overlapped, and etcd holds no more watch streams than before (the
// package's goleak check covers the client side).
func TestBreakProgressLeaderChurnLeavesNoStreamsAndOwnersAct(t *testing.T) {
	c := newCluster(t, 3, time.Second)
	a := c.addNode("a")
	b := c.addNode("b")
	apps := c.registerN(t, 4)
	electAll(t, c, a, apps[:2])
	electAll(t, c, b, apps[2:])
	justConfirmed(t, a)
	justConfirmed(t, b)
	streams := func() float64 {
		return testutil.Metric(t, prometheus.DefaultGatherer, "etcd_debugging_mvcc_watch_stream_total", "")
	}
	before := streams()

	hctx, hcancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for _, n := range []*node{a, b} {
		for range 2 {
			wg.Go(func() {
				for hctx.Err() == nil {
					rctx, rcancel := context.WithTimeout(hctx, 50*time.Millisecond)
					_ = n.el.RequestProgress(rctx)
					rcancel()
				}
			})
		}
	}
	for round := range 2 {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		stopped, err := c.etcd.StopLeader(ctx)
		if err != nil {
			cancel()
			t.Fatal(err)
		}
		if _, err := c.etcd.Leader(ctx); err != nil {
			cancel()
			t.Fatal(err)
		}
		if err := c.etcd.Restart(ctx, stopped); err != nil {
			cancel()
			t.Fatal(err)
		}
		cancel()
		t.Logf("round %d: stopped and restarted member %d", round, stopped)
	}
	hcancel()
	wg.Wait()
	testutil.Eventually(t, 10*time.Second, "every app to act on exactly one server", func() bool {
		owners := c.rec.owners()
		for _, app := range apps {
			if len(owners[app]) != 1 {
				return false
			}
		}
		return true
	})
	t.Logf("etcd watch streams: %v before, %v after the churn", before, streams())
	testutil.Eventually(t, 10*time.Second, "etcd's watch streams back to where they were", func() bool {
		return streams() <= before
	})
	c.rec.expectClean(t)
}

// The election tests' gRPC interceptors pick the owner watch out by its
// baton-owner-watch metadata, whichever Watcher the watch runs on.
// Freezing the gated stream must still hold back the progress a round
// needs (the guard fires), and thawing it must let the server confirm
// and act again: the gate does see the owner watch.
func TestBreakProgressWatchGateStillSeesTheOwnerWatch(t *testing.T) {
	c := newCluster(t, 1, time.Second)
	gate := newWatchGate()
	a := c.addNode("a", withClient(gatedClient(t, gate, nil)))
	apps := c.registerN(t, 1)
	electAll(t, c, a, apps)
	justConfirmed(t, a)
	ep := a.session.Epoch()
	gate.freeze()
	c.register(t, "written-while-frozen") // outside the owner range: only progress proves it
	select {
	case <-ep.Done():
	case <-time.After(5 * a.session.TTL()):
		gate.thaw()
		t.Fatal("the owner watch's responses were held at the gate, yet the guard kept confirming: the gate no longer sees the owner watch")
	}
	gate.thaw()
	if !c.rec.wait(5*time.Second, func([]event) bool { return len(a.el.Owned()) == 1 }) {
		t.Fatal("a does not act again after the gate thawed")
	}
	c.rec.expectClean(t)
}

// A server behind etcd's fault-injection proxy whose connection breaks
// (clientv3 resumes the owner watch on a new gRPC stream of the same
// Watcher, from the next revision) keeps confirming, and still sees a
// deposition through the resumed watch: it stops acting within a TTL.
func TestBreakProgressResumedWatchStillShowsDeposition(t *testing.T) {
	c := newCluster(t, 1, time.Second)
	a := c.addNode("a", viaProxy())
	b := c.addNode("b")
	apps := c.registerN(t, 1)
	electAll(t, c, a, apps)
	for i := range 5 {
		justConfirmed(t, a)
		a.proxy.ModifyRx(breakConnectionOnce())
		c.register(t, fmt.Sprintf("write-%d", i))
	}
	justConfirmed(t, a)
	if !c.rec.wait(5*time.Second, func([]event) bool { return len(a.el.Owned()) == 1 }) {
		t.Fatal("a does not act after its connection breaks")
	}
	a.proxy.UnmodifyRx()
	c.pinger.setDown(a.addr, true)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := b.el.Elect(ctx, apps[0], coord.ProtocolHTTP, ""); err != nil {
		t.Fatalf("b's takeover: %v", err)
	}
	at := time.Now()
	if !c.rec.wait(3*time.Second, func([]event) bool { return len(a.el.Owned()) == 0 }) {
		t.Fatalf("a still acts %v after b overwrote its key", time.Since(at))
	}
	if !c.rec.wait(5*time.Second, func([]event) bool { return len(b.el.Owned()) == 1 }) {
		t.Fatal("b does not act after a stopped")
	}
	c.rec.expectClean(t)
}
