package election_test

// Attempts to break placement (Elector.Place) under compound faults, on
// real embedded etcd: no two servers act for one app at once, and an app
// placed anywhere ends up acting somewhere.

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/testutil"
)

// appRanked registers apps until one ranks servers in exactly order (equal
// weights), and returns it.
func (c *cluster) appRanked(t testing.TB, order ...string) int64 {
	t.Helper()
	for i := range 400 {
		app := c.register(t, fmt.Sprintf("rank-%s-%d", strings.Join(order, ""), i))[0]
		var ws []coord.Weighted
		for _, id := range order {
			ws = append(ws, coord.Weighted{ID: id, Weight: 1})
		}
		if slices.Equal(coord.RankWeighted(app, ws), order) {
			return app
		}
	}
	t.Fatalf("no app ranks %v", order)
	return 0
}

// placeOn asks n to place app and returns the id of the server it names.
func placeOn(t testing.TB, n *node, app int64) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	addr, err := n.el.Place(ctx, app, coord.ProtocolHTTP, "")
	if err != nil {
		t.Fatalf("place %d on %s: %v", app, n.id, err)
	}
	return strings.TrimSuffix(addr, ":7700")
}

// waitActing waits until exactly one server acts for app and the owner key
// names it, and returns it; it fails the test after within.
func waitActing(t testing.TB, c *cluster, app int64, within time.Duration) (string, time.Duration) {
	t.Helper()
	start := time.Now()
	var who string
	ok := c.rec.wait(within, func([]event) bool {
		o := c.rec.owners()[app]
		if len(o) != 1 {
			return false
		}
		id, _ := c.ownerOf(t, app)
		who = o[0]
		return id == o[0]
	})
	if !ok {
		id, tok := c.ownerOf(t, app)
		t.Fatalf("no server acts for app %d within %v: acting %v, key names %q (token %d)", app, within, c.rec.owners()[app], id, tok)
	}
	return who, time.Since(start)
}

// B is faulted right after A's placing Txn returned: crashed, cut off from
// etcd (paused), or blackholed. Nobody overlaps, and the app acts somewhere
// within TTL + 1 s of the fault (b's lease ends within a TTL, and the
// successor acts at once on the deletion).
func TestBreakPlacedOwnerFaultedRightAfterPlacement(t *testing.T) {
	for _, tc := range []struct {
		name  string
		fault func(t *testing.T, c *cluster, b *node)
	}{
		{"crash", func(t *testing.T, c *cluster, b *node) { crash(b); c.pinger.setDown(b.addr, true) }},
		{"cut off", func(t *testing.T, c *cluster, b *node) { c.cutOff(t, b) }},
		{"blackholed", func(t *testing.T, c *cluster, b *node) {
			b.proxy.BlackholeTx()
			b.proxy.BlackholeRx()
			c.pinger.setDown(b.addr, true)
			t.Cleanup(func() { b.proxy.UnblackholeTx(); b.proxy.UnblackholeRx(); c.pinger.setDown(b.addr, false) })
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const ttl = time.Second
			c := newCluster(t, 1, ttl)
			var hook atomic.Pointer[func()]
			// The app must be registered before a's client exists: key it
			// by a name we know now.
			app := c.appRanked(t, "b", "c", "a")
			a := c.addNode("a", withClient(afterOwnerTxnHook(t, &hook, c.keys.Owner(app))))
			b := c.addNode("b", viaProxy())
			c.addNode("c")
			var faultAt time.Time
			f := func() { tc.fault(t, c, b); faultAt = time.Now() }
			hook.Store(&f)
			if got := placeOn(t, a, app); got != "b" {
				t.Fatalf("placed on %s, want b", got)
			}
			// b may have started acting before the fault; its guard stops
			// it. Wait for the app to act elsewhere.
			if !c.rec.wait(3*ttl+2*time.Second, func([]event) bool {
				o := c.rec.owners()[app]
				id, _ := c.ownerOf(t, app)
				return len(o) == 1 && o[0] != "b" && o[0] == id
			}) {
				id, _ := c.ownerOf(t, app)
				t.Fatalf("app never acts off b: acting %v, key names %s", c.rec.owners()[app], id)
			}
			who := c.rec.owners()[app][0]
			took := time.Since(faultAt)
			if took > ttl+time.Second+300*time.Millisecond {
				t.Errorf("app acted at %s %v after the fault; promised within TTL+1s (%v)", who, took, ttl+time.Second)
			}
			c.rec.expectClean(t)
		})
	}
}

// B's lease ends (revoked, as an expiry would) after A read B's membership
// key and before A's Txn reaches etcd: the put fails, A retries, and the
// app acts somewhere, once, within TTL + 1 s.
func TestBreakPlacedOwnersLeaseEndsBeforeTheTxn(t *testing.T) {
	const ttl = time.Second
	c := newCluster(t, 1, ttl)
	var hook atomic.Pointer[func()]
	app := c.appRanked(t, "b", "c", "a")
	a := c.addNode("a", withClient(ownerTxnHook(t, &hook, c.keys.Owner(app))))
	b := c.addNode("b")
	c.addNode("c")
	f := func() {
		if _, err := c.etcd.Client().Revoke(context.Background(), b.session.Lease()); err != nil {
			t.Errorf("revoke: %v", err)
		}
	}
	hook.Store(&f)
	start := time.Now()
	got := placeOn(t, a, app)
	t.Logf("placed on %s", got)
	who, _ := waitActing(t, c, app, 3*ttl+2*time.Second)
	if took := time.Since(start); took > ttl+time.Second {
		t.Errorf("app acted at %s %v after the lease ended; promised within TTL+1s", who, took)
	}
	c.rec.expectClean(t)
}

// A's placing Txn succeeds but its response is lost (the connection
// breaks); A retries. Alone, and with B cut off at the same moment (the
// retry then finds B's key live but B silent, and places over it with a
// marker).
func TestBreakPlaceLostResponseThenRetry(t *testing.T) {
	for _, cutB := range []bool{false, true} {
		t.Run(fmt.Sprintf("cut off b: %v", cutB), func(t *testing.T) {
			const ttl = time.Second
			c := newCluster(t, 1, ttl)
			var hook atomic.Pointer[func()]
			app := c.appRanked(t, "b", "c", "a")
			a := c.addNode("a", viaProxy(), withClient(ownerTxnHook(t, &hook, c.keys.Owner(app))))
			b := c.addNode("b", viaProxy())
			c.addNode("c")
			var heal func()
			f := func() {
				a.proxy.ModifyRx(breakConnectionOnce())
				if cutB {
					heal = c.cutOff(t, b)
				}
			}
			hook.Store(&f)
			start := time.Now()
			got := placeOn(t, a, app)
			t.Logf("placed on %s", got)
			if !cutB && got != "b" {
				t.Errorf("placed on %s after the lost response; the first write named b, which answers", got)
			}
			who, took := waitActing(t, c, app, 3*ttl+2*time.Second)
			t.Logf("%s acts %v after the placement (%v since start)", who, took, time.Since(start))
			if cutB {
				if who == "b" {
					t.Error("the cut-off b acts")
				}
				heal()
				// b comes back: its stale view must not make it act too.
				if holdsWithin(2*ttl, func() bool { return len(c.rec.owners()[app]) > 1 }) {
					t.Errorf("two servers act after b came back: %v", c.rec.owners()[app])
				}
			}
			c.rec.expectClean(t)
		})
	}
}

// Two servers place the same apps at once: one write wins, both answers
// name the one server that then acts, and nobody overlaps.
func TestBreakConcurrentPlacementsAgree(t *testing.T) {
	const ttl = time.Second
	c := newCluster(t, 1, ttl)
	a := c.addNode("a")
	d := c.addNode("d")
	c.addNode("b")
	c.addNode("c")
	apps := c.registerN(t, 24)
	for _, app := range apps {
		var wg sync.WaitGroup
		var fromA, fromD string
		wg.Go(func() { fromA = placeOn(t, a, app) })
		wg.Go(func() { fromD = placeOn(t, d, app) })
		wg.Wait()
		if fromA != fromD {
			t.Errorf("app %d: a answered %s, d answered %s", app, fromA, fromD)
		}
		who, _ := waitActing(t, c, app, ttl+time.Second)
		if who != fromA {
			t.Errorf("app %d: answered %s, acting %s", app, fromA, who)
		}
	}
	c.rec.expectClean(t)
}

// The owner D is live in etcd and acting but does not answer pings (or is
// cut off entirely); A places over it (marker) on B. D comes back. B must
// not act while D may, and acts within TTL + 1 s of D's return.
func TestBreakPlaceOverSilentOwnerThatComesBack(t *testing.T) {
	for _, cut := range []bool{false, true} {
		t.Run(fmt.Sprintf("cut off from etcd: %v", cut), func(t *testing.T) {
			const ttl = 2 * time.Second
			c := newCluster(t, 1, ttl)
			app := c.appRanked(t, "d", "b", "c", "a")
			a := c.addNode("a")
			c.addNode("b")
			c.addNode("c")
			d := c.addNode("d", viaProxy())
			electAll(t, c, d, []int64{app})
			heal := func() { c.pinger.setDown(d.addr, false) }
			if cut {
				justConfirmed(t, d)
				heal = c.cutOff(t, d)
			} else {
				c.pinger.setDown(d.addr, true)
			}
			if got := placeOn(t, a, app); got != "b" {
				t.Fatalf("placed on %s, want b (d silent)", got)
			}
			if cut {
				// Come back before the lease ends.
				testutil.Eventually(t, 5*time.Second, "d's guard to fire", func() bool { return d.session.Check() != nil })
			}
			heal()
			healed := time.Now()
			who, _ := waitActing(t, c, app, ttl+3*time.Second)
			if took := time.Since(healed); took > ttl+time.Second {
				t.Errorf("%s acted %v after d came back; promised within TTL+1s", who, took)
			}
			c.rec.expectClean(t)
		})
	}
}

// B hands the app over (to C) and C crashes; A's acquire places the app
// on B, its first by rank, which is still resigning it and passes it on to
// its successor — C, which still looks live in B's membership view. The
// app must act somewhere within TTL + 1 s of C's crash.
func TestBreakPlaceOnResigningServerAfterItsSuccessorCrashed(t *testing.T) {
	const ttl = 2 * time.Second
	c := newCluster(t, 1, ttl)
	app := c.appRanked(t, "b", "c", "a")
	a := c.addNode("a")
	b := c.addNode("b")
	cc := c.addNode("c")
	if got := placeOn(t, a, app); got != "b" {
		t.Fatalf("placed on %s, want b", got)
	}
	waitActing(t, c, app, ttl)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	to, err := b.el.HandOver(ctx, app)
	if err != nil || to != "c" {
		t.Fatalf("handover: %s %v", to, err)
	}
	waitActing(t, c, app, ttl)
	crash(cc)
	c.pinger.setDown(cc.addr, true)
	crashed := time.Now()
	got := placeOn(t, a, app)
	t.Logf("after c crashed, a placed the app on %s", got)
	who, _ := waitActing(t, c, app, 3*ttl+3*time.Second)
	if took := time.Since(crashed); took > ttl+time.Second {
		id, _ := c.ownerOf(t, app)
		t.Errorf("app acted at %s %v after c crashed; promised within TTL+1s (key names %s)", who, took, id)
	}
	c.rec.expectClean(t)
}

// B resigns the app, and A's acquire places it straight back on B (first
// by rank): B passes it on; someone acts within TTL + 1 s.
func TestBreakPlaceOnServerThatJustResigned(t *testing.T) {
	const ttl = time.Second
	c := newCluster(t, 1, ttl)
	app := c.appRanked(t, "b", "c", "a")
	a := c.addNode("a")
	b := c.addNode("b")
	c.addNode("c")
	if got := placeOn(t, a, app); got != "b" {
		t.Fatalf("placed on %s, want b", got)
	}
	waitActing(t, c, app, ttl)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := b.el.Resign(ctx, app); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	got := placeOn(t, a, app)
	t.Logf("placed on %s after b resigned", got)
	who, _ := waitActing(t, c, app, 3*ttl+2*time.Second)
	if who == "b" && time.Since(start) < 2*ttl {
		t.Errorf("b acts for the app it resigned %v ago", time.Since(start))
	}
	if took := time.Since(start); took > ttl+time.Second {
		t.Errorf("app acted at %s %v after the resignation; promised within TTL+1s", who, took)
	}
	c.rec.expectClean(t)
}

// B's elector closes (drain) right after A placed an app on it; B's session
// stays open (Close leaves it to the caller). No key may be left naming B,
// which will never act: the app must act elsewhere within TTL + 1 s. With
// a slow link to b (responses 150 ms late), b's watch shows the placed key
// only after its drain began.
func TestBreakPlaceOnServerThatClosesRightAfter(t *testing.T) {
	for _, delay := range []time.Duration{0, 150 * time.Millisecond} {
		t.Run(fmt.Sprintf("delay %v", delay), func(t *testing.T) {
			const ttl = time.Second
			c := newCluster(t, 1, ttl)
			var hook atomic.Pointer[func()]
			app := c.appRanked(t, "b", "c", "a")
			a := c.addNode("a", withClient(afterOwnerTxnHook(t, &hook, c.keys.Owner(app))))
			b := c.addNode("b", viaProxy())
			c.addNode("c")
			closed := make(chan error, 1)
			f := func() {
				go func() {
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					defer cancel()
					closed <- b.el.Close(ctx)
				}()
			}
			hook.Store(&f)
			if delay > 0 {
				b.proxy.DelayRx(delay, 0)
				t.Cleanup(b.proxy.UndelayRx)
			}
			start := time.Now()
			if got := placeOn(t, a, app); got != "b" {
				t.Fatalf("placed on %s, want b", got)
			}
			if err := <-closed; err != nil {
				t.Logf("b's Close: %v", err)
			}
			t.Logf("b's Close returned %v after the placement", time.Since(start))
			if delay > 0 {
				b.proxy.UndelayRx()
			}
			ok := c.rec.wait(ttl+time.Second, func([]event) bool {
				o := c.rec.owners()[app]
				id, _ := c.ownerOf(t, app)
				return len(o) == 1 && o[0] == id && id != "b"
			})
			if !ok {
				id, tok := c.ownerOf(t, app)
				t.Errorf("%v after placing on the closing b, nobody acts elsewhere (acting %v); the key names %q (token %d), b's session still open", time.Since(start), c.rec.owners()[app], id, tok)
			}
			c.rec.expectClean(t)
		})
	}
}

// Elect during a Place of the same app on the same server: concurrent
// calls share one election, so Elect answers the owner that Place chose
// (the app then has a live owner, which is all Elect promises to answer).
func TestElectDuringAPlaceOfTheSameAppAnswersTheSameOwner(t *testing.T) {
	const ttl = time.Second
	c := newCluster(t, 1, ttl)
	app := c.appRanked(t, "c", "b", "a")
	a := c.addNode("a")
	c.addNode("b")
	cc := c.addNode("c")
	c.pinger.setDown(cc.addr, true) // the Place waits a PingTimeout on c
	placed := make(chan string, 1)
	go func() { placed <- placeOn(t, a, app) }()
	testutil.Eventually(t, 5*time.Second, "the place to ping c", func() bool { return c.pinger.pings(cc.addr) > 0 })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	addr, err := a.el.Elect(ctx, app, coord.ProtocolHTTP, "")
	if err != nil {
		t.Fatal(err)
	}
	// The two share one election (ensureOwner coalesces per app): by the
	// time it ends the app has a live owner, the placed one, and Elect
	// answers it — as it would have a moment later on its own. What must
	// hold is that both answer the same, live owner.
	placedAt := <-placed
	if strings.TrimSuffix(addr, ":7700") != placedAt {
		t.Errorf("Elect on a answered %s while the Place it joined answered %s", addr, placedAt)
	}
	if id, _ := c.ownerOf(t, app); id == "" {
		t.Error("no owner after Elect and Place")
	}
}

// Elect without Place elects the called server, not the preferred one.
func TestBreakElectStillElectsTheCaller(t *testing.T) {
	c := newCluster(t, 1, time.Second)
	app := c.appRanked(t, "b", "c", "a")
	a := c.addNode("a")
	c.addNode("b")
	c.addNode("c")
	electAll(t, c, a, []int64{app})
	if id, _ := c.ownerOf(t, app); id != "a" {
		t.Errorf("Elect on a: owner %s", id)
	}
	c.rec.expectClean(t)
}
