package election_test

// Round 2 of attempts to break three changes, on real embedded etcd:
//
//  1. creating an owner key takes no mutex (elect.go, attempt);
//  2. orphans are taken over up to 64 to a Txn (takeover.go);
//  3. a failed or unanswered rebalancing move is undone (rebalance.go,
//     move / undoMove).
//
// Tests named TestBreakRound2… that fail show a broken promise; the
// others pin a promise that held under the attack they describe.

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/testutil"
)

// interceptingClient returns a withClient constructor whose client passes
// every unary call through f.
func interceptingClient(t testing.TB, f grpc.UnaryClientInterceptor) func([]string) *clientv3.Client {
	return func(endpoints []string) *clientv3.Client {
		return dialWith(t, endpoints, grpc.WithChainUnaryInterceptor(f))
	}
}

// putsOwnerRecordFor reports whether r puts key with an owner record
// naming server.
func putsOwnerRecordFor(r *etcdserverpb.TxnRequest, key, server string) bool {
	for _, op := range r.Success {
		p := op.GetRequestPut()
		if p == nil || string(p.Key) != key {
			continue
		}
		var rec struct {
			ServerID string `json:"serverId"`
		}
		if json.Unmarshal(p.Value, &rec) == nil && rec.ServerID == server {
			return true
		}
	}
	return false
}

// delayedTxn is a Txn request held back in the network: the client gave
// up on it (its ctx ended), but the request still reaches etcd later, when
// release is called — as a request stuck in a retransmission queue, or a
// proposal etcd accepted and commits only after the client's deadline.
type delayedTxn struct {
	once    sync.Once
	release chan struct{}
	done    chan struct{} // closed once the request has been answered
	err     error
	resp    *etcdserverpb.TxnResponse
}

func (d *delayedTxn) deliver() (*etcdserverpb.TxnResponse, error) {
	d.once.Do(func() { close(d.release) })
	<-d.done
	return d.resp, d.err
}

// BREAK: undoMove re-owns an app while the move's Txn is still on its way
// to etcd. X ranks t, a, b; a owns it; t joins and, once the set has
// settled, a moves X to t: a stops acting (OnLose rebalanced), then sends
// the Txn that writes t's record over its own. That request is delayed in
// the network past the move's deadline (TTL): the client gives up with
// DeadlineExceeded, and undoMove reads X's key, finds it still at a's
// token, and a acts for X again under that token. Then the request
// arrives: its compares (a's token, t's membership, the view's revision)
// all still hold, so etcd applies it, and t — whose key says HandedOverFrom
// a's token — acts at once, while a acts until its own watch shows the
// overwrite. With a's responses 150 ms late (a slow link, well inside its
// guard's margin) the two act together for about that long.
//
// "A key that still holds its token was not moved" is true only of a move
// whose Txn can no longer be applied; a timeout or a lost response does not
// say that.
func TestBreakRound2UndoMoveReownsWhileTheMoveTxnIsStillInFlight(t *testing.T) {
	const ttl, settle = time.Second, 500 * time.Millisecond
	c := newCluster(t, 1, ttl)
	app := c.appRanked(t, "t", "a", "b")
	key := c.keys.Owner(app)

	var armed atomic.Bool
	held := make(chan *delayedTxn, 1)
	intercept := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		r, ok := req.(*etcdserverpb.TxnRequest)
		if !ok || !putsOwnerRecordFor(r, key, "t") || !armed.CompareAndSwap(true, false) {
			return invoker(ctx, method, req, reply, cc, opts...)
		}
		d := &delayedTxn{release: make(chan struct{}), done: make(chan struct{}), resp: new(etcdserverpb.TxnResponse)}
		sendCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		go func() {
			defer cancel()
			defer close(d.done)
			<-d.release
			d.err = invoker(sendCtx, method, req, d.resp, cc, opts...)
		}()
		t.Cleanup(func() { _, _ = d.deliver() })
		held <- d
		<-ctx.Done() // the client gives up at the move's deadline
		return status.FromContextError(ctx.Err()).Err()
	}
	a := c.addNode("a", rebalancing(settle, 1), viaProxy(), withClient(interceptingClient(t, intercept)))
	c.addNode("b", rebalancing(settle, 1))
	electOn(t, c, a, app)
	_, token := c.ownerOf(t, app)
	armed.Store(true)
	c.addNode("t", rebalancing(settle, 1))

	var d *delayedTxn
	select {
	case d = <-held:
	case <-time.After(20 * time.Second):
		t.Fatal("a never tried to move X to t")
	}
	// a gave X up for the move; the move times out and is undone: a acts
	// for X again, under the same token.
	if !c.rec.wait(10*time.Second, func(evs []event) bool { return len(acquisitionsBy(evs, "a", app)) >= 2 }) {
		t.Fatalf("a never took X back after its move timed out; acquisitions %v", acquisitionsOf(c.rec.snapshot(), app))
	}
	if o := c.rec.owners()[app]; len(o) != 1 || o[0] != "a" {
		t.Fatalf("after the undo, acting for X: %v; want a", o)
	}
	t.Logf("a took X back under token %d after its move timed out", token)

	// The request arrives; a's link is slow (150 ms each way back to a).
	a.proxy.DelayRx(150*time.Millisecond, 0)
	defer a.proxy.UndelayRx()
	resp, err := d.deliver()
	if err != nil {
		t.Fatalf("the delayed move Txn: %v", err)
	}
	t.Logf("the move's Txn reached etcd after the undo: succeeded=%v at revision %d", resp.Succeeded, resp.Header.Revision)

	if !c.rec.wait(10*time.Second, func([]event) bool {
		o := c.rec.owners()[app]
		id, _ := c.ownerOf(t, app)
		return len(o) == 1 && o[0] == id
	}) {
		id, tok := c.ownerOf(t, app)
		t.Fatalf("X does not end up acting where its key says: acting %v, key names %s@%d", c.rec.owners()[app], id, tok)
	}
	t.Logf("acquisitions of X: %v", acquisitionsOf(c.rec.snapshot(), app))
	c.rec.expectClean(t)
}

// PIN: the move's Txn is applied but its response is lost (the client sees
// the connection reset). undoMove must not take X back: its read finds the
// key moved. X ranks t, a, b; a owns it and moves it to t.
func TestBreakRound2UndoMoveAfterAnAppliedMoveWhoseResponseWasLost(t *testing.T) {
	const ttl, settle = time.Second, 500 * time.Millisecond
	c := newCluster(t, 1, ttl)
	app := c.appRanked(t, "t", "a", "b")
	key := c.keys.Owner(app)

	var armed atomic.Bool
	lost := make(chan *etcdserverpb.TxnResponse, 1)
	intercept := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		r, ok := req.(*etcdserverpb.TxnRequest)
		if !ok || !putsOwnerRecordFor(r, key, "t") || !armed.CompareAndSwap(true, false) {
			return invoker(ctx, method, req, reply, cc, opts...)
		}
		resp := new(etcdserverpb.TxnResponse)
		if err := invoker(ctx, method, req, resp, cc, opts...); err != nil {
			return err
		}
		lost <- resp
		return status.Error(codes.Unavailable, "connection reset: response lost")
	}
	a := c.addNode("a", rebalancing(settle, 1), withClient(interceptingClient(t, intercept)))
	c.addNode("b", rebalancing(settle, 1))
	electOn(t, c, a, app)
	armed.Store(true)
	c.addNode("t", rebalancing(settle, 1))
	var resp *etcdserverpb.TxnResponse
	select {
	case resp = <-lost:
	case <-time.After(20 * time.Second):
		t.Fatal("a never tried to move X to t")
	}
	t.Logf("the move's Txn succeeded=%v at %d; its response was lost", resp.Succeeded, resp.Header.Revision)
	who, _ := waitActing(t, c, app, 10*time.Second)
	// Give a's undo time to (wrongly) take X back, then look again.
	if c.rec.wait(2*time.Second, func(evs []event) bool { return len(acquisitionsBy(evs, "a", app)) >= 2 }) {
		t.Errorf("a took X back after its move was applied: acquisitions %v", acquisitionsOf(c.rec.snapshot(), app))
	}
	if resp.Succeeded && who != "t" {
		t.Errorf("X acts on %s after a move to t that was applied", who)
	}
	t.Logf("acquisitions of X: %v", acquisitionsOf(c.rec.snapshot(), app))
	c.rec.expectClean(t)
}

// settledOn waits until every app acts on exactly one server and its owner
// key names that server, and fails the test otherwise.
func settledOn(t *testing.T, c *cluster, apps []int64, within time.Duration) {
	t.Helper()
	if c.rec.wait(within, func([]event) bool {
		owners := c.rec.owners()
		for _, app := range apps {
			if len(owners[app]) != 1 {
				return false
			}
		}
		for _, app := range apps {
			if id, _ := c.ownerOf(t, app); id != owners[app][0] {
				return false
			}
		}
		return true
	}) {
		return
	}
	owners := c.rec.owners()
	bad := 0
	for _, app := range apps {
		id, tok := c.ownerOf(t, app)
		if len(owners[app]) != 1 || owners[app][0] != id {
			if bad++; bad <= 5 {
				t.Logf("app %d: acting %v, key names %q@%d", app, owners[app], id, tok)
			}
		}
	}
	t.Fatalf("%d of %d apps do not act where their key says after %v", bad, len(apps), within)
}

// PIN (change 1): a crowd creates an absent key whose previous owner's
// marker still exists. a owns X and is cut off; b overwrites it (marker
// bound to a's lease) and resigns at once, deleting the key while the
// marker stays. Then b, c, d and e each run Elect and Place for X at the
// same time (and X's successor takes it over). Exactly one of them creates
// the key (version 1), every answer names that server, nobody acts before
// a has stopped, and X ends up acting where its key says. (b, which is
// resigning X, answers with its own guess of the successor; see below.)
func TestBreakRound2CrowdCreatesAnAbsentKeyWhileAMarkerRemains(t *testing.T) {
	c := newCluster(t, 1, time.Second)
	app := c.register(t, "crowd")[0]
	a := c.addNode("a", viaProxy())
	nodes := []*node{c.addNode("b"), c.addNode("c"), c.addNode("d"), c.addNode("e")}
	b := nodes[0]
	electOn(t, c, a, app)
	justConfirmed(t, a)
	heal := c.cutOff(t, a)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if addr, err := b.el.Elect(ctx, app, coord.ProtocolHTTP, ""); err != nil || addr != b.addr {
		t.Fatalf("Elect over the cut-off a on b = %q, %v", addr, err)
	}
	if err := b.el.Resign(ctx, app); err != nil {
		t.Fatalf("Resign on b: %v", err)
	}
	var wg sync.WaitGroup
	answers := make(chan string, 2*3*len(nodes))
	start := make(chan struct{})
	for _, n := range nodes {
		for i := range 3 {
			for _, place := range []bool{false, true} {
				wg.Go(func() {
					<-start
					f := n.el.Elect
					if place {
						f = n.el.Place
					}
					addr, err := f(ctx, app, coord.ProtocolHTTP, "")
					if err != nil {
						answers <- fmt.Sprintf("%s#%d place=%v: %v", n.id, i, place, err)
						return
					}
					answers <- fmt.Sprintf("%s|asked %s place=%v", addr, n.id, place)
				})
			}
		}
	}
	close(start)
	wg.Wait()
	close(answers)
	resp, err := c.etcd.Client().Get(ctx, c.keys.Owner(app))
	if err != nil || len(resp.Kvs) == 0 {
		t.Fatalf("X's key after the crowd: %v, %v", resp, err)
	}
	rec, _ := coord.DecodeOwnerRecord(resp.Kvs[0].Value)
	// One creation; or, when a Place put X on its preferred server b —
	// which is resigning X and so passes a key placed on it on to its
	// successor (passOnIfUnwanted) — that creation and the pass-on.
	passedOnByB := false
	switch v := resp.Kvs[0].Version; v {
	case 1:
	case 2:
		first, err := c.etcd.Client().Get(ctx, c.keys.Owner(app), clientv3.WithRev(resp.Kvs[0].CreateRevision))
		if err != nil || len(first.Kvs) == 0 {
			t.Fatalf("X's first value: %v, %v", first, err)
		}
		created, _ := coord.DecodeOwnerRecord(first.Kvs[0].Value)
		passedOnByB = created.ServerID == "b" && rec.HandedOverFrom == first.Kvs[0].ModRevision
		if !passedOnByB {
			t.Errorf("X's key was written twice since b deleted it (%s, then %s handed over from %d), and not as b's pass-on", created.ServerID, rec.ServerID, rec.HandedOverFrom)
		}
	default:
		t.Errorf("X's key was written %d times since b deleted it; want one creation", v)
	}
	for answer := range answers {
		addr, who, _ := strings.Cut(answer, "|")
		if addr == rec.ServerID+":7700" || passedOnByB && addr == b.addr {
			continue // the owner, or b while the key named it
		}
		if strings.HasPrefix(who, "asked b ") {
			// b is resigning X: it answers with its own choice of
			// successor (handingOver) without reading the key, which the
			// crowd may have given to another server. A stale redirect,
			// not an ownership: the server named sends the worker on.
			t.Logf("note: an answer (%s) names %q; the key names %s", who, addr, rec.ServerID)
			continue
		}
		t.Errorf("an answer (%s) names %q; the key names %s", who, addr, rec.ServerID)
	}
	settledOn(t, c, []int64{app}, 10*time.Second)
	heal()
	t.Logf("acquisitions of X: %v", acquisitionsOf(c.rec.snapshot(), app))
	c.rec.expectClean(t)
}

// PIN (change 1): ABA between an election's read and its create. c reads
// X's key absent; right before c's Txn, b creates the key, acts, and then
// gives X up — by resigning, or by crashing so that its lease ends. c's
// Txn then finds the key absent again and creates it. b had stopped before
// its key went, so c may act at once: no overlap, tokens grow.
func TestBreakRound2ElectionCreatesAfterTheKeyCameAndWent(t *testing.T) {
	for _, how := range []string{"resigns", "crashes"} {
		t.Run(how, func(t *testing.T) {
			c := newCluster(t, 1, time.Second)
			app := c.register(t, "aba")[0]
			var hook atomic.Pointer[func()]
			b := c.addNode("b")
			cn := c.addNode("c", withClient(ownerTxnHook(t, &hook, c.keys.Owner(app))))
			f := func() { // on c's election, between its read and its Txn
				electOn(t, c, b, app)
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				switch how {
				case "resigns":
					if err := b.el.Resign(ctx, app); err != nil {
						t.Errorf("Resign on b: %v", err)
					}
				case "crashes":
					crash(b)
					c.pinger.setDown(b.addr, true)
					testutil.Eventually(t, 10*time.Second, "b's key to go with its lease", func() bool {
						id, _ := c.ownerOf(t, app)
						return id == ""
					})
				}
			}
			hook.Store(&f)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			addr, err := cn.el.Elect(ctx, app, coord.ProtocolHTTP, "")
			if err != nil || addr != cn.addr {
				t.Fatalf("Elect on c = %q, %v; want c", addr, err)
			}
			if who, _ := waitActing(t, c, app, 10*time.Second); who != "c" {
				t.Errorf("X acts on %s; want c", who)
			}
			t.Logf("acquisitions of X: %v", acquisitionsOf(c.rec.snapshot(), app))
			c.rec.expectClean(t)
		})
	}
}

// batchTxnHook returns a withClient constructor whose client calls the
// function stored in hook (once) on a Txn that puts at least two owner
// keys naming server — a batch takeover — with the request and the
// invoker, in place of sending it.
func batchTxnHook(t testing.TB, c *cluster, server string, hook *atomic.Pointer[func(r *etcdserverpb.TxnRequest, send func() error) error]) func([]string) *clientv3.Client {
	return interceptingClient(t, func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		send := func() error { return invoker(ctx, method, req, reply, cc, opts...) }
		r, ok := req.(*etcdserverpb.TxnRequest)
		if !ok || len(r.Success) < 2 {
			return send()
		}
		for _, op := range r.Success {
			p := op.GetRequestPut()
			if p == nil {
				return send()
			}
			if _, err := c.keys.AppIDFromOwnerKey(string(p.Key)); err != nil || !putsOwnerRecordFor(r, string(p.Key), server) {
				return send()
			}
		}
		if f := hook.Swap(nil); f != nil {
			return (*f)(r, send)
		}
		return send()
	})
}

// batchApps returns the apps whose keys a batch Txn puts.
func batchApps(c *cluster, r *etcdserverpb.TxnRequest) []int64 {
	var apps []int64
	for _, op := range r.Success {
		if app, err := c.keys.AppIDFromOwnerKey(string(op.GetRequestPut().Key)); err == nil {
			apps = append(apps, app)
		}
	}
	return apps
}

// PIN (change 2): a batch takeover whose Txn is applied but whose response
// is lost, and the successor is then cut off from etcd — long enough for
// its guard to fire, or past its lease — before etcd comes back. a owns
// 120 apps and crashes; s and b are the successors. Every app ends up
// acting where its key says, with no overlap.
func TestBreakRound2BatchTakeoverLostResponseThenGuardFires(t *testing.T) {
	for _, tc := range []struct {
		name string
		hold time.Duration
	}{{"guard fires", 900 * time.Millisecond}, {"past the lease", 2500 * time.Millisecond}} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t, 1, time.Second)
			a := c.addNode("a")
			var hook atomic.Pointer[func(*etcdserverpb.TxnRequest, func() error) error]
			s := c.addNode("s", viaProxy(), withClient(batchTxnHook(t, c, "s", &hook)))
			c.addNode("b")
			apps := c.registerN(t, 120)
			electAll(t, c, a, apps)
			fired := make(chan time.Time, 1)
			f := func(r *etcdserverpb.TxnRequest, send func() error) error {
				err := send()
				s.proxy.PauseTx()
				s.proxy.PauseRx()
				c.pinger.setDown(s.addr, true)
				fired <- time.Now()
				if err != nil {
					return err
				}
				return status.Error(codes.Unavailable, "connection reset: response lost")
			}
			hook.Store(&f)
			crash(a)
			c.pinger.setDown(a.addr, true)
			select {
			case <-fired:
			case <-time.After(15 * time.Second):
				t.Fatal("s never took orphans over in a batch")
			}
			<-time.After(tc.hold)
			s.proxy.UnpauseTx()
			s.proxy.UnpauseRx()
			c.pinger.setDown(s.addr, false)
			settledOn(t, c, apps, 20*time.Second)
			c.rec.expectClean(t)
		})
	}
}

// PIN (change 2): a batch takeover races a worker-driven Place, or an
// Elect, of one of its orphans on another server, which writes first. The
// batch Txn fails as a whole and its apps are elected one by one. Every
// app ends up acting where its key says, with no overlap.
func TestBreakRound2BatchTakeoverRacesAPlaceOfAnOrphan(t *testing.T) {
	for _, place := range []bool{true, false} {
		t.Run(fmt.Sprintf("place=%v", place), func(t *testing.T) {
			c := newCluster(t, 1, time.Second)
			a := c.addNode("a")
			var hook atomic.Pointer[func(*etcdserverpb.TxnRequest, func() error) error]
			c.addNode("s", withClient(batchTxnHook(t, c, "s", &hook)))
			b := c.addNode("b")
			apps := c.registerN(t, 120)
			electAll(t, c, a, apps)
			raced := make(chan string, 1)
			f := func(r *etcdserverpb.TxnRequest, send func() error) error {
				app := batchApps(c, r)[0]
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				call := b.el.Elect
				if place {
					call = b.el.Place
				}
				addr, err := call(ctx, app, coord.ProtocolHTTP, "")
				raced <- fmt.Sprintf("app %d: %q, %v", app, addr, err)
				return send()
			}
			hook.Store(&f)
			crash(a)
			c.pinger.setDown(a.addr, true)
			select {
			case r := <-raced:
				t.Logf("b's race with s's batch: %s", r)
			case <-time.After(15 * time.Second):
				t.Fatal("s never took orphans over in a batch")
			}
			settledOn(t, c, apps, 20*time.Second)
			c.rec.expectClean(t)
		})
	}
}

// PIN (change 2): a batch takeover of orphans that still carry markers.
// a (TTL 3 s) owns 40 apps and is cut off; b (TTL 1 s) overwrites them
// all (markers bound to a's lease) and crashes; when b's lease ends, the
// successors take the orphans over in batches, and must not act before
// a's lease — and with it its markers — has ended.
func TestBreakRound2BatchTakeoverOfOrphansStillMarked(t *testing.T) {
	c := newCluster(t, 1, time.Second)
	a := c.addNodeTTL("a", 3*time.Second, viaProxy())
	b := c.addNode("b")
	c.addNode("s")
	c.addNode("u")
	apps := c.registerN(t, 40)
	electAll(t, c, a, apps)
	justConfirmed(t, a)
	heal := c.cutOff(t, a)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, app := range apps {
		if addr, err := b.el.Elect(ctx, app, coord.ProtocolHTTP, ""); err != nil || addr != b.addr {
			t.Fatalf("Elect %d over a on b = %q, %v", app, addr, err)
		}
	}
	crash(b)
	c.pinger.setDown(b.addr, true)
	settledOn(t, c, apps, 20*time.Second)
	heal()
	for _, app := range apps {
		if id, _ := c.ownerOf(t, app); id == "a" || id == "b" {
			t.Errorf("app %d still names %s", app, id)
		}
	}
	c.rec.expectClean(t)
}

// PIN (change 2): etcd's leader is lost right as the first batch of a mass
// takeover goes out, on a 3-member cluster, and again during the recovery.
// a owns 600 apps and crashes; s and b take them over. Every app ends up
// acting where its key says, with no overlap.
func TestBreakRound2MassBatchTakeoverDuringLeaderLoss(t *testing.T) {
	if testing.Short() {
		t.Skip("600 apps on a 3-member cluster")
	}
	c := newCluster(t, 3, 2*time.Second)
	a := c.addNode("a")
	var hook atomic.Pointer[func(*etcdserverpb.TxnRequest, func() error) error]
	c.addNode("s", withClient(batchTxnHook(t, c, "s", &hook)))
	c.addNode("b")
	apps := c.registerN(t, 600)
	electAll(t, c, a, apps)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
	defer cancel()
	stopped := make(chan int, 1)
	f := func(r *etcdserverpb.TxnRequest, send func() error) error {
		done := make(chan error, 1)
		go func() { done <- send() }()
		i, err := c.etcd.StopLeader(ctx)
		if err != nil {
			t.Errorf("stop leader: %v", err)
		}
		stopped <- i
		return <-done
	}
	hook.Store(&f)
	crash(a)
	c.pinger.setDown(a.addr, true)
	var first int
	select {
	case first = <-stopped:
	case <-time.After(20 * time.Second):
		t.Fatal("s never took orphans over in a batch")
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
	settledOn(t, c, apps, 40*time.Second)
	c.rec.expectClean(t)
}
