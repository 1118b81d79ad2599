package worker_test

import (
	"context"
	"slices"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/internal/keyspace"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
	"github.com/batonhq/baton/worker"
)

func TestHundredWorkersFollowAHandover(t *testing.T) {
	e := testutil.Etcd(t, 1)
	nodes := map[string]*server.Node{}
	for _, id := range []string{"s1", "s2", "s3"} {
		nodes[id] = startNode(t, e, id, "127.0.0.1:0")
	}
	cli := testutil.Client(t, e)
	app := register(t, cli, "orders")
	first := elect(t, nodes["s1"], app)

	var workers []*recorder
	for i := 0; i < 100; i++ {
		workers = append(workers, startWorker(t, "orders", func(c *worker.Config) {
			c.Client = cli
			c.Servers = []string{nodes["s1"].Addr()}
		}))
	}
	for _, w := range workers {
		if w.current() != first {
			t.Fatalf("worker starts at %q, owner is %s", w.current(), first)
		}
	}
	var owner *server.Node
	for _, n := range nodes {
		if n.Addr() == first {
			owner = n
		}
	}
	// Stamp the new owner's put as an independent watcher sees it.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	keys, _ := keyspace.New("")
	watch := cli.Watch(ctx, keys.Owner(app))
	to, err := owner.Elector().HandOver(ctx, app)
	if err != nil {
		t.Fatal(err)
	}
	var put time.Time
	for put.IsZero() {
		for _, ev := range (<-watch).Events {
			if ev.Type == clientv3.EventTypePut {
				put = time.Now()
			}
		}
	}
	want := nodes[to].Addr()
	var lags []time.Duration
	for i, w := range workers {
		// Current moves before OnChange runs: wait for the callback.
		w.wait(t, 5*time.Second, "the worker to follow", func() bool {
			w.mu.Lock()
			defer w.mu.Unlock()
			return len(w.changes) > 0 && w.changes[len(w.changes)-1].new.Address == want
		})
		w.mu.Lock()
		changes := append([]change(nil), w.changes...)
		w.mu.Unlock()
		n, at := len(changes), changes[len(changes)-1].at
		// The first change is Start's (none → first owner); the handover
		// must add exactly one more, straight to the new owner.
		if n != 2 || changes[1].old.Address != first {
			t.Errorf("worker %d changed %d times (%+v), want once after start", i, n-1, changes)
		}
		lags = append(lags, max(at.Sub(put), 0))
	}
	slices.Sort(lags)
	t.Logf("follow latency over 100 workers, from the put: median %v, p99 %v, max %v", lags[50], lags[98], lags[99])
	// The target is 100 ms; this bound leaves room for a loaded CI machine.
	if lags[99] > time.Second {
		t.Errorf("slowest worker followed %v after the put", lags[99])
	}
	for _, w := range workers {
		if n := w.metric(t, "baton_worker_http_requests_total", ""); n > 3 {
			t.Errorf("a worker sent %v HTTP requests for one handover", n)
			break
		}
	}
}

func TestSteadyStateWithEtcdSendsNoHTTP(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n := startNode(t, e, "s1", "127.0.0.1:0")
	cli := testutil.Client(t, e)
	app := register(t, cli, "orders")
	elect(t, n, app)
	clock := testutil.NewFakeClock()
	w := startWorker(t, "orders", func(c *worker.Config) {
		c.Client = cli
		c.Servers = []string{n.Addr()}
		worker.SetClock(c, clock)
	})
	testutil.Eventually(t, 5*time.Second, "the worker to watch", func() bool {
		return w.metric(t, "baton_worker_watching", "") == 1
	})
	for i := 0; i < 30; i++ { // five minutes of 10 s intervals
		if !clock.BlockUntil(1, 5*time.Second) {
			t.Fatal("the worker is not waiting for its next round")
		}
		clock.Advance(10 * time.Second)
	}
	if got := w.metric(t, "baton_worker_http_requests_total", ""); got != 0 {
		t.Fatalf("%v HTTP requests in five idle minutes with etcd, want 0", got)
	}
	if w.metric(t, "baton_worker_watching", "") != 1 {
		t.Fatal("worker is not watching")
	}
}

func TestOwnerGoneWithNoServerIsolatesAfterExactlyThreeRounds(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n := startNode(t, e, "s1", "127.0.0.1:0")
	cli := testutil.Client(t, e)
	app := register(t, cli, "orders")
	elect(t, n, app)
	clock := testutil.NewFakeClock()
	w := startWorker(t, "orders", func(c *worker.Config) {
		c.Client = cli
		c.Servers = []string{deadAddr(t), deadAddr(t)}
		worker.SetClock(c, clock)
	})
	failedRounds := func() float64 { return w.metric(t, "baton_worker_rounds_total", "failed") }

	testutil.Eventually(t, 5*time.Second, "the worker to watch", func() bool {
		return w.metric(t, "baton_worker_watching", "") == 1
	})
	closeNode(n) // the only server: its keys go, nobody takes over
	// The deletion starts round 1 after a pause of at most 1.5 × Jitter,
	// on the worker's clock.
	advanceUntil(t, clock, "round 1 to fail", func() bool { return failedRounds() == 1 })
	for round := 2; round <= 5; round++ {
		if w.isolations() != min(max(round-3, 0), 1) {
			t.Fatalf("before round %d: %d isolations", round, w.isolations())
		}
		if !clock.BlockUntil(1, 5*time.Second) {
			t.Fatal("no round pending")
		}
		clock.Advance(10 * time.Second)
		testutil.Eventually(t, 10*time.Second, "the round to fail", func() bool { return failedRounds() == float64(round) })
		want := 0
		if round >= 3 {
			want = 1 // exactly once, at the third
		}
		if got := w.isolations(); got != want {
			t.Fatalf("after %d failed rounds: %d isolations, want %d", round, got, want)
		}
	}

	// A server appears: the next round finds it and the count resets.
	n2 := startNode(t, e, "s2", "127.0.0.1:0")
	clock.BlockUntil(1, 5*time.Second)
	clock.Advance(10 * time.Second)
	w.wait(t, 10*time.Second, "the worker to find s2", func() bool { return w.current() == n2.Addr() })

	// And it takes three more failures to isolate again.
	closeNode(n2)
	advanceUntil(t, clock, "the next failure", func() bool { return failedRounds() == 6 })
	for round := 7; round <= 8; round++ {
		clock.BlockUntil(1, 5*time.Second)
		clock.Advance(10 * time.Second)
		testutil.Eventually(t, 10*time.Second, "the round to fail", func() bool { return failedRounds() == float64(round) })
	}
	if got := w.isolations(); got != 2 {
		t.Fatalf("isolations after recovery and three new failures: %d, want 2", got)
	}
}

func TestWatchRecoversFromCompaction(t *testing.T) {
	e := testutil.Etcd(t, 1)
	nodes := []*server.Node{startNode(t, e, "s1", "127.0.0.1:0"), startNode(t, e, "s2", "127.0.0.1:0")}
	admin := testutil.Client(t, e)
	app := register(t, admin, "orders")
	owner := elect(t, nodes[0], app)

	// The worker reaches etcd through a proxy that we can take away.
	p, url := testutil.Proxy(t, e.Endpoint(0))
	cli := testutil.Client(t, e, url)
	w := startWorker(t, "orders", func(c *worker.Config) {
		c.Client = cli
		c.Servers = []string{nodes[0].Addr()}
		c.EtcdGrace = time.Hour // stay in watch mode: this test is about the watch
	})
	if w.current() != owner {
		t.Fatal("worker did not start at the owner")
	}
	p.Close() // the worker's connection breaks

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var from, to *server.Node
	for _, n := range nodes {
		if n.Addr() == owner {
			from = n
		} else {
			to = n
		}
	}
	if _, err := from.Elector().HandOver(ctx, app); err != nil {
		t.Fatal(err)
	}
	put, _ := admin.Put(ctx, "/elsewhere", "x")
	if _, err := admin.Compact(ctx, put.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
	// Bring the connection back on the same address: the watch resumes
	// from a compacted revision and must read again.
	testutil.ProxyAt(t, url, e.Endpoint(0))
	// Cleanups run last-in first-out: close the worker and its client
	// before this proxy, or the proxy waits for their connection to die.
	t.Cleanup(func() { w.discovery.Close(); cli.Close() })
	w.wait(t, 15*time.Second, "the worker to follow after compaction", func() bool { return w.current() == to.Addr() })

	// It keeps following later changes through its new watch.
	if _, err := to.Elector().HandOver(ctx, app); err != nil {
		t.Fatal(err)
	}
	w.wait(t, 5*time.Second, "the next change", func() bool { return w.current() == from.Addr() })
}

// advanceUntil moves clock forward in steps of a tenth of Jitter until
// cond holds — the worker plans its pause when its loop sees the event,
// which the test cannot observe — for at most 3 s of the clock's time,
// well short of the next Interval.
func advanceUntil(t *testing.T, clock *testutil.FakeClock, what string, cond func() bool) {
	t.Helper()
	step := worker.DefaultConfig().Jitter / 10
	deadline := time.Now().Add(10 * time.Second)
	for moved := time.Duration(0); !cond(); moved += step {
		if moved > 3*time.Second || time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		clock.Advance(step)
		wait := time.NewTimer(5 * time.Millisecond) // let the loop take what fired
		<-wait.C
	}
}
