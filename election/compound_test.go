package election_test

// Compound faults: a fault during the recovery from another. Each test
// here drives real etcd (in-process) with faults from etcd's proxy and
// checks the contract's promises through the public API only: no two
// servers act for one app at once, every call returns within its
// context, and every ended ownership carries its end stamp.

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/election"
	"github.com/batonhq/baton/internal/hooks"
	"github.com/batonhq/baton/internal/testutil"
)

// TestDisplacerCrashDuringTakeoverWaitDoesNotLetTheSuccessorOverlap: a
// (TTL 3 s) is cut off from etcd and stops answering pings; b (TTL 1 s)
// overwrites a's live key and must wait until a has stopped — and then b
// goes away inside that wait. b's key disappears with b's lease and c
// (the app's successor) sees a deletion, while a may still act until its
// guard fires. The obligation to wait for a must not live only in b's
// memory: the displacement marker bound to a's lease holds c back too
// (before markers: 1.2–2.2 s of overlap).
func TestDisplacerCrashDuringTakeoverWaitDoesNotLetTheSuccessorOverlap(t *testing.T) {
	for _, tc := range []struct {
		name  string
		proxy bool // b talks to etcd through a proxy
		// gone makes b disappear inside its takeover wait.
		gone func(t *testing.T, c *cluster, b *node)
	}{
		{"crashed", false, func(t *testing.T, c *cluster, b *node) { crash(b) }},
		{"cut off", true, func(t *testing.T, c *cluster, b *node) { c.cutOff(t, b) }},
		{"closed with a ctx that ends inside the wait", false, func(t *testing.T, c *cluster, b *node) {
			// server.Node.Close: drain the elector, then close the session
			// (revoking the lease), both under the caller's ctx.
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			err := b.el.Close(ctx)
			t.Logf("b's Close with a 300 ms ctx: %v", err)
			closeCtx, cancel2 := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel2()
			if err := b.session.Close(closeCtx); err != nil {
				t.Logf("b's session Close: %v", err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t, 1, time.Second)
			a := c.addNodeTTL("a", 3*time.Second, viaProxy())
			var bOpts []nodeOption
			if tc.proxy {
				bOpts = append(bOpts, viaProxy())
			}
			b := c.addNode("b", bOpts...)
			c.addNode("c")
			// c, not a, must be the successor once b is gone: a is still a
			// member (its lease outlives b's).
			app := c.appWithSuccessor(t, "c", "a", "c")
			electAll(t, c, a, []int64{app})

			justConfirmed(t, a)
			c.cutOff(t, a)
			cut := time.Now()

			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			addr, err := b.el.Elect(ctx, app, coord.ProtocolHTTP, a.addr)
			overwrote := time.Now()
			if err != nil || addr != b.addr {
				t.Fatalf("Elect on b = %q, %v; want b's address", addr, err)
			}
			if owner, _ := c.ownerOf(t, app); owner != "b" {
				t.Fatalf("owner key names %q after b's election, want b", owner)
			}
			if _, acting := b.el.Ownership(app); acting {
				t.Fatal("b acts at once after overwriting a live key")
			}
			tc.gone(t, c, b)
			gone := time.Now()

			cStart, aEnd := takenOverAfter(t, c, "c", "a", app, cut)
			t.Logf("a cut off at 0; b overwrote a's key at %v, went away at %v; c acted at %v; a acted until %v (a's TTL %v)",
				overwrote.Sub(cut).Round(time.Millisecond), gone.Sub(cut).Round(time.Millisecond),
				cStart.Sub(cut).Round(time.Millisecond), aEnd.Sub(cut).Round(time.Millisecond), a.session.TTL())
			if cStart.Before(aEnd) {
				t.Errorf("c acted %v after b overwrote a's live key, while a acted until %v after it: overlap %v",
					cStart.Sub(overwrote).Round(time.Millisecond), aEnd.Sub(overwrote).Round(time.Millisecond),
					aEnd.Sub(cStart).Round(time.Millisecond))
			}
			c.rec.expectClean(t)
		})
	}
}

// TestLostTxnResponseDoesNotSkipTheTakeoverWait: a (TTL 2 s) hangs — cut
// off from etcd, not answering pings. b overwrites a's live key, but the
// response to b's election Txn never reaches b. b must still wait until a
// has stopped (its marker goes with a's lease): it learns that it owns
// the app from a later read (its retry, or its watch's reload), which
// must not be taken as "no wait needed" (before markers: 0.9–1.6 s of
// overlap).
func TestLostTxnResponseDoesNotSkipTheTakeoverWait(t *testing.T) {
	for _, tc := range []struct {
		name string
		bTTL time.Duration
		// fault runs right before b's election Txn leaves b; lose runs
		// once etcd has applied it, and must end the fault.
		fault func(b *node)
		lose  func(t *testing.T, b *node, cancelElect context.CancelFunc)
	}{
		{
			// The connection breaks with the response in flight; b's
			// election retries and reads its own key.
			name:  "connection reset",
			bTTL:  2 * time.Second,
			fault: func(b *node) { b.proxy.PauseRx(); b.proxy.ModifyRx(breakConnectionOnce()) },
			lose: func(t *testing.T, b *node, _ context.CancelFunc) {
				b.proxy.UnpauseRx()
			},
		},
		{
			// b's receive path stalls; the worker's request (Elect's
			// ctx) gives up at once, so the response is dropped when it
			// comes; b's guard fires; then the stall ends and b reloads
			// its owner keys.
			name:  "receive path paused past b's guard",
			bTTL:  time.Second,
			fault: func(b *node) { b.proxy.PauseRx() },
			lose: func(t *testing.T, b *node, cancelElect context.CancelFunc) {
				ep := b.session.Epoch()
				cancelElect()
				select {
				case <-ep.Done():
				case <-time.After(5 * time.Second):
					t.Fatal("b's guard did not fire with its receive path paused")
				}
				b.proxy.UnpauseRx()
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t, 1, time.Second)
			a := c.addNodeTTL("a", 2*time.Second, viaProxy())
			app := c.register(t, "x")[0]
			var hook atomic.Pointer[func()]
			// b retries an election at once, before its watch has
			// resumed: its watch would otherwise sometimes show it the
			// overwrite first, with the wait.
			fastRetry := withConfig(func(cfg *election.Config) { cfg.RetryBase = time.Millisecond })
			b := c.addNodeTTL("b", tc.bTTL, viaProxy(), withClient(overwriteTxnHook(t, &hook, c.keys.Owner(app))), fastRetry)
			electAll(t, c, a, []int64{app})
			t.Cleanup(b.proxy.UnpauseRx)
			t.Cleanup(b.proxy.UnmodifyRx)

			sent := make(chan struct{})
			fault := func() { tc.fault(b); close(sent) }
			hook.Store(&fault)

			justConfirmed(t, a)
			c.cutOff(t, a)
			cut := time.Now()

			ctx, cancelElect := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancelElect()
			elected := make(chan error, 1)
			go func() {
				addr, err := b.el.Elect(ctx, app, coord.ProtocolHTTP, a.addr)
				if err == nil && addr != b.addr {
					err = errors.New("Elect answered " + addr)
				}
				elected <- err
			}()
			select {
			case <-sent:
			case <-time.After(5 * time.Second):
				t.Fatal("b never sent its election Txn")
			}
			testutil.Eventually(t, 5*time.Second, "b's election Txn to be applied", func() bool {
				owner, _ := c.ownerOf(t, app)
				return owner == "b"
			})
			overwrote := time.Now()
			tc.lose(t, b, cancelElect)
			healed := time.Now()

			bStart, aEnd := takenOverAfter(t, c, "b", "a", app, cut)
			select {
			case err := <-elected:
				t.Logf("b's Elect: %v", err)
			case <-time.After(5 * time.Second):
				t.Error("b's Elect has not returned")
			}
			t.Logf("a cut off at 0; b's Txn applied by %v, fault over at %v; b acted at %v; a acted until %v (a's TTL %v)",
				overwrote.Sub(cut).Round(time.Millisecond), healed.Sub(cut).Round(time.Millisecond),
				bStart.Sub(cut).Round(time.Millisecond), aEnd.Sub(cut).Round(time.Millisecond), a.session.TTL())
			// a was cut off right after a confirmation, so its marker can
			// only go when etcd expires its lease, about a TTL after the
			// cut (not after the overwrite: the lease's clock started at
			// a's last keepalive).
			if wait := bStart.Sub(cut); wait < a.session.TTL()-a.session.Margin() {
				t.Errorf("b acted %v after a was cut off; a's lease (TTL %v) cannot have expired yet", wait.Round(time.Millisecond), a.session.TTL())
			}
			if bStart.Before(aEnd) {
				t.Errorf("b acted while a still acted: overlap %v", aEnd.Sub(bStart).Round(time.Millisecond))
			}
			c.rec.expectClean(t)
		})
	}
}

// TestCloseReturnsWithinItsContextWhenEtcdIsUnreachable: every call that
// takes a ctx returns once it ends, however etcd behaves. Here b loses
// etcd (its proxy holds every byte) while it waits for an app's mutex,
// which another server holds; Elector.Close and Elect must still return
// within their ctx (plus a second of slack). Session.Close and Abandon
// are checked with etcd unreachable too.
func TestCloseReturnsWithinItsContextWhenEtcdIsUnreachable(t *testing.T) {
	const bound, slack = 2 * time.Second, time.Second

	// holdMutex makes another server hold app's mutex: one stuck between
	// its Lock and its Txn, say. Released when the test ends.
	holdMutex := func(t *testing.T, c *cluster, app int64) {
		cli := testutil.Client(t, c.etcd)
		s, err := concurrency.NewSession(cli, concurrency.WithTTL(30))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := concurrency.NewMutex(s, c.keys.Lock(app)).Lock(ctx); err != nil {
			t.Fatal(err)
		}
	}
	// waitingForMutex waits until n has queued for app's mutex.
	waitingForMutex := func(t *testing.T, c *cluster, app int64) {
		testutil.Eventually(t, 5*time.Second, "a second waiter on the app's mutex", func() bool {
			resp, err := c.etcd.Client().Get(context.Background(), c.keys.Lock(app), clientv3.WithPrefix(), clientv3.WithCountOnly())
			return err == nil && resp.Count == 2
		})
	}
	longLock := withConfig(func(cfg *election.Config) { cfg.LockTimeout = 10 * time.Second })

	// unansweringOwner makes a own app and stop answering pings: an
	// election on another server then overwrites a's key, which is the
	// one kind of election that takes the app's mutex.
	unansweringOwner := func(t *testing.T, c *cluster) int64 {
		a := c.addNode("a")
		app := c.register(t, "x")[0]
		electAll(t, c, a, []int64{app})
		c.pinger.setDown(a.addr, true)
		return app
	}

	t.Run("Elector.Close during an election waiting for the mutex", func(t *testing.T) {
		c := newCluster(t, 1, time.Second)
		app := unansweringOwner(t, c)
		b := c.addNode("b", viaProxy(), longLock)
		holdMutex(t, c, app)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			b.el.Elect(ctx, app, coord.ProtocolHTTP, "") // ends with b's Close
		}()
		waitingForMutex(t, c, app)
		heal := c.cutOff(t, b)
		took, ok := returnsWithin(t, bound+slack, 20*time.Second, heal, func() {
			ctx, cancel := context.WithTimeout(context.Background(), bound)
			defer cancel()
			b.el.Close(ctx)
		})
		if !ok {
			t.Errorf("Elector.Close with a %v ctx and etcd unreachable had not returned after %v; it returned %v after it started, once etcd was reachable again",
				bound, bound+slack, took.Round(time.Millisecond))
		}
	})

	t.Run("Elect", func(t *testing.T) {
		c := newCluster(t, 1, time.Second)
		app := unansweringOwner(t, c)
		b := c.addNode("b", viaProxy(), longLock)
		holdMutex(t, c, app)
		ctx, cancel := context.WithTimeout(context.Background(), bound)
		defer cancel()
		elected := make(chan error, 1)
		start := time.Now()
		go func() {
			_, err := b.el.Elect(ctx, app, coord.ProtocolHTTP, "")
			elected <- err
		}()
		waitingForMutex(t, c, app)
		heal := c.cutOff(t, b)
		timer := time.NewTimer(bound + slack - time.Since(start))
		defer timer.Stop()
		select {
		case err := <-elected:
			t.Logf("Elect returned after %v: %v", time.Since(start).Round(time.Millisecond), err)
			return
		case <-timer.C:
		}
		heal()
		select {
		case err := <-elected:
			t.Errorf("Elect with a %v ctx and etcd unreachable had not returned after %v; it returned %v after it started, once etcd was reachable again (%v)",
				bound, bound+slack, time.Since(start).Round(time.Millisecond), err)
		case <-time.After(20 * time.Second):
			t.Fatal("Elect still blocked 20 s after etcd came back")
		}
	})

	// session starts a bare session whose client goes through a proxy.
	session := func(t *testing.T) (*coord.Session, func()) {
		c := newCluster(t, 1, time.Second)
		p, url := testutil.Proxy(t, c.etcd.Endpoint(0))
		cli := testutil.Client(t, c.etcd, url)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s, err := coord.NewSession(ctx, coord.SessionConfig{Client: cli, Prefix: c.keys.Prefix(), TTL: time.Second, Logger: testutil.Logger(t)})
		if err != nil {
			t.Fatal(err)
		}
		p.PauseTx()
		p.PauseRx()
		heal := func() { p.UnpauseTx(); p.UnpauseRx() }
		t.Cleanup(heal)
		t.Cleanup(func() { hooks.AbandonSession(s) })
		return s, heal
	}
	t.Run("Session.Close", func(t *testing.T) {
		s, heal := session(t)
		took, ok := returnsWithin(t, bound+slack, 20*time.Second, heal, func() {
			ctx, cancel := context.WithTimeout(context.Background(), bound)
			defer cancel()
			s.Close(ctx)
		})
		if !ok {
			t.Errorf("Session.Close with a %v ctx and etcd unreachable had not returned after %v (returned after %v once healed)", bound, bound+slack, took)
		}
	})
	t.Run("abandoned session", func(t *testing.T) {
		s, heal := session(t)
		took, ok := returnsWithin(t, 500*time.Millisecond, 20*time.Second, heal, func() { hooks.AbandonSession(s) })
		if !ok {
			t.Errorf("an abandoned session with etcd unreachable had not returned after 500 ms (returned after %v once healed)", took)
		}
	})
}

// TestEndedAtIsSetWhenClosedWithAnEndedContext: however an ownership
// ends, its OnAcquire ctx is cancelled and EndedAt reports when — from
// the moment ctx is done. Here the owner's elector is closed with a ctx
// that has already ended, alone and after abandoning its session (as
// server.Node.Kill does). The recorder calls EndedAt as soon as each ctx
// is done.
func TestEndedAtIsSetWhenClosedWithAnEndedContext(t *testing.T) {
	for _, tc := range []struct {
		name    string
		abandon bool
	}{{"Close", false}, {"Abandon then Close", true}} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t, 1, time.Second)
			a := c.addNode("a")
			apps := c.registerN(t, 64)
			electAll(t, c, a, apps)
			if tc.abandon {
				hooks.AbandonSession(a.session)
			}
			gone, cancel := context.WithCancel(context.Background())
			cancel()
			a.el.Close(gone)
			if !c.rec.wait(5*time.Second, func(ev []event) bool {
				n := 0
				for _, e := range ev {
					if e.kind == "cancel" && e.server == "a" {
						n++
					}
				}
				return n == len(apps)
			}) {
				t.Fatalf("not every OnAcquire ctx was cancelled: %v", c.rec.owners())
			}
			unstamped := 0
			for _, p := range c.rec.check() {
				if strings.Contains(p, "without an end stamp") {
					unstamped++
				}
			}
			if unstamped > 0 {
				t.Errorf("%d of %d ownership contexts were done while EndedAt still reported ok=false", unstamped, len(apps))
			}
			c.rec.expectClean(t)
		})
	}
}

// takenOverAfter waits until server to has acted for app since the
// instant since and server from has stopped, and returns when to started
// and when from stopped.
func takenOverAfter(t *testing.T, c *cluster, to, from string, app int64, since time.Time) (start, end time.Time) {
	t.Helper()
	if !c.rec.wait(10*time.Second, func(ev []event) bool {
		_, acts := acquiredBy(ev, to, app, since)
		_, stopped := lastCancel(ev, from, app)
		return acts && stopped
	}) {
		t.Fatalf("%s never acted, or %s never stopped: %v", to, from, c.rec.owners())
	}
	events := c.rec.snapshot()
	start, _ = acquiredBy(events, to, app, since)
	end, _ = lastCancel(events, from, app)
	return start, end
}
