package election_test

// Attempts to break rebalancing (election.Config.Rebalance) on real
// embedded etcd, with faults injected between a move's plan and its Txn:
// no two servers act for one app at once, one change of the live-server
// set moves an app at most once, a server that has not been a member for
// the settle delay is given nothing, and every app ends up acting
// somewhere.

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/election"
	"github.com/batonhq/baton/internal/testutil"
)

// rebalancing is a node option: Rebalance on, with settle and rate.
func rebalancing(settle time.Duration, rate float64) nodeOption {
	return withConfig(func(cfg *election.Config) {
		cfg.Rebalance = true
		cfg.RebalanceSettle = settle
		cfg.RebalanceRate = rate
	})
}

// electOn elects app on n, which must win it, and waits until n acts.
func electOn(t testing.TB, c *cluster, n *node, app int64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	addr, err := n.el.Elect(ctx, app, coord.ProtocolHTTP, "")
	if err != nil || addr != n.addr {
		t.Fatalf("Elect %d on %s = %q, %v; want %s", app, n.id, addr, err, n.addr)
	}
	if !c.rec.wait(10*time.Second, func([]event) bool {
		o := c.rec.owners()[app]
		return len(o) == 1 && o[0] == n.id
	}) {
		t.Fatalf("%s does not act for app %d after winning it", n.id, app)
	}
}

// cordonMember rewrites n's membership record in place, under its lease,
// with Cordoned set, as server.Node.Cordon does.
func cordonMember(c *cluster, n *node) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	key, err := c.keys.Server(n.id)
	if err != nil {
		return err
	}
	resp, err := c.etcd.Client().Get(ctx, key)
	if err != nil {
		return err
	}
	if len(resp.Kvs) == 0 {
		return errors.New("no membership key")
	}
	rec, err := coord.DecodeServerRecord(resp.Kvs[0].Value)
	if err != nil {
		return err
	}
	rec.Cordoned = true
	val, err := rec.Encode()
	if err != nil {
		return err
	}
	_, err = c.etcd.Client().Put(ctx, key, string(val), clientv3.WithLease(clientv3.LeaseID(resp.Kvs[0].Lease)))
	return err
}

// acquisitionsBy returns the acquisitions of app by server in events.
func acquisitionsBy(events []event, server string, app int64) []event {
	var out []event
	for _, ev := range events {
		if ev.kind == "acquire" && ev.server == server && ev.app == app {
			out = append(out, ev)
		}
	}
	return out
}

// acquisitionsOf returns every acquisition of app, in order, as
// "server@token".
func acquisitionsOf(events []event, app int64) []string {
	var out []string
	for _, ev := range events {
		if ev.kind == "acquire" && ev.app == app {
			out = append(out, ev.server+"@"+strconv.FormatInt(ev.token, 10))
		}
	}
	return out
}

// BREAK: one change of the set moves the app twice. X ranks t, a, b; a
// owns it. t joins; once the set has settled, a plans to move X to t and
// stops acting for it. Right before a's Txn, t is cordoned (or leaves).
// The Txn fails (t's membership key changed) and a falls back to
// HandOver's release: X goes to a's successor excluding a, which is b —
// although, with t cordoned or gone, a itself is X's preferred server.
// After the settle delay b moves X back to a. One change of the set has
// moved X twice (a→b→a), and b got X at once, with no settle delay after
// the change.
func TestBreakRebalanceTargetChangesMidMoveMovesTheAppTwice(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(c *cluster, tn *node) error
	}{
		{"cordoned", cordonMember},
		{"left", func(c *cluster, tn *node) error { tn.close(); return nil }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const settle = time.Second
			c := newCluster(t, 1, time.Second)
			app := c.appRanked(t, "t", "a", "b")
			var hook atomic.Pointer[func()]
			a := c.addNode("a", rebalancing(settle, 1), withClient(ownerTxnHook(t, &hook, c.keys.Owner(app))))
			c.addNode("b", rebalancing(settle, 1))
			electOn(t, c, a, app)

			fired := make(chan error, 1)
			var tn *node
			f := func() { fired <- tc.change(c, tn) } // on a's rebalancer, right before its move's Txn
			tn = c.addNode("t", rebalancing(settle, 1))
			hook.Store(&f)
			var changed time.Time
			select {
			case err := <-fired:
				if err != nil {
					t.Fatalf("changing t: %v", err)
				}
				changed = time.Now()
			case <-time.After(20 * time.Second):
				t.Fatal("a never tried to move X to t")
			}

			// With t cordoned or gone, a is X's preferred server: X must end
			// up acting on a, and b must never have had it.
			if !c.rec.wait(15*time.Second, func([]event) bool {
				o := c.rec.owners()[app]
				id, _ := c.ownerOf(t, app)
				return len(o) == 1 && o[0] == "a" && id == "a"
			}) {
				id, tok := c.ownerOf(t, app)
				t.Fatalf("X does not end up acting on a: acting %v, key names %s@%d", c.rec.owners()[app], id, tok)
			}
			events := c.rec.snapshot()
			t.Logf("acquisitions of X: %v", acquisitionsOf(events, app))
			for _, ev := range acquisitionsBy(events, "b", app) {
				t.Errorf("b acquired X (token %d) %v after t was %s: that change moved X a→b, then b→a — twice for one change, and to b with no settle delay",
					ev.token, ev.at.Sub(changed).Round(time.Millisecond), tc.name)
			}
			c.rec.expectClean(t)
		})
	}
}

// BREAK: a flapping server gets an app. X ranks f, b, a. a owns X; b
// joins, and once the set has settled a moves X to b. Right before that
// move's Txn, f joins. The Txn fails (f's membership key is newer than
// a's plan), a waits for its view to show f and hands X over as HandOver
// does: to its successor excluding itself, f — which has been a member
// for milliseconds. f then leaves again, well within the settle delay,
// taking X through one more move. The contract: a server is given apps
// only once the set has been unchanged for RebalanceSettle, and a
// flapping server moves nothing.
func TestBreakRebalanceJoinBetweenPlanAndTxnGivesTheJoinerAnAppAtOnce(t *testing.T) {
	const settle = 2 * time.Second
	c := newCluster(t, 1, time.Second)
	app := c.appRanked(t, "f", "b", "a")
	var hook atomic.Pointer[func()]
	a := c.addNode("a", rebalancing(settle, 1), withClient(ownerTxnHook(t, &hook, c.keys.Owner(app))))
	electOn(t, c, a, app)

	fire, joined := make(chan struct{}), make(chan struct{})
	f := func() { // on a's rebalancer, right before its move's Txn
		close(fire)
		select {
		case <-joined:
		case <-time.After(15 * time.Second):
		}
	}
	hook.Store(&f)
	c.addNode("b", rebalancing(settle, 1))
	select {
	case <-fire:
	case <-time.After(20 * time.Second):
		t.Fatal("a never tried to move X to b")
	}
	fn := c.addNode("f", rebalancing(settle, 1))
	joinedAt := time.Now()
	close(joined)

	// f leaves again once it has X, or after half the settle delay at the
	// latest: a flapping server.
	c.rec.wait(settle/2, func([]event) bool { return len(acquisitionsBy(c.rec.snapshot(), "f", app)) > 0 })
	events := c.rec.snapshot()
	fn.close()
	left := time.Since(joinedAt)

	if !c.rec.wait(15*time.Second, func([]event) bool {
		o := c.rec.owners()[app]
		id, _ := c.ownerOf(t, app)
		return len(o) == 1 && o[0] == id
	}) {
		id, tok := c.ownerOf(t, app)
		t.Fatalf("X does not end up acting anywhere: acting %v, key names %s@%d", c.rec.owners()[app], id, tok)
	}
	t.Logf("acquisitions of X: %v; f was a member for %v", acquisitionsOf(c.rec.snapshot(), app), left.Round(time.Millisecond))
	for _, ev := range acquisitionsBy(events, "f", app) {
		t.Errorf("f acquired X (token %d) %v after joining, before the %v settle delay; f left again %v after joining",
			ev.token, ev.at.Sub(joinedAt).Round(time.Millisecond), settle, left.Round(time.Millisecond))
	}
	c.rec.expectClean(t)
}

// BREAK (scale): a rebalancing move puts every app of a tick in one Txn.
// At RebalanceRate × owned apps ≥ 1270 per second a tick's batch has
// more than 126 apps, so the Txn has more than etcd's default 128
// comparisons (--max-txn-ops) and etcd refuses it: every such move fails
// and goes the fallback way (HandOver's release, in batches of 64,
// without the compare of the membership view's revision that keeps a
// move from going to a server that joined after the plan). The apps
// still move, but none by the guarded transfer the design describes.
// 1400 apps on a, b joins, rate 1: a's rebalanced_total counts the apps
// moved by rebalancing's own transfer.
func TestBreakRebalanceBatchAboveEtcdTxnLimit(t *testing.T) {
	if testing.Short() {
		t.Skip("1400 apps")
	}
	const settle = 500 * time.Millisecond
	c := newCluster(t, 1, 2*time.Second)
	reg := prometheus.NewRegistry()
	a := c.addNode("a", withConfig(func(cfg *election.Config) {
		cfg.Rebalance, cfg.RebalanceSettle, cfg.RebalanceRate = true, settle, 1
		cfg.Registerer = reg
	}))
	apps := c.registerN(t, 1400)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	work := make(chan int64)
	errs := make(chan error, len(apps))
	for range 8 {
		wg.Go(func() {
			for app := range work {
				if _, err := a.el.Elect(ctx, app, coord.ProtocolHTTP, ""); err != nil {
					errs <- err
				}
			}
		})
	}
	for _, app := range apps {
		work <- app
	}
	close(work)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("elect on a: %v", err)
	}
	if !c.rec.wait(20*time.Second, func([]event) bool { return len(a.el.Owned()) == len(apps) }) {
		t.Fatalf("a acts for %d of %d apps", len(a.el.Owned()), len(apps))
	}
	b := c.addNode("b", rebalancing(settle, 1))
	want := 0
	for _, app := range apps {
		if s, _ := coord.Successor(app, []string{"a", "b"}); s == "b" {
			want++
		}
	}
	if !c.rec.wait(40*time.Second, func([]event) bool { return len(b.el.Owned()) == want }) {
		t.Fatalf("b acts for %d of the %d apps it is preferred for", len(b.el.Owned()), want)
	}
	// The last move is counted once its Txn answers, which can be just
	// after b's watch showed it: wait for the count, then compare.
	var moved float64
	testutil.Eventually(t, 5*time.Second, "a to count its last move", func() bool {
		moved = testutil.Metric(t, reg, "baton_election_rebalanced_total", "")
		return int(moved) >= want
	})
	t.Logf("%d apps moved to b; a's rebalanced_total = %v", want, moved)
	if int(moved) != want {
		t.Errorf("only %v of the %d apps moved by rebalancing's guarded transfer; the others went the fallback way (etcd: too many operations in txn request)", moved, want)
	}
	c.rec.expectClean(t)
}

// PIN: a fault right before a rebalancing move's Txn leaves a. X ranks t,
// a, b; a owns it; t joins and, once the set has settled, a moves X to t.
// Whatever the fault — the response lost, the source or the target cut
// off from etcd (briefly, or past its lease), crashed, or its lease gone —
// no two servers act for X at once, tokens only grow, and X ends up
// acting on the server its key names.
func TestBreakRebalanceFaultRightBeforeTheMoveTxn(t *testing.T) {
	const ttl, settle = time.Second, 500 * time.Millisecond
	for _, tc := range []struct {
		name string
		// fault runs in the test's goroutine while a's move waits to send
		// its Txn; heal (if not nil) runs after hold.
		fault func(t *testing.T, c *cluster, a, tn *node) (heal func())
		hold  time.Duration
	}{
		{"response lost", func(t *testing.T, c *cluster, a, tn *node) func() {
			a.proxy.PauseRx()
			a.proxy.ModifyRx(breakConnectionOnce())
			return a.proxy.UnpauseRx
		}, 100 * time.Millisecond},
		{"source cut off briefly", func(t *testing.T, c *cluster, a, tn *node) func() { return c.cutOff(t, a) }, 600 * time.Millisecond},
		{"source cut off past its lease", func(t *testing.T, c *cluster, a, tn *node) func() { return c.cutOff(t, a) }, 3 * ttl},
		{"source's lease revoked", func(t *testing.T, c *cluster, a, tn *node) func() {
			if _, err := c.etcd.Client().Revoke(context.Background(), a.session.Lease()); err != nil {
				t.Fatal(err)
			}
			return nil
		}, 0},
		{"target cut off briefly", func(t *testing.T, c *cluster, a, tn *node) func() { return c.cutOff(t, tn) }, 600 * time.Millisecond},
		{"target cut off past its lease", func(t *testing.T, c *cluster, a, tn *node) func() { return c.cutOff(t, tn) }, 3 * ttl},
		{"target crashed", func(t *testing.T, c *cluster, a, tn *node) func() {
			crash(tn)
			c.pinger.setDown(tn.addr, true)
			return nil
		}, 0},
		{"target's lease revoked", func(t *testing.T, c *cluster, a, tn *node) func() {
			if _, err := c.etcd.Client().Revoke(context.Background(), tn.session.Lease()); err != nil {
				t.Fatal(err)
			}
			return nil
		}, 0},
		{"source drains", func(t *testing.T, c *cluster, a, tn *node) func() {
			done := make(chan struct{})
			go func() {
				defer close(done)
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				if err := a.el.Close(ctx); err != nil {
					t.Errorf("a's Close during its move: %v", err)
				}
				a.session.Close(ctx)
			}()
			return func() { <-done }
		}, 0},
		{"another server elects over the source", func(t *testing.T, c *cluster, a, tn *node) func() {
			c.pinger.setDown(a.addr, true)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			b := c.node("b")
			if addr, err := b.el.Elect(ctx, c.rec.anyApp(), coord.ProtocolHTTP, ""); err != nil || addr != b.addr {
				t.Errorf("Elect on b = %q, %v; want b", addr, err)
			}
			return func() { c.pinger.setDown(a.addr, false) }
		}, 0},
		{"another server places over the source", func(t *testing.T, c *cluster, a, tn *node) func() {
			c.pinger.setDown(a.addr, true)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			b := c.node("b")
			if _, err := b.el.Place(ctx, c.rec.anyApp(), coord.ProtocolHTTP, ""); err != nil {
				t.Errorf("Place on b: %v", err)
			}
			return func() { c.pinger.setDown(a.addr, false) }
		}, 0},
		{"target drains", func(t *testing.T, c *cluster, a, tn *node) func() {
			done := make(chan struct{})
			go func() { defer close(done); tn.close() }()
			return func() { <-done }
		}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t, 1, ttl)
			app := c.appRanked(t, "t", "a", "b")
			var hook atomic.Pointer[func()]
			a := c.addNode("a", rebalancing(settle, 1), viaProxy(), withClient(ownerTxnHook(t, &hook, c.keys.Owner(app))))
			c.addNode("b", rebalancing(settle, 1))
			electOn(t, c, a, app)
			fire, applied := make(chan struct{}), make(chan struct{})
			f := func() { // on a's rebalancer, right before its move's Txn
				close(fire)
				select {
				case <-applied:
				case <-time.After(15 * time.Second):
				}
			}
			hook.Store(&f)
			tn := c.addNode("t", rebalancing(settle, 1), viaProxy())
			select {
			case <-fire:
			case <-time.After(20 * time.Second):
				t.Fatal("a never tried to move X to t")
			}
			heal := tc.fault(t, c, a, tn)
			close(applied)
			if heal != nil {
				<-time.After(tc.hold) // the fault's duration
				heal()
			}
			if !c.rec.wait(20*time.Second, func([]event) bool {
				o := c.rec.owners()[app]
				id, _ := c.ownerOf(t, app)
				return len(o) == 1 && o[0] == id
			}) {
				id, tok := c.ownerOf(t, app)
				t.Fatalf("X does not end up acting where its key says: acting %v, key names %s@%d", c.rec.owners()[app], id, tok)
			}
			t.Logf("acquisitions of X: %v", acquisitionsOf(c.rec.snapshot(), app))
			c.rec.expectClean(t)
		})
	}
}

// PIN: etcd leader loss, twice (the second during the recovery from the
// first), while two servers move 200 apps to two joiners. No two servers
// act for an app at once, tokens only grow, and every app ends up acting
// on its preferred server of the four.
func TestBreakRebalanceLeaderLossDuringMoves(t *testing.T) {
	const settle = 500 * time.Millisecond
	c := newCluster(t, 3, 2*time.Second)
	a := c.addNode("a", rebalancing(settle, 0.1))
	b := c.addNode("b", rebalancing(settle, 0.1))
	apps := c.registerN(t, 200)
	for i, app := range apps {
		n := a
		if i%2 == 1 {
			n = b
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if _, err := n.el.Elect(ctx, app, coord.ProtocolHTTP, ""); err != nil {
			cancel()
			t.Fatalf("elect %d on %s: %v", app, n.id, err)
		}
		cancel()
	}
	// a and b may already be moving apps between themselves: wait until
	// every app acts.
	if !c.rec.wait(30*time.Second, func([]event) bool { return len(c.rec.owners()) == len(apps) }) {
		t.Fatalf("%d of %d apps act", len(c.rec.owners()), len(apps))
	}
	mark := len(c.rec.snapshot())
	c.addNode("c", rebalancing(settle, 0.1))
	c.addNode("d", rebalancing(settle, 0.1))
	if !c.rec.wait(20*time.Second, func(evs []event) bool {
		n := 0
		for _, ev := range evs[mark:] {
			if ev.kind == "acquire" && (ev.server == "c" || ev.server == "d") {
				n++
			}
		}
		return n >= 5
	}) {
		t.Fatal("no moves to the joiners")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
	defer cancel()
	first, err := c.etcd.StopLeader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	<-time.After(time.Second) // the first fault's duration
	if err := c.etcd.Restart(ctx, first); err != nil {
		t.Fatal(err)
	}
	second, err := c.etcd.StopLeader(ctx) // during the recovery from the first
	if err != nil {
		t.Fatal(err)
	}
	<-time.After(time.Second)
	if err := c.etcd.Restart(ctx, second); err != nil {
		t.Fatal(err)
	}
	ids := []string{"a", "b", "c", "d"}
	if !c.rec.wait(40*time.Second, func([]event) bool {
		owners := c.rec.owners()
		for _, app := range apps {
			want, _ := coord.Successor(app, ids)
			if o := owners[app]; len(o) != 1 || o[0] != want {
				return false
			}
		}
		return true
	}) {
		owners := c.rec.owners()
		wrong := 0
		for _, app := range apps {
			want, _ := coord.Successor(app, ids)
			if o := owners[app]; len(o) != 1 || o[0] != want {
				wrong++
				if wrong < 5 {
					id, tok := c.ownerOf(t, app)
					t.Logf("app %d: acting %v, preferred %s, key names %s@%d", app, o, want, id, tok)
				}
			}
		}
		t.Fatalf("%d of %d apps not acting on their preferred server", wrong, len(apps))
	}
	c.rec.expectClean(t)
}

// anyApp returns the app of the first event recorded (the tests here
// have one app).
func (r *recorder) anyApp() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.events[0].app
}
